"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket and capture layout.

A decode step of a small batch is hundreds of small kernels, so launching them costs more
than running them. ``DecodeGraphs`` records the whole decode forward (embedding to
logits, attention capture included) once per batch bucket and replays it: a step costs
one host-to-device copy and one graph launch.

Everything a step varies lives in one int32 staging buffer per graph, filled on the host
(pinned memory) and copied with one asynchronous copy: token ids, positions, cache slots,
context lengths, the capture rows' settings (head weights as float32 bits) and, last,
the block tables stored column-major, so the copy only spans the columns in use. Inside
the graph one transpose turns the tables row-major for the kernels.

Padding rows (batch ``B`` rounded up to the bucket) have slot ``-1`` (nothing written)
and context length 0 (nothing read). Captured rows are padded the same way: row sets
(the distinct sets of rows capturing a layer) are rounded up to a bucket, padding rows
match no decode row (``decode_rows = -1``), and their results are never read.

A graph's layout is keyed by the rows-per-set buckets and, per captured group of a layer, the
row set, ``top_k``, whether it computes statistics and whether it reads de-rotated logits (a
standalone capture on the un-rotated queries, recorded beside the decode kernel that fuses the
layer's rotated group); the no-capture graph of every bucket
is recorded when the engine starts, capture layouts when first seen (at most
``MAX_LAYOUT_GRAPHS``, least recently used dropped); ``warm_capture`` compiles their
kernels at start-up (the de-rotated standalone captures among them). Steps with
prefill chunks or full-matrix capture run eagerly. Results of a replay live in the
graph's memory until the next replay: the engine queues what reads them (sampling, host
copies of capture results) before it launches again. A step launched before the host has
read the previous step's tokens (``EngineConfig.overlap_steps``) marks those inputs with
a token source: the graph reads them from ``previous``, where the previous step's
sampled ids are copied on the device. Each graph has two pinned host buffers used in
turn, so filling one never races the copy of the step before, which may still be queued.

On a tensor-parallel rank the plan arrives without sequences (``StepCapture.shipped``):
row settings come from its CPU-finalized settings instead, the graphs record the rank's
all-reduces, and a captured layer yields the rank's partial (its heads) rather than a
result; the rank worker sums the partials across ranks after the replay.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from attnscope.engine.attention import AttentionBatch, standalone_capture, standalone_partial
from attnscope.engine.capture_plan import LayerCapture, StepCapture, row_columns
from attnscope.engine.capture_records import pack_results
from attnscope.engine.launch_shapes import BATCH_BUCKETS, PROMPT_LAUNCH_ROWS, LaunchShapes, bucket
from attnscope.engine.model import LlamaForCausalLM
from attnscope.engine.device_values import read_pending_tokens
from attnscope.engine.rank_capture import finish_summed
from attnscope.kernels.capture_reference import CaptureRequest

MAX_LAYOUT_GRAPHS = 16
WARM_THREADS = 16  # most threads compiling capture kernels at start-up
# Staging fields start on 16 bytes: Triton compiles a kernel variant per pointer alignment it sees, so
# unaligned fields (offsets that vary with the bucket and row sets) multiplied the capture kernels' variants.
_FIELD_ALIGN = 4
_ROW_FIELDS = ("gather", "decode_rows", "query_pos", "mask_prefix", "window", "sink_tokens")


@dataclass(frozen=True)
class CaptureLayout:
    """What a graph's capture looks like: padded size of each row set; per captured group, in the plan's order
    (ascending layers, a layer's groups in turn), ``(layer, row set, top_k, statistics, derotate)``."""

    row_sets: tuple[int, ...]
    layers: tuple[tuple[int, int, int, bool, bool], ...]


@dataclass
class RowSet:
    """Rows capturing some layers of a step: token indices, integer settings (``row_columns``) and head weights
    ``[R, Hq]`` float32 over all heads, as host values for the staging buffer."""

    indices: list[int]
    columns: dict[str, list[int]]
    head_weights: np.ndarray


def _row_set(group: LayerCapture) -> RowSet:
    """A group's rows: from its sequences (the engine's plan) or, in a plan shipped to a tensor-parallel rank
    (no sequences), from its settings finalized on the CPU."""
    if group.rows:
        rows = group.rows
        return RowSet([r.token_index for r in rows], row_columns(rows),
                      np.stack([r.seq.capture.head_weights.numpy() for r in rows]))
    settings, n = group.settings, len(group.token_indices)  # settings may be padded to launch shapes past n rows
    columns = {name: getattr(settings, name)[:n].tolist()
               for name in ("query_pos", "mask_prefix", "window", "sink_tokens")}
    return RowSet(list(group.token_indices), columns, settings.head_weights[:n].numpy())


