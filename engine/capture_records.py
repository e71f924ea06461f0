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
import math
from dataclasses import dataclass

import numpy as np
import torch

from attnscope.capture import SKETCH_HUBS
from attnscope.engine.capture_plan import CaptureRow, StepCapture
from attnscope.engine.sequence import Sequence
from attnscope.kernels.capture_reference import entropy_norm, fingerprint_v1
from attnscope.zones import classify, is_periodic


@dataclass
class LayerRow:
    """One row's capture in one layer, on the host."""

    positions: list[int]
    probs: list[float]
    lse: list[float]
    hist: list[float]
    entropy: float
    sink_mass: float
    num_stat_positions: int


def step_records(step: StepCapture) -> dict[int, list[dict]]:
    """Wire records of a step's captured rows, per sequence id, in position order."""
    per_row: dict[tuple[int, int], tuple[CaptureRow, dict[int, LayerRow]]] = {}
    for layer, groups in step.layers.items():
        for group in groups:
            res = group.result
            host = {name: getattr(res, name).cpu() if getattr(res, name) is not None else None
                    for name in ("lse", "hist", "entropy", "sink_mass", "num_stat_positions", "topk_pos", "topk_prob")}
            for i, row in enumerate(group.rows):
                positions: list[int] = []
                probs: list[float] = []
                if host["topk_pos"] is not None:
                    keep = host["topk_pos"][i] >= 0
                    positions = host["topk_pos"][i][keep].tolist()
                    probs = host["topk_prob"][i][keep].tolist()
                key = (row.seq.seq_id, row.position)
                per_row.setdefault(key, (row, {}))[1][layer] = LayerRow(
                    positions, probs, host["lse"][i].tolist(), host["hist"][i].tolist(),
                    float(host["entropy"][i]), float(host["sink_mass"][i]), int(host["num_stat_positions"][i]))
    records: dict[int, list[dict]] = {}
    for (seq_id, _), (row, layers) in sorted(per_row.items(), key=lambda kv: kv[0]):
        records.setdefault(seq_id, []).append(_record(row, layers))
    return records


def _record(row: CaptureRow, layers: dict[int, LayerRow]) -> dict:
    """One wire entry for one captured row."""
    cap = row.seq.capture
    mode = cap.params.mode
    base = {"decode_step": row.decode_step, "query_position": row.position, "think_phase": row.think_phase}
    if row.decode_step is None:
        base["prompt"] = True
    if mode == "fingerprint":
        return {**_fingerprint(row, layers), **base}
    if mode == "sketch":
        sketches = {str(layer): _sketch(row, data) for layer, data in sorted(layers.items())}
        periodic = any(is_periodic([row.position - p for p in d.positions], d.probs) for d in layers.values())
        manifold = classify(_fingerprint(row, layers)["fingerprint"], periodic)
        return {"mode": "sketch", "layer_sketches": sketches, "manifold": manifold, **base}
    raws = {layer: _raw(row, data) for layer, data in sorted(layers.items())}
    if len(raws) == 1:
        (layer, data), = raws.items()
        return {**data, "layer_id": layer, **base}
    return {"layers": {str(layer): data for layer, data in raws.items()}, **base}


def _raw(row: CaptureRow, data: LayerRow) -> dict:
    """Raw top-k fields of one layer (DESIGN.md: true probabilities, renormalised scores, logits)."""
    cap = row.seq.capture
    n = cap.params.mask_prefix
    k = cap.params.top_k
    probs = data.probs[:k]
    mass = sum(probs)
    heads = cap.params.head_ids
    if heads is not None and len(heads) == 1:
        lse = data.lse[heads[0]]
        logits = [math.log(p) + lse if p > 0 else -math.inf for p in probs]
    else:
        lse = 0.0
        logits = [math.log(p) if p > 0 else -math.inf for p in probs]
    return {
        "token_positions": [p - n for p in data.positions[:k]],
        "attention_scores": [p / mass for p in probs] if mass > 0 else [0.0 for _ in probs],
        "topk_logits": logits,
        "logsumexp_candidates": lse,
        "true_probs": probs,
        "topk_mass": mass,
    }


def _sketch(row: CaptureRow, data: LayerRow) -> dict:
    """Sketch fields of one layer: hubs, distance histogram, entropy, captured mass."""
    n = row.seq.capture.params.mask_prefix
    hubs = [[p - n, m] for p, m in zip(data.positions[:SKETCH_HUBS], data.probs[:SKETCH_HUBS])]
    return {
        "top_hubs": hubs,
        "dist_hist": data.hist,
        "entropy": data.entropy,
        "mass_captured": sum(m for _, m in hubs),
        "sink_mass": data.sink_mass,
    }


def _fingerprint(row: CaptureRow, layers: dict[int, LayerRow]) -> dict:
    """Fingerprint v1: the mean over captured layers of ``[local, mid, long, entropy, hist...]``."""
    hist = torch.tensor([d.hist for d in layers.values()])
    entropy = torch.tensor([d.entropy for d in layers.values()])
    count = torch.tensor([d.num_stat_positions for d in layers.values()])
    vector = fingerprint_v1(hist, entropy, count).mean(dim=0).tolist()
    return {
        "fingerprint": vector,
        "schema_version": 1,
        "manifold": classify(vector),
        "step": row.decode_step,
        "sink_mass": float(np.mean([d.sink_mass for d in layers.values()])),
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
