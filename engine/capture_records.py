"""Capture results of a step turned into wire records (the shapes of DESIGN.md's wire protocol).

Raw entries carry ``token_positions, attention_scores, topk_logits, logsumexp_candidates,
true_probs, topk_mass, layer_id`` (under ``layers: {"<id>": {...}}`` when several layers
are captured); sketch entries carry ``layer_sketches``; fingerprint entries carry the
20-float ``fingerprint`` and its ``manifold`` zone. Every entry carries ``decode_step``
(or ``step``) and ``query_position``, and ``think_phase``. Prompt-attention entries have
``decode_step: null`` and ``prompt: true``.
"""

from __future__ import annotations

import base64
import gzip
from dataclasses import dataclass

import numpy as np
import torch

from attnscope.capture import SKETCH_HUBS
from attnscope.engine.capture_plan import CaptureRow, StepCapture
from attnscope.engine.sequence import Sequence
from attnscope.kernels.capture_reference import FINGERPRINT_DIM, CaptureResult, fingerprint_v1
from attnscope.zones import classify, is_periodic


_PACKED_FIELDS = ("lse", "hist", "entropy", "sink_mass", "num_stat_positions", "topk_pos", "topk_prob")


@dataclass
class LayerRow:
    """One row's capture in one layer, on the host (numpy views of the step's packed results)."""

    positions: np.ndarray
    probs: np.ndarray
    lse: np.ndarray
    hist: np.ndarray
    entropy: float
    sink_mass: float


def pack_results(step: StepCapture) -> torch.Tensor | None:
    """Every group's results flattened into one float32 tensor, so one copy brings a step's capture to the host.

    Layers in ascending order, groups in order, fields in ``_PACKED_FIELDS`` order
    (positions and counts are exact in float32 below 2^24). ``None`` when the step
    captures no top-k/sketch/fingerprint group. Recorded inside CUDA graphs too.
    """
    parts = [getattr(group.result, name).reshape(-1).float()
             for layer in sorted(step.layers) for group in step.layers[layer]
             for name in _PACKED_FIELDS if getattr(group.result, name) is not None]
    return torch.cat(parts) if parts else None


def results_to_host(step: StepCapture) -> None:
    """Replace every group's device results by host copies brought over in one copy of ``pack_results(step)``.

    The fields ``pack_results`` carries come back with their dtypes (positions and counts
    int32); per-head top-k and ``recomputed_tiles`` are dropped (records do not use them).
    """
    packed = pack_results(step)
    if packed is None:
        return
    host = packed.cpu()
    offset = 0
    for layer in sorted(step.layers):
        for group in step.layers[layer]:
            fields = {}
            for name in _PACKED_FIELDS:
                tensor = getattr(group.result, name)
                if tensor is not None:
                    fields[name] = host[offset : offset + tensor.numel()].view(tensor.shape).to(tensor.dtype)
                    offset += tensor.numel()
            group.result = CaptureResult(**{name: fields.get(name) for name in _PACKED_FIELDS},
                                         head_topk_pos=None, head_topk_logit=None)


