"""Which query rows of a step are captured in which layers, and their capture results.

Built from the step plan before the forward pass (``finalize`` turns the rows into the
per-row tensors the kernels read); the attention layers fill in the results for their
layer; the engine turns them into wire records after the step. ``shipped`` is the same
plan without the sequences, for tensor-parallel rank workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from attnscope.capture import SKETCH_HUBS, CaptureParams
from attnscope.engine.sequence import Sequence
from attnscope.kernels.capture_reference import CaptureRequest, CaptureResult, PartialCapture

if TYPE_CHECKING:
    from attnscope.engine.launch_shapes import LaunchShapes
    from attnscope.engine.rank_capture import RankCaptures


@dataclass
class CaptureRow:
    """One captured query: a token of the step's flattened batch."""

    seq: Sequence
    token_index: int
    position: int
    decode_step: int | None
    block_table: np.ndarray  # int32, the sequence's block table this step


@dataclass
class LayerCapture:
    """The rows capturing one layer with one kind of logits (rotated or de-rotated).

    ``token_indices`` (the rows' token indices in the step, on the host), ``index`` (the
    same on the device) and ``settings`` (a request holding everything but the queries)
    are set by ``StepCapture.finalize``; ``result`` by the attention layer (``partial``
    instead on a tensor-parallel rank). ``decode_rows`` is set in CUDA-graph steps only:
    the rows' decode-batch indices, ``-1`` for padding rows, which the fused decode
    kernel then captures in one launch over the whole batch. ``statistics``: whether any row
    reports the distance histogram, entropy or sink mass (sketch and fingerprint rows; raw
    top-k rows report none, so a raw-only group skips them).
    """

    rows: list[CaptureRow]
    derotate: bool
    top_k: int
    token_indices: list[int] = field(default_factory=list)
    index: torch.Tensor | None = None
    settings: CaptureRequest | None = None
    result: CaptureResult | None = None
    partial: PartialCapture | None = None
    decode_rows: torch.Tensor | None = None
    statistics: bool = False


@dataclass
class FullCapture:
    """Rows of the full-matrix mode in one layer, and their per-head probabilities ``[Hq, P + 1 - mask_prefix]``.

    ``index``, ``positions``, ``block_tables`` and the rows' ``mask_prefix`` and ``derotate``
    settings are set by ``StepCapture.finalize``.
    """

    rows: list[CaptureRow]
    probs: list[torch.Tensor] = field(default_factory=list)
    index: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    mask_prefix: list[int] = field(default_factory=list)
    derotate: list[bool] = field(default_factory=list)


