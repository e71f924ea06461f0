"""Which query rows of a step are captured in which layers, and their capture results.

Built by the model runner before the forward pass; the attention layers fill in the
results for their layer; the engine turns them into wire records after the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from attnscope.capture import SKETCH_HUBS
from attnscope.engine.sequence import Sequence
from attnscope.kernels.capture_reference import CaptureRequest, CaptureResult


@dataclass
class CaptureRow:
    """One captured query: a token of the step's flattened batch."""

    seq: Sequence
    token_index: int
    position: int
    decode_step: int | None
    think_phase: str
    block_table: list[int]


@dataclass
class LayerCapture:
    """The rows capturing one layer with one kind of logits (rotated or de-rotated)."""

    rows: list[CaptureRow]
    derotate: bool
    top_k: int
    result: CaptureResult | None = None


@dataclass
class FullCapture:
    """Rows of the full-matrix mode in one layer, and their per-head probabilities ``[R, Hq, P+1]``."""

    rows: list[CaptureRow]
    probs: list[torch.Tensor] = field(default_factory=list)


@dataclass
class StepCapture:
    """Everything captured in one step, keyed by layer."""

    layers: dict[int, list[LayerCapture]] = field(default_factory=dict)
    full: dict[int, FullCapture] = field(default_factory=dict)
    _settings: dict[tuple, tuple[torch.Tensor, CaptureRequest]] = field(default_factory=dict)

    def add(self, row: CaptureRow) -> None:
        """Register a row in every layer its request captures."""
        cap = row.seq.capture
        if cap.is_full:
            for layer in cap.layers:
                self.full.setdefault(layer, FullCapture([])).rows.append(row)
            return
        need_k = {"raw": cap.params.top_k, "sketch": SKETCH_HUBS, "fingerprint": 0}[cap.params.mode]
        for layer in cap.layers:
            groups = self.layers.setdefault(layer, [])
            group = next((g for g in groups if g.derotate == cap.params.derotate), None)
            if group is None:
                group = LayerCapture([], cap.params.derotate, 0)
                groups.append(group)
            group.rows.append(row)
            group.top_k = max(group.top_k, need_k)

    def request(self, group: LayerCapture, q: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor] | None) -> CaptureRequest:
        """The kernel request of a group: its rows' queries, tables and per-row settings.

        Layers capturing the same rows share one copy of the per-row tensors, built at
        the first of them, so only the queries are gathered per layer.
        """
        key = (tuple(id(r) for r in group.rows), group.top_k)
        if key not in self._settings:
            self._settings[key] = _row_settings(group, q.device)
        index, template = self._settings[key]
        return replace(template, q=q[index], rope_cos=rope[0] if rope is not None else None,
                       rope_sin=rope[1] if rope is not None else None)

    @property
    def empty(self) -> bool:
        """True when nothing is captured this step."""
        return not self.layers and not self.full


def row_block_tables(rows: list[CaptureRow], device: torch.device) -> torch.Tensor:
    """The rows' block tables padded with block 0 into ``[R, max_blocks]`` int32."""
    width = max(len(r.block_table) for r in rows)
    return torch.tensor([r.block_table + [0] * (width - len(r.block_table)) for r in rows],
                        dtype=torch.int32, device=device)


def _row_settings(group: LayerCapture, device: torch.device) -> tuple[torch.Tensor, CaptureRequest]:
    """The rows' token indices and a request holding everything but the queries (built once per step)."""
    rows = group.rows

    def ints(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)

    params = [r.seq.capture.params for r in rows]
    template = CaptureRequest(
        q=torch.empty(0, device=device),
        block_tables=row_block_tables(rows, device),
        query_pos=ints([r.position for r in rows]),
        head_weights=torch.stack([r.seq.capture.head_weights for r in rows]).to(device),
        mask_prefix=ints([p.mask_prefix for p in params]),
        window=ints([p.window for p in params]),
        sink_tokens=ints([p.sink_tokens for p in params]),
        top_k=group.top_k,
    )
    return torch.tensor([r.token_index for r in rows], device=device), template
