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

import numpy as np
import torch

from attnscope.capture import SKETCH_HUBS
from attnscope.engine.capture_plan import CaptureRow, StepCapture
from attnscope.engine.sequence import Sequence
from attnscope.kernels.capture_reference import FINGERPRINT_DIM, CaptureResult, fingerprint_v1
from attnscope.zones import classify, periodic_rows


_PACKED_FIELDS = ("lse", "hist", "entropy", "sink_mass", "num_stat_positions", "topk_pos", "topk_prob")


def pack_results(step: StepCapture) -> torch.Tensor | None:
    """Every group's results flattened into one float32 tensor, so one copy brings a step's capture to the host.

    Layers in ascending order, groups in order, fields in ``_PACKED_FIELDS`` order.
    Positions and counts (int32) travel as their bits (``view``, not a conversion), so the
    only kernel is the concatenation: a conversion per field and layer cost about 2 us of
    GPU time each. ``None`` when the step captures no top-k/sketch/fingerprint group.
    Recorded inside CUDA graphs too.
    """
    parts = [_as_float_bits(getattr(group.result, name))
             for layer in sorted(step.layers) for group in step.layers[layer]
             for name in _PACKED_FIELDS if getattr(group.result, name) is not None]
    return torch.cat(parts) if parts else None


def _as_float_bits(tensor: torch.Tensor) -> torch.Tensor:
    """A result field flattened as float32: float32 as is, int32 reinterpreted bit for bit."""
    flat = tensor.reshape(-1)
    return flat.view(torch.float32) if flat.dtype == torch.int32 else flat.float()


def results_to_host(step: StepCapture) -> None:
    """Replace every group's device results by host copies brought over in one copy of ``pack_results(step)``.

    The fields ``pack_results`` carries come back with their dtypes (positions and counts
    int32); per-head top-k and ``recomputed_tiles`` are dropped (records do not use them).
    """
    packed = pack_results(step)
    if packed is None:
        return
    host = packed.cpu().numpy()
    offset = 0
    for layer in sorted(step.layers):
        for group in step.layers[layer]:
            fields, offset = _unpack(group.result, host, offset)
            group.result = CaptureResult(**{name: torch.from_numpy(fields[name]) if name in fields else None
                                            for name in _PACKED_FIELDS},
                                         head_topk_pos=None, head_topk_logit=None)


def step_records(step: StepCapture, packed: np.ndarray | None) -> dict[int, list[dict]]:
    """Wire records of a step's captured rows, per sequence id, in position order.

    ``packed`` is ``pack_results(step)`` on the host. Each layer's group is turned into
    its rows' per-layer entries at once (:func:`_raw_layers`, :func:`_sketch_layers`);
    fingerprints are computed only for the rows that report them (fingerprint and sketch
    modes), per layer for all of them in one call, and averaged over each row's layers
    with array adds; sketch rows' hub periodicity only where their zone depends on it
    (:func:`_step_periodicity`).
    """
    index: dict[tuple[int, int], int] = {}
    rows: list[CaptureRow] = []
    layer_entries: list[dict[int, dict]] = []
    per_group: list[tuple[np.ndarray, ...]] = []
    hub_groups: list[tuple[np.ndarray, ...]] = []
    offset = 0
    for layer in sorted(step.layers):
        for group in step.layers[layer]:
            fields, offset = _unpack(group.result, packed, offset)
            n = len(group.rows)
            where = np.empty(n, dtype=np.int64)
            modes = [row.seq.capture.params.mode for row in group.rows]
            raws = _raw_layers(fields, group.rows) if "raw" in modes else None
            sketches, hubs = _sketch_layers(fields, group.rows) if "sketch" in modes else (None, None)
            for i, row in enumerate(group.rows):
                key = (row.seq.seq_id, row.position)
                j = index.get(key)
                if j is None:
                    j = index[key] = len(rows)
                    rows.append(row)
                    layer_entries.append({})
                where[i] = j
                if modes[i] == "raw":
                    layer_entries[j][layer] = raws[i]
                elif modes[i] == "sketch":
                    layer_entries[j][layer] = sketches[i]
            if hubs is not None:
                sketched = np.array([mode == "sketch" for mode in modes])
                hub_groups.append((where[sketched], *(part[sketched] for part in hubs)))
            summarised = np.array([mode != "raw" for mode in modes])
            if summarised.any():
                per_group.append((where[summarised], fields["hist"][:n][summarised],
                                  fields["entropy"][:n][summarised],
                                  fields["num_stat_positions"][:n][summarised].astype(np.int64),
                                  fields["sink_mass"][:n][summarised]))
    fingerprints, sinks = _mean_fingerprints(per_group, len(rows))
    periodic = _step_periodicity(hub_groups, fingerprints)
    records: dict[int, list[dict]] = {}
    for j in sorted(range(len(rows)), key=lambda j: (rows[j].seq.seq_id, rows[j].position)):
        records.setdefault(rows[j].seq.seq_id, []).append(
            _record(rows[j], layer_entries[j], fingerprints[j], sinks[j], periodic[j]))
    return records


def _mean_fingerprints(per_group: list[tuple[np.ndarray, ...]], num_rows: int) -> tuple[list, list]:
    """Per step row, fingerprint v1 and sink mass averaged over the layers it captures (``None`` for rows no
    group lists: raw rows). One ``fingerprint_v1`` call covers every (row, layer) of the step."""
    if not per_group:
        return [None] * num_rows, [None] * num_rows
    fingerprint_sum = np.zeros((num_rows, FINGERPRINT_DIM))
    sink_sum = np.zeros(num_rows)
    layer_count = np.zeros(num_rows)
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
    listed = layer_count > 0
    fingerprints = np.divide(fingerprint_sum, np.maximum(layer_count, 1)[:, None]).tolist()
    sinks = np.divide(sink_sum, np.maximum(layer_count, 1)).tolist()
    return ([f if ok else None for f, ok in zip(fingerprints, listed.tolist())],
            [m if ok else None for m, ok in zip(sinks, listed.tolist())])