@dataclass
class StepCapture:
    """Everything captured in one step, keyed by layer."""

    layers: dict[int, list[LayerCapture]] = field(default_factory=dict)
    full: dict[int, FullCapture] = field(default_factory=dict)
    device: torch.device | None = None
    """Where the per-row tensors live: ``None`` until ``finalize`` builds them."""
    packed: torch.Tensor | None = None
    """The results already packed for the host (``capture_records.pack_results``), by a CUDA graph."""
    _groups: dict[tuple[int, bool], LayerCapture] = field(default_factory=dict, repr=False)

    def add(self, row: CaptureRow) -> None:
        """Register a row in every layer its request captures."""
        cap = row.seq.capture
        if cap.is_full:
            for layer in cap.layers:
                self.full.setdefault(layer, FullCapture([])).rows.append(row)
            return
        params = cap.params
        need_k, statistics = layer_needs(params)
        for layer in cap.layers:
            group = self._groups.get((layer, params.derotate))
            if group is None:
                group = self._groups[layer, params.derotate] = LayerCapture([], params.derotate, 0)
                self.layers.setdefault(layer, []).append(group)
            group.rows.append(row)
            if need_k > group.top_k:
                group.top_k = need_k
            group.statistics = group.statistics or statistics

    def finalize(self, device: torch.device, shapes: LaunchShapes | None = None) -> None:
        """Build every group's per-row tensors on ``device``, once per step.

        Layers capturing the same rows share one copy, so per layer at most the queries are
        gathered (``request``; the fused decode kernel needs not even those). A plan finalized
        elsewhere (shipped to a tensor-parallel rank on the CPU) is moved instead. With
        ``shapes`` (an eager step of an engine with decode graphs) every group's settings are
        padded to the graphs' launch shapes: rows to a bucket, or past the largest to whole
        launches of ``shapes.launch_rows`` (position 0, every head, no mask; results past the
        group's own rows are not read), block tables to the graphs' width.
        """
        if self.device is not None:
            if self.device != device:
                self.to(device)
            return
        self.device = device
        built: dict[tuple, tuple[torch.Tensor, CaptureRequest]] = {}
        for groups in self.layers.values():
            for group in groups:
                key = (tuple(id(r) for r in group.rows), group.top_k, group.statistics)
                if key not in built:
                    built[key] = _row_settings(group, device, shapes)
                group.index, group.settings = built[key]
                group.token_indices = [r.token_index for r in group.rows]
        for full in self.full.values():
            full.index = torch.tensor([r.token_index for r in full.rows], device=device)
            full.positions = torch.tensor([r.position for r in full.rows], device=device)
            full.block_tables = block_table_tensor([r.block_table for r in full.rows], device)
            full.mask_prefix = [r.seq.capture.params.mask_prefix for r in full.rows]
            full.derotate = [r.seq.capture.params.derotate for r in full.rows]

    def shipped(self, shapes: LaunchShapes | None = None) -> StepCapture:
        """The plan, finalized on the CPU, without the sequences (what a tensor-parallel rank needs); with
        ``shapes`` (the ranks' decode graphs' launch shapes) its settings are padded to them, as an eager step
        on one device pads them (``finalize``)."""
        self.finalize(torch.device("cpu"), shapes)
        return StepCapture(
            layers={layer: [LayerCapture([], g.derotate, g.top_k, g.token_indices, g.index, g.settings,
                                         statistics=g.statistics)
                            for g in groups]
                    for layer, groups in self.layers.items()},
            full={layer: FullCapture([], index=f.index, positions=f.positions, block_tables=f.block_tables,
                                     mask_prefix=f.mask_prefix, derotate=f.derotate)
                  for layer, f in self.full.items()},
            device=self.device,
        )

    def to(self, device: torch.device) -> StepCapture:
        """The plan's per-row tensors moved to ``device`` (in place; returns self); groups that shared
        settings still share one copy."""
        self.device = device
        moved: dict[int, tuple[torch.Tensor, CaptureRequest]] = {}
        for groups in self.layers.values():
            for g in groups:
                key = id(g.settings)
                if key not in moved:
                    moved[key] = g.index.to(device), _settings_to(g.settings, device)
                g.index, g.settings = moved[key]
        for f in self.full.values():
            f.index, f.positions, f.block_tables = f.index.to(device), f.positions.to(device), f.block_tables.to(device)
        return self

    def fill_from_ranks(self, captures: RankCaptures) -> None:
        """Take the results tensor-parallel ranks finished for this plan (as ``shipped`` ran it)."""
        for layer, groups in self.layers.items():
            for group, result in zip(groups, captures.layers[layer]):
                group.result = result
        for layer, full in self.full.items():
            full.probs = captures.full[layer]

    @staticmethod
    def request(group: LayerCapture, q: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                heads: range | None = None, gather_queries: bool = True) -> CaptureRequest:
        """The kernel request of a finalized group: its rows' queries and per-row settings.

        ``heads``: the query heads ``q`` holds (a tensor-parallel rank's); their slice of
        the head weights is used, so a rank's head sums add up across ranks. Without
        ``gather_queries`` the request's ``q`` is ``q``'s first row broadcast to the rows'
        shape (no kernel): for the fused decode kernel, which reads only its shape and takes
        the queries from the batch.
        """
        settings = group.settings
        weights = settings.head_weights if heads is None else settings.head_weights[:, heads.start:heads.stop]
        rows = settings.query_pos.shape[0]  # padded past the group's rows in an eager step with launch shapes
        if gather_queries:
            queries = q[group.index]
            if rows > queries.shape[0]:
                queries = torch.cat([queries, queries.new_zeros((rows - queries.shape[0], *queries.shape[1:]))])
        else:
            queries = q[:1].expand(rows, -1, -1)
        return replace(settings, q=queries, head_weights=weights.contiguous(),
                       rope_cos=rope[0] if rope is not None else None,
                       rope_sin=rope[1] if rope is not None else None)

    def sequences(self) -> dict[int, Sequence]:
        """The sequences with a row captured in this step, by id."""
        rows = [r for groups in self.layers.values() for g in groups for r in g.rows]
        rows += [r for f in self.full.values() for r in f.rows]
        return {r.seq.seq_id: r.seq for r in rows}

    @property
    def empty(self) -> bool:
        """True when nothing is captured this step."""
        return not self.layers and not self.full