def step_records(step: StepCapture, packed: np.ndarray | None) -> dict[int, list[dict]]:
    """Wire records of a step's captured rows, per sequence id, in position order.

    ``packed`` is ``pack_results(step)`` on the host. Fingerprints are computed per layer
    for all rows at once and averaged over each row's layers with array adds; per-layer
    rows (``LayerRow``) are only built for the raw and sketch modes, which report layers.
    """
    index: dict[tuple[int, int], int] = {}
    rows: list[CaptureRow] = []
    layer_rows: list[dict[int, LayerRow | dict]] = []
    per_group: list[tuple[np.ndarray, ...]] = []
    offset = 0
    for layer in sorted(step.layers):
        for group in step.layers[layer]:
            fields, offset = _unpack(group.result, packed, offset)
            n = len(group.rows)
            where = np.empty(n, dtype=np.int64)
            modes = [row.seq.capture.params.mode for row in group.rows]
            raws = _raw_layers(fields, group.rows) if "raw" in modes else None
            for i, row in enumerate(group.rows):
                key = (row.seq.seq_id, row.position)
                j = index.get(key)
                if j is None:
                    j = index[key] = len(rows)
                    rows.append(row)
                    layer_rows.append({})
                where[i] = j
                if modes[i] == "raw":
                    layer_rows[j][layer] = raws[i]
                elif modes[i] == "sketch":
                    layer_rows[j][layer] = _layer_row(fields, i)
            per_group.append((where, fields["hist"][:n], fields["entropy"][:n], fields["num_stat_positions"][:n],
                              fields["sink_mass"][:n]))
    fingerprint_sum = np.zeros((len(rows), FINGERPRINT_DIM))
    sink_sum = np.zeros(len(rows))
    layer_count = np.zeros(len(rows))
    if per_group:  # one fingerprint_v1 call for every (row, layer) of the step
        where, hist, entropy, count, sink = (np.concatenate(parts) for parts in zip(*per_group))
        layer_fingerprints = fingerprint_v1(torch.from_numpy(hist), torch.from_numpy(entropy),
                                            torch.from_numpy(count)).numpy()
        start = 0
        for group_where, *_ in per_group:  # a row recurs once per layer it captures, at most once per group
            part = slice(start, start + len(group_where))
            fingerprint_sum[group_where] += layer_fingerprints[part]
            sink_sum[group_where] += sink[part]
            layer_count[group_where] += 1
            start = part.stop
    fingerprints = fingerprint_sum / layer_count[:, None]
    sinks = sink_sum / layer_count
    records: dict[int, list[dict]] = {}
    for j in sorted(range(len(rows)), key=lambda j: (rows[j].seq.seq_id, rows[j].position)):
        records.setdefault(rows[j].seq.seq_id, []).append(
            _record(rows[j], layer_rows[j], fingerprints[j].tolist(), float(sinks[j])))
    return records


def _layer_row(fields: dict[str, np.ndarray], i: int) -> LayerRow:
    """Row ``i`` of a group's unpacked fields (top-k entries past ``|W|`` dropped)."""
    positions = probs = _EMPTY
    if "topk_pos" in fields:
        keep = fields["topk_pos"][i] >= 0
        positions, probs = fields["topk_pos"][i][keep].astype(np.int64), fields["topk_prob"][i][keep]
    return LayerRow(positions, probs, fields["lse"][i], fields["hist"][i], float(fields["entropy"][i]),
                    float(fields["sink_mass"][i]))


_EMPTY = np.zeros(0, dtype=np.float32)


def _unpack(result, packed: np.ndarray, offset: int) -> tuple[dict[str, np.ndarray], int]:
    """A group's fields as numpy views of the packed host array (shapes from the device result)."""
    fields = {}
    for name in _PACKED_FIELDS:
        tensor = getattr(result, name)
        if tensor is None:
            continue
        size = tensor.numel()
        fields[name] = packed[offset : offset + size].reshape(tensor.shape)
        offset += size
    fields["num_stat_positions"] = fields["num_stat_positions"].astype(np.int64)
    return fields, offset


def _record(row: CaptureRow, layers: dict[int, LayerRow | dict], fingerprint: list[float], sink_mass: float) -> dict:
    """One wire entry for one captured row (``fingerprint``/``sink_mass``: means over its layers).

    The think phase is read here, when the records are built, not when the step was
    planned: by now the row's own token is on the host even if the step was launched
    before it was (overlapped steps). Rows of a sequence arrive in position order, which
    the phase scan relies on.
    """
    cap = row.seq.capture
    mode = cap.params.mode
    phase = cap.think_phase(row.seq.all_token_ids, row.position + 1)
    base = {"decode_step": row.decode_step, "query_position": row.position, "think_phase": phase}
    if row.decode_step is None:
        base["prompt"] = True
    if mode == "fingerprint":
        return {"fingerprint": fingerprint, "schema_version": 1, "manifold": classify(fingerprint),
                "step": row.decode_step, "sink_mass": sink_mass, **base}
    if mode == "sketch":
        sketches = {str(layer): _sketch(row, data) for layer, data in sorted(layers.items())}
        periodic = any(is_periodic((row.position - d.positions).tolist(), d.probs.tolist()) for d in layers.values())
        return {"mode": "sketch", "layer_sketches": sketches, "manifold": classify(fingerprint, periodic), **base}
    raws = dict(sorted(layers.items()))
    if len(raws) == 1:
        (layer, data), = raws.items()
        return {**data, "layer_id": layer, **base}
    return {"layers": {str(layer): data for layer, data in raws.items()}, **base}