def _step_periodicity(hub_groups: list[tuple[np.ndarray, ...]], fingerprints: list) -> list[bool]:
    """Per step row, whether any of its sketched layers' hubs attend periodically (:func:`periodic_rows`).

    ``classify`` reads periodicity only for a fingerprint no earlier zone rule claims, so
    only those rows' hubs are tested, all layers of the step in one call; other rows
    report ``False`` (which their zone ignores).
    """
    periodic = np.zeros(len(fingerprints), dtype=bool)
    if not hub_groups:
        return periodic.tolist()
    open_rows = np.array([fingerprint is not None and classify(fingerprint) == "unknown"
                          for fingerprint in fingerprints], dtype=bool)
    where, offsets, masses, valid = (np.concatenate(parts) for parts in zip(*hub_groups))
    undecided = open_rows[where]
    if undecided.any():
        ripples = periodic_rows(offsets[undecided], masses[undecided], valid[undecided])
        periodic[where[undecided][ripples]] = True
    return periodic.tolist()


def _unpack(result, packed: np.ndarray, offset: int) -> tuple[dict[str, np.ndarray], int]:
    """A group's fields as numpy views of the packed host array, with the device result's shapes and dtypes
    (int32 fields read back from their bits)."""
    fields = {}
    for name in _PACKED_FIELDS:
        tensor = getattr(result, name)
        if tensor is None:
            continue
        size = tensor.numel()
        part = packed[offset : offset + size]
        fields[name] = (part.view(np.int32) if tensor.dtype == torch.int32 else part).reshape(tensor.shape)
        offset += size
    return fields, offset


def _record(row: CaptureRow, layers: dict[int, dict], fingerprint: list[float] | None, sink_mass: float | None,
            periodic: bool) -> dict:
    """One wire entry for one captured row (``fingerprint``/``sink_mass``: means over its layers; ``periodic``:
    whether any of its sketched layers attends periodically, where its zone depends on that).

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
        sketches = {str(layer): layers[layer] for layer in sorted(layers)}
        return {"mode": "sketch", "layer_sketches": sketches, "manifold": classify(fingerprint, periodic), **base}
    if len(layers) == 1:
        (layer, data), = layers.items()
        return {**data, "layer_id": layer, **base}
    return {"layers": {str(layer): layers[layer] for layer in sorted(layers)}, **base}


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
             "topk_logits": logit_lists[i][:k], "logsumexp_candidates": lse_i,
             "true_probs": prob_lists[i][:k], "topk_mass": mass_i}
            for i, (k, lse_i, mass_i) in enumerate(zip(ks.tolist(), lse.tolist(), mass.tolist()))]


def _sketch_layers(fields: dict[str, np.ndarray],
                   rows: list[CaptureRow]) -> tuple[list[dict], tuple[np.ndarray, ...]]:
    """Sketch fields of one layer for every row of a group (hubs, distance histogram, entropy, captured mass,
    sink mass), all at once, and the hubs' offsets from the query, masses and valid flags (``[n, SKETCH_HUBS]``
    each) for the periodicity rule."""
    n = len(rows)
    positions = fields["topk_pos"][:n, :SKETCH_HUBS].astype(np.int64)
    masses = fields["topk_prob"][:n, :SKETCH_HUBS].astype(np.float64)
    valid = positions >= 0
    query = np.array([row.position for row in rows], dtype=np.int64)[:, None]
    shift = np.array([row.seq.capture.params.mask_prefix for row in rows], dtype=np.int64)[:, None]
    counts = valid.sum(axis=1).tolist()
    hub_positions, hub_masses = (positions - shift).tolist(), masses.tolist()
    mass_captured = np.where(valid, masses, 0.0).sum(axis=1).tolist()
    hists = fields["hist"][:n].astype(np.float64).tolist()
    entropies, sinks = fields["entropy"][:n].tolist(), fields["sink_mass"][:n].tolist()
    sketches = [{"top_hubs": list(map(list, zip(hub_positions[i][:c], hub_masses[i][:c]))), "dist_hist": hists[i],
                 "entropy": entropies[i], "mass_captured": mass_captured[i], "sink_mass": sinks[i]}
                for i, c in enumerate(counts)]
    return sketches, (query - positions, masses, valid)


def append_full_rows(step: StepCapture) -> None:
    """Keep the full-mode rows of a step (float16, on the host) with their sequences."""
    for layer, full in step.full.items():
        for row, probs in zip(full.rows, full.probs):
            row.seq.capture.full_rows.setdefault(layer, []).append(probs.to(torch.float16).cpu())


def full_capture_data(seq: Sequence) -> list[dict]:
    """The vLLM-family ``attn_capture_data``: per layer base64(gzip(float16 [T, heads, T])) and token_meta.

    With ``mask_prefix = n`` the matrix covers positions ``n..`` only (query rows and keys, index
    ``position - n``), each row renormalised over its unmasked keys; ``token_meta`` counts
    from ``n`` too and names it (``mask_prefix``)."""
    out = []
    masked = seq.capture.params.mask_prefix
    prompt_len = max(len(seq.prompt_token_ids) - masked, 0)
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
                           "lang_ranges": [{"start": 0, "end": prompt_len}], "mask_prefix": masked},
        })
    return out