def layer_needs(params: CaptureParams) -> tuple[int, bool]:
    """What a request asks of each layer it captures (not ``full``): the head-mean top-k width (raw:
    its ``top_k``; sketch: its hubs; fingerprint: 0) and whether it needs the statistics (all but raw)."""
    top_k = params.top_k if params.mode == "raw" else SKETCH_HUBS if params.mode == "sketch" else 0
    return top_k, params.mode != "raw"


def _settings_to(settings: CaptureRequest, device: torch.device) -> CaptureRequest:
    """A group's per-row settings (everything but the queries and rope tables) on ``device``."""
    return replace(settings, block_tables=settings.block_tables.to(device), query_pos=settings.query_pos.to(device),
                   head_weights=settings.head_weights.to(device), mask_prefix=settings.mask_prefix.to(device),
                   window=settings.window.to(device), sink_tokens=settings.sink_tokens.to(device))


def block_table_tensor(tables: list[np.ndarray], device: torch.device, num_rows: int = 0,
                       width: int = 0) -> torch.Tensor:
    """Block tables padded with block 0 into ``[max(B, num_rows), max(max_blocks, width, 1)]`` int32 (the
    padding past the tables' own blocks added on ``device``: the host copies only the blocks in use)."""
    padded = np.zeros((len(tables), max((len(t) for t in tables), default=1)), dtype=np.int32)
    for target, table in zip(padded, tables):
        target[: len(table)] = table
    return F.pad(torch.from_numpy(padded).to(device),
                 (0, max(0, width - padded.shape[1]), 0, max(0, num_rows - len(tables))))


def row_columns(rows: list[CaptureRow]) -> dict[str, list[int]]:
    """The captured rows' integer settings, by ``CaptureRequest`` field: query positions, mask
    prefixes, windows, sink tokens (the eager plan and the CUDA-graph staging both take them here)."""
    params = [r.seq.capture.params for r in rows]
    return {
        "query_pos": [r.position for r in rows],
        "mask_prefix": [p.mask_prefix for p in params],
        "window": [p.window for p in params],
        "sink_tokens": [p.sink_tokens for p in params],
    }


def _row_settings(group: LayerCapture, device: torch.device,
                  shapes: LaunchShapes | None) -> tuple[torch.Tensor, CaptureRequest]:
    """The rows' token indices and a request holding everything but the queries (built once per step), its
    settings padded to ``shapes`` when given (``StepCapture.finalize``)."""
    rows = group.rows
    num_rows = shapes.rows(len(rows)) if shapes is not None else len(rows)
    padding = num_rows - len(rows)
    columns = {name: torch.tensor(values + [0] * padding, dtype=torch.int32, device=device)
               for name, values in row_columns(rows).items()}
    weights = [r.seq.capture.head_weights for r in rows]
    weights += [torch.full_like(weights[0], 1.0 / weights[0].shape[0])] * padding
    template = CaptureRequest(
        q=torch.empty(0, device=device),
        block_tables=block_table_tensor([r.block_table for r in rows], device, num_rows,
                                        shapes.width if shapes is not None else 0),
        head_weights=torch.stack(weights).to(device),
        top_k=group.top_k,
        statistics=group.statistics,
        **columns,
    )
    return torch.tensor([r.token_index for r in rows], device=device), template