def capture_layout(capture: StepCapture, batch: int) -> tuple[CaptureLayout, list[RowSet]] | None:
    """The layout of a step's capture and its row sets; ``None`` if no graph can run it (full-matrix capture).

    A layer may hold a group of rotated and one of de-rotated logits: the first rides inside the
    decode kernel, the second runs the standalone capture on the un-rotated queries, both recorded."""
    if capture.full:
        return None
    sets: dict[tuple[int, ...], int] = {}
    members: list[RowSet] = []
    layers = []
    for layer in sorted(capture.layers):
        for group in capture.layers[layer]:
            key = tuple(row.token_index for row in group.rows) if group.rows else tuple(group.token_indices)
            if key not in sets:
                sets[key] = len(members)
                members.append(_row_set(group))
            layers.append((layer, sets[key], group.top_k, group.statistics, group.derotate))
    return CaptureLayout(tuple(bucket(len(rows.indices), batch) for rows in members), tuple(layers)), members


@dataclass
class _Staging:
    """Offsets of a graph's fields in its int32 staging buffer (each on 16 bytes; tables last, ``[width, batch]``
    column-major)."""

    batch: int
    width: int
    num_heads: int
    row_sets: tuple[int, ...]
    fields: dict[str, slice] = field(default_factory=dict)
    size: int = 0

    def __post_init__(self) -> None:
        for name in ("input_ids", "token_sources", "positions", "slots", "context_lens"):
            self._add(name, self.batch)
        for s, rows in enumerate(self.row_sets):
            for name in _ROW_FIELDS:
                self._add(f"{name}{s}", rows)
            self._add(f"head_weights{s}", rows * self.num_heads)
        self._add("tables", self.width * self.batch)

    def _add(self, name: str, length: int) -> None:
        start = -(-self.size // _FIELD_ALIGN) * _FIELD_ALIGN
        self.fields[name] = slice(start, start + length)
        self.size = start + length

    def view(self, buffer: torch.Tensor | np.ndarray, name: str) -> torch.Tensor | np.ndarray:
        """The field ``name`` of a staging buffer."""
        return buffer[self.fields[name]]


@dataclass
class _DecodeGraph:
    """One recorded decode step: its staging buffers, its capture plan and its outputs."""

    staging: _Staging
    layout: CaptureLayout | None
    host: torch.Tensor
    spare: torch.Tensor  # the other host buffer: a step fills one while the last step's copy may read the other
    device: torch.Tensor
    plan: StepCapture | None = None
    logits: torch.Tensor | None = None
    packed: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None

    @property
    def host_array(self) -> np.ndarray:
        """The pinned host staging buffer as a numpy int32 array (filled in place)."""
        return self.host.numpy()


class DecodeGraphs:
    """Records and replays decode steps of one model over its KV cache.

    ``replay=False`` runs the same static-buffer forward without recording a graph, so the
    padding and staging logic is testable (and identical) on the CPU. ``prompt_launch_rows``:
    ``LaunchShapes.prompt_rows`` of eager steps.
    """

    def __init__(self, model: LlamaForCausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 max_batch: int, max_blocks_per_seq: int, device: torch.device, replay: bool = True,
                 prompt_launch_rows: int = PROMPT_LAUNCH_ROWS) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.max_batch = bucket(min(max_batch, BATCH_BUCKETS[-1]))
        self.width = max_blocks_per_seq
        self.prompt_launch_rows = prompt_launch_rows
        self.device = device
        self.replay = replay
        self.num_heads = model.config.num_heads  # head weights cover all heads; a rank uses its own
        self._plain: dict[int, _DecodeGraph] = {}
        self._layouts: OrderedDict[tuple[int, CaptureLayout], _DecodeGraph] = OrderedDict()
        self._pool = torch.cuda.graph_pool_handle() if replay else None
        self.previous = torch.zeros(self.max_batch, dtype=torch.int32, device=device)
        """The previous step's sampled tokens, where inputs with a token source read them."""
        self.replays = 0
        """Decode steps run through a graph so far."""

    def record_plain(self) -> None:
        """Record the no-capture graph of every batch bucket, largest first (smaller ones reuse its memory)."""
        for batch in reversed([b for b in BATCH_BUCKETS if b <= self.max_batch]):
            self._graph(batch, None)

    def run(self, input_ids: list[int], positions: list[int], slots: list[int], tables: list[np.ndarray],
            context_lens: list[int], num_prefill_chunks: int, capture: StepCapture | None,
            token_sources: list[int] | None = None, previous_tokens: torch.Tensor | None = None,
            ) -> torch.Tensor | None:
        """Replay (or record, first time) the graph of a pure decode step; logits ``[B, vocab]`` float32.

        Returns ``None``, doing nothing, for a step no graph runs (prefill chunks, a batch
        over ``max_batch``, full-matrix capture). Fills ``capture``'s groups'
        results with views of the graph's outputs (rows past each group's own rows are padding).
        Inputs with a ``token_sources`` row >= 0 read ``previous_tokens[row]`` on the device.
        """
        batch = len(input_ids)
        if num_prefill_chunks or not batch or batch > self.max_batch:
            return None
        if previous_tokens is not None and len(previous_tokens) > len(self.previous):
            return None
        padded = bucket(batch, self.max_batch)
        layout, members = None, []
        if capture is not None:
            found = capture_layout(capture, padded)
            if found is None:
                return None
            layout, members = found
        graph = self._graph(padded, layout)
        graph.host, graph.spare = graph.spare, graph.host
        used = self._fill(graph, input_ids, positions, slots, tables, context_lens, members, token_sources or [])
        graph.device[:used].copy_(graph.host[:used], non_blocking=True)
        if previous_tokens is not None:
            self.previous[: len(previous_tokens)].copy_(previous_tokens)
        self.replays += 1
        if graph.graph is not None:
            graph.graph.replay()
        else:
            graph.logits = self._forward(graph)
        if capture is not None:
            for layer, groups in capture.layers.items():
                for ours, recorded in zip(groups, graph.plan.layers[layer], strict=True):
                    ours.result, ours.partial = recorded.result, recorded.partial
            capture.packed = graph.packed
        return graph.logits[:batch]

    def _graph(self, batch: int, layout: CaptureLayout | None) -> _DecodeGraph:
        """The graph for a bucket and layout, recorded on first use."""
        if layout is None and batch in self._plain:
            return self._plain[batch]
        key = (batch, layout)
        if layout is not None and key in self._layouts:
            self._layouts.move_to_end(key)
            return self._layouts[key]
        graph = self._padded_graph(batch, layout, pinned=self.replay)
        if self.replay:
            self._record(graph)
        if layout is None:
            self._plain[batch] = graph
        else:
            self._layouts[key] = graph
            if len(self._layouts) > MAX_LAYOUT_GRAPHS:
                self._layouts.popitem(last=False)
        return graph

    def warm_capture(self, layer_sets: list[list[int]], needs: list[tuple[int, bool]]) -> int:
        """Compile the capture kernels the graphs may launch before the first request needs them.

        Triton compiles a kernel variant at its first launch: seconds each for the capture
        finish, once in the middle of serving for every new batch shape. This runs (without
        recording) the capture forward of every batch bucket with each bucket of capturing rows
        up to it, for each set of layers and each ``(top_k, statistics)`` a layer may need.
        Each batch bucket's forwards run in turn on one thread, the buckets on up to
        ``WARM_THREADS`` threads at once (Triton compiles largely outside the GIL), unless the
        model is split over ranks, whose all-reduces must come in the same order on every rank.
        Threads that reach one variant at the same time both compile it: in a start-up trace on
        an H100 (Llama-1B shape, 32 sequences) 46 distinct finish variants took 80 compiles, and
        one thread per (layer set, need) instead, which compiled fewer, came up later; one per
        (batch bucket, row bucket) pair raced more (161 compiles, up in 98.6 s, against 97 compiles
        and 70-73 s with a thread per bucket).
        Each bucket also runs the standalone capture (``attention_capture``) of as many rows
        for each need, on rotated and on de-rotated logits, at the graphs' table width: eager
        steps capture a request's first token (produced by its prefill) that way, padded to
        these shapes (``LaunchShapes``), and so do de-rotated captures inside the graphs; so
        does a launch of ``LaunchShapes.launch_rows`` rows, the launches prompt attention runs in.
        On a tensor-parallel rank these are the rank's partials, and rank 0 also ranks their
        ``p̄`` as it ranks the summed partials after every capturing step (``finish_summed``).
        Returns how many forwards and standalone captures ran.
        """
        buckets = list(reversed([b for b in BATCH_BUCKETS if b <= self.max_batch]))
        standalone = [(*need, derotate) for need in needs for derotate in (False, True)]
        prompt_launches = [rows for rows in (self.shapes.launch_rows,) if rows > self.max_batch]

        def warm_standalone(rows: int) -> int:
            for top_k, statistics, derotate in standalone:
                self._warm_standalone(rows, top_k, statistics, derotate)
            return len(standalone)

        def warm_bucket(batch: int) -> int:
            layouts = [CaptureLayout((rows,), tuple((layer, 0, top_k, statistics, False) for layer in layers))
                       for rows in reversed([r for r in BATCH_BUCKETS if r <= batch])
                       for layers in layer_sets for top_k, statistics in needs]
            for layout in layouts:
                self._forward(self._padded_graph(batch, layout, pinned=False))
            return len(layouts) + warm_standalone(batch)

        threads = 1 if self.model.tp.size > 1 else min(WARM_THREADS, len(buckets), os.cpu_count() or 1)
        with ThreadPoolExecutor(threads) as pool:
            prompt_runs = pool.map(warm_standalone, prompt_launches)  # queued first, beside the buckets
            runs = sum(pool.map(warm_bucket, buckets)) + sum(prompt_runs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return runs

    @property
    def shapes(self) -> LaunchShapes:
        """The launch shapes of these graphs, which eager capture steps use too."""
        return LaunchShapes(self.max_batch, self.width, self.prompt_launch_rows)

    def _warm_standalone(self, rows: int, top_k: int, statistics: bool, derotate: bool) -> None:
        """Run the standalone capture of ``rows`` padding rows (position 0, every head) at the graphs' table width,
        on de-rotated logits when ``derotate`` (the model's rope tables given: a kernel variant of its own; on the
        CPU its float32 twin, as eager steps there). On a tensor-parallel rank: the partial of the rank's heads
        (``standalone_partial``), which rank 0 then finishes (``finish_summed``) as it finishes summed ones."""
        k_cache = self.kv_caches[0][0]
        config, tp = self.model.config, self.model.tp
        heads = len(self.model.heads.q_heads)
        ints = {"dtype": torch.int32, "device": self.device}
        zeros = torch.zeros(rows, **ints)
        request = CaptureRequest(
            q=torch.zeros((rows, heads, config.head_dim), dtype=k_cache.dtype, device=self.device),
            block_tables=torch.zeros((rows, self.width), **ints), query_pos=zeros,
            head_weights=torch.full((rows, heads), 1.0 / config.num_heads, device=self.device),
            mask_prefix=zeros, window=zeros, sink_tokens=zeros, top_k=top_k, statistics=statistics,
            rope_cos=self.model.rope.cos if derotate else None, rope_sin=self.model.rope.sin if derotate else None)
        scale = config.head_dim ** -0.5
        if tp.size == 1:
            standalone_capture(k_cache, request, scale)
            return
        partial = standalone_partial(k_cache, request, scale)
        if tp.rank == 0:
            finish_summed(partial, top_k)

    def _padded_graph(self, batch: int, layout: CaptureLayout | None, pinned: bool) -> _DecodeGraph:
        """A new graph's staging for a bucket and layout, filled with padding (not recorded). Its host buffers
        are page-locked only when ``pinned`` (a graph that will be replayed, whose inputs are copied
        asynchronously); a warm-up forward that is run once and dropped needs no page-locked memory."""
        staging = _Staging(batch, self.width, self.num_heads, layout.row_sets if layout else ())
        host, spare = (torch.zeros(staging.size, dtype=torch.int32, pin_memory=pinned) for _ in range(2))
        graph = _DecodeGraph(staging, layout, host, spare,
                             torch.zeros(staging.size, dtype=torch.int32, device=self.device))
        self._pad(graph)
        return graph

    def _pad(self, graph: _DecodeGraph) -> None:
        """Fill a new graph's staging buffers with padding only (what it records with: nothing read or written)."""
        st = graph.staging
        for host in (graph.host.numpy(), graph.spare.numpy()):
            st.view(host, "slots")[:] = -1
            st.view(host, "token_sources")[:] = -1
            for s, rows in enumerate(st.row_sets):
                st.view(host, f"decode_rows{s}")[:] = -1
                st.view(host, f"head_weights{s}").view(np.float32)[:] = 1.0 / st.num_heads
        graph.device.copy_(graph.host)

    def _record(self, graph: _DecodeGraph) -> None:
        """Warm up on a side stream (compiles kernels, sizes workspaces), then record the forward."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._forward(graph)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph.graph, pool=self._pool):
            graph.logits = self._forward(graph)

    def _forward(self, graph: _DecodeGraph) -> torch.Tensor:
        """The decode forward over the graph's device staging buffer (recorded once, or run as is)."""
        st, buf = graph.staging, graph.device
        batch = st.batch
        tables = st.view(buf, "tables").view(st.width, batch).t().contiguous()
        graph.plan = self._capture_plan(graph, tables) if graph.layout is not None else None
        attention = AttentionBatch(
            slot_mapping=st.view(buf, "slots"),
            prefills=[],
            decode_start=0,
            decode_block_tables=tables,
            decode_context_lens=st.view(buf, "context_lens"),
            kv_caches=self.kv_caches,
            capture=graph.plan,
            rope=(self.model.rope.cos, self.model.rope.sin),
            q_heads=self.model.heads.q_heads if self.model.tp.size > 1 else None,
        )
        input_ids = read_pending_tokens(st.view(buf, "input_ids"), st.view(buf, "token_sources"), self.previous)
        hidden = self.model(input_ids, st.view(buf, "positions"), attention)
        logits = self.model.logits(hidden)
        graph.packed = pack_results(graph.plan) if graph.plan is not None and self.model.tp.size == 1 else None
        return logits

    def _capture_plan(self, graph: _DecodeGraph, tables: torch.Tensor) -> StepCapture:
        """A finalized capture plan whose per-row tensors are views of the staging buffer."""
        st, buf = graph.staging, graph.device
        settings = []
        for s, rows in enumerate(st.row_sets):
            fields = {name: st.view(buf, f"{name}{s}") for name in _ROW_FIELDS}
            gather, decode_rows = fields.pop("gather"), fields.pop("decode_rows")
            settings.append((gather, decode_rows, CaptureRequest(
                q=torch.empty(0, device=self.device),
                block_tables=tables.index_select(0, gather),
                head_weights=st.view(buf, f"head_weights{s}").view(torch.float32).view(rows, st.num_heads),
                **fields,
            )))
        plan = StepCapture(device=self.device)
        for layer, s, top_k, statistics, derotate in graph.layout.layers:
            gather, decode_rows, request = settings[s]
            plan.layers.setdefault(layer, []).append(LayerCapture(
                [], derotate=derotate, top_k=top_k, token_indices=list(range(st.row_sets[s])), index=gather,
                settings=replace(request, top_k=top_k, statistics=statistics), decode_rows=decode_rows,
                statistics=statistics))
        return plan

    def _fill(self, graph: _DecodeGraph, input_ids: list[int], positions: list[int], slots: list[int],
              tables: list[np.ndarray], context_lens: list[int], members: list[RowSet],
              token_sources: list[int]) -> int:
        """Write a step into the graph's host staging; returns how many leading entries to copy."""
        st, host = graph.staging, graph.host_array
        batch = len(input_ids)
        for name, values, filler in (("input_ids", input_ids, 0), ("token_sources", token_sources or -1, -1),
                                     ("positions", positions, 0), ("slots", slots, -1),
                                     ("context_lens", context_lens, 0)):
            view = st.view(host, name)
            view[:batch] = values
            view[batch:] = filler
        for s, rows in enumerate(members):
            size, n = st.row_sets[s], len(rows.indices)
            columns = {"gather": rows.indices, "decode_rows": rows.indices, **rows.columns}
            for name, values in columns.items():
                view = st.view(host, f"{name}{s}")
                view[:n] = values
                view[n:] = -1 if name == "decode_rows" else 0
            st.view(host, f"head_weights{s}").view(np.float32).reshape(size, -1)[:n] = rows.head_weights
        used = max(len(t) for t in tables)
        grid = st.view(host, "tables").reshape(st.width, st.batch)
        for column, table in enumerate(tables):  # entries past a row's length are never read
            grid[: len(table), column] = table
        grid[:used, batch:] = 0
        return st.fields["tables"].start + used * st.batch