def _raw_layers(fields: dict[str, np.ndarray], rows: list[CaptureRow]) -> list[dict]:
    """Raw top-k fields of one layer for every row of a group, computed for the group at once.

    DESIGN.md's raw entry: positions (shifted by the row's ``mask_prefix``), true
    probabilities, scores renormalised over the row's top-k, logits (``log p`` plus the
    head's logsumexp when one head is selected, else ``log p``), the captured mass.
    """
    n = len(rows)
    params = [row.seq.capture.params for row in rows]
    positions = fields["topk_pos"][:n].astype(np.int64)
    probs = fields["topk_prob"][:n].astype(np.float64)
    ks = np.minimum((positions >= 0).sum(axis=1), [p.top_k for p in params])
    shift = np.array([p.mask_prefix for p in params], dtype=np.int64)[:, None]
    lse = np.array([float(fields["lse"][i, p.head_ids[0]]) if p.head_ids is not None and len(p.head_ids) == 1
                    else 0.0 for i, p in enumerate(params)])
    mass = np.where(ks > 0, np.cumsum(probs, axis=1)[np.arange(n), np.maximum(ks - 1, 0)], 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = np.where(mass[:, None] > 0, probs / mass[:, None], 0.0)
        logits = np.log(probs) + lse[:, None]
    position_lists, prob_lists = (positions - shift).tolist(), probs.tolist()
    score_lists, logit_lists = scores.tolist(), logits.tolist()
    return [{"token_positions": position_lists[i][:k], "attention_scores": score_lists[i][:k],
             "topk_logits": logit_lists[i][:k], "logsumexp_candidates": float(lse[i]),
             "true_probs": prob_lists[i][:k], "topk_mass": float(mass[i])}
            for i, k in enumerate(ks.tolist())]


def _sketch(row: CaptureRow, data: LayerRow) -> dict:
    """Sketch fields of one layer: hubs, distance histogram, entropy, captured mass."""
    n = row.seq.capture.params.mask_prefix
    positions, masses = data.positions[:SKETCH_HUBS], data.probs[:SKETCH_HUBS].astype(np.float64)
    return {
        "top_hubs": [[p - n, m] for p, m in zip(positions.tolist(), masses.tolist())],
        "dist_hist": data.hist.astype(np.float64).tolist(),
        "entropy": data.entropy,
        "mass_captured": float(masses.sum()),
        "sink_mass": data.sink_mass,
    }


def append_full_rows(step: StepCapture) -> None:
    """Keep the full-mode rows of a step (float16, on the host) with their sequences."""
    for layer, full in step.full.items():
        for row, probs in zip(full.rows, full.probs):
            row.seq.capture.full_rows.setdefault(layer, []).append(probs.to(torch.float16).cpu())


def full_capture_data(seq: Sequence) -> list[dict]:
    """The vLLM-family ``attn_capture_data``: per layer base64(gzip(float16 [T, heads, T])) and token_meta."""
    out = []
    prompt_len = len(seq.prompt_token_ids)
    for layer, rows in sorted(seq.capture.full_rows.items()):
        t = len(rows)
        heads = rows[0].shape[0]
        matrix = np.zeros((t, heads, t), dtype=np.float16)
        for i, probs in enumerate(rows):
            width = min(probs.shape[1], t)
            matrix[i, :, :width] = probs[:, :width].numpy()
        out.append({
            "layer_idx": layer,
            "data": base64.b64encode(gzip.compress(matrix.tobytes())).decode("ascii"),
            "shape": [t, heads, t],
            "token_meta": {"prompt_len": prompt_len, "total_len": t, "vision_ranges": [],
                           "lang_ranges": [{"start": 0, "end": prompt_len}]},
        })
    return out
