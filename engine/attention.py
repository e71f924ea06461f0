"""Attention over the paged KV cache for one step's flattened tokens.

A step's tokens are laid out prefill chunks first, then one token per decoding sequence.
New keys and values are already in their cache slots (the layer's rotate-and-store kernel
wrote them), so every query attends to its sequence's tokens: a prefill chunk that starts
a sequence through ``scaled_dot_product_attention`` on its own keys; a chunk that
continues a cached prefix (prefix-cache hit, later chunk of a chunked prompt) at least as
long as itself through the paged prefill kernel on CUDA, all such chunks of a step in one
launch (shorter prefixes and the CPU: SDPA over its keys gathered from the cache); decode
tokens through the paged decode kernel (Triton on CUDA, its float32 torch twin on the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from attnscope.engine.capture_plan import LayerCapture, StepCapture
from attnscope.kernels.capture_reference import (CaptureRequest, CaptureResult, PartialCapture, capture_rows_ref,
                                                  partial_capture_ref)
from attnscope.kernels.full_attention import full_attention_rows
from attnscope.kernels.reference import gather_paged_kv

if TYPE_CHECKING:
    from attnscope.kernels.capture import DeferredFinish


@dataclass
class PrefillChunk:
    """Query tokens ``[start, end)`` of the step that continue one sequence after ``cached`` tokens."""

    start: int
    end: int
    cached: int
    block_table: torch.Tensor

    @property
    def context_len(self) -> int:
        """Tokens this chunk's last query attends to."""
        return self.cached + self.end - self.start


def runs_paged_prefill(cached: int, length: int) -> bool:
    """Whether a prefill chunk of ``length`` tokens after ``cached`` ones runs the paged prefill kernel (CUDA).

    When its cached prefix is at least as long as itself: on an H100 the kernel beat gathering
    the keys for SDPA by 15 % with 8K cached and 512 new tokens, while with as many new tokens
    as cached ones SDPA's flash kernel on the gathered keys was 16 % faster.
    """
    return cached >= length > 0


@dataclass
class CachedPrefills:
    """The step's prefill chunks that continue a cached prefix, as the paged prefill kernel takes them (int32)."""

    block_tables: torch.Tensor
    q_starts: torch.Tensor
    q_lens: torch.Tensor
    cached: torch.Tensor
    max_q_len: int


@dataclass
class AttentionBatch:
    """How the flattened tokens of one step map onto sequences and KV-cache slots."""

    slot_mapping: torch.Tensor
    prefills: list[PrefillChunk]
    decode_start: int
    decode_block_tables: torch.Tensor
    decode_context_lens: torch.Tensor
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    capture: StepCapture | None = None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    q_heads: range | None = None
    """A tensor-parallel rank's query heads (``None`` on one device): capture then yields partials."""
    cached_prefills: CachedPrefills | None = None
    """CUDA: the chunks of ``prefills`` the paged prefill kernel runs (``runs_paged_prefill``)."""
    decode_num_splits: int | None = None
    """An eager step of an engine with decode graphs: the split count of its batch bucket's graph
    (``LaunchShapes.num_splits``), so its decode kernels run the variants compiled at start-up."""
    capture_launch_rows: int | None = None
    """An eager step of an engine with decode graphs: the most rows one standalone capture launch takes
    (``LaunchShapes.launch_rows``; the group's rows are padded to whole launches)."""
    deferred: dict[tuple, DeferredFinish | None] = field(default_factory=dict)
    """This forward's fused captures finished in one launch, per row set and settings (``_deferred_finish``)."""

    @property
    def num_decodes(self) -> int:
        """Sequences decoding one token this step."""
        return int(self.decode_context_lens.shape[0])


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, chunk: PrefillChunk, scale: float) -> torch.Tensor:
    """Causal attention of one prefill chunk's queries ``[T, Hq, D]`` over its sequence so far."""
    if chunk.cached == 0:
        keys, values = k, v
        mask, causal = None, True
    else:
        keys = gather_paged_kv(k_cache, chunk.block_table[None], chunk.context_len)[0]
        values = gather_paged_kv(v_cache, chunk.block_table[None], chunk.context_len)[0]
        q_pos = torch.arange(chunk.cached, chunk.context_len, device=q.device)
        mask = q_pos[:, None] >= torch.arange(chunk.context_len, device=q.device)[None, :]
        causal = False
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        keys.to(q.dtype).transpose(0, 1).unsqueeze(0),
        values.to(q.dtype).transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        is_causal=causal,
        scale=scale,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, num_splits: int | None = None) -> torch.Tensor:
    """One query per sequence ``[B, Hq, D]`` over its paged keys: Triton on CUDA (``num_splits`` splits, or
    the kernel's own choice), SDPA on gathered keys elsewhere."""
    if q.is_cuda:
        from attnscope.kernels.paged_decode import paged_decode_attention

        out, _ = paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits)
        return out
    lengths = context_lens.tolist()
    longest = max(lengths)
    keys = gather_paged_kv(k_cache, block_tables, longest).transpose(1, 2)
    values = gather_paged_kv(v_cache, block_tables, longest).transpose(1, 2)
    mask = None
    if min(lengths) != longest:
        mask = (torch.arange(longest) < context_lens[:, None]).view(len(lengths), 1, 1, longest)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), keys.to(q.dtype), values.to(q.dtype), attn_mask=mask,
                                         scale=scale, enable_gqa=True)
    return out.squeeze(2)


def _fusable(group: LayerCapture, batch: AttentionBatch, q: torch.Tensor) -> bool:
    """Whether a group's capture can ride inside the decode kernel: CUDA, rotated logits, decode rows only."""
    return q.is_cuda and not group.derotate and all(i >= batch.decode_start for i in group.token_indices)


def _fused_group(groups: list[LayerCapture], batch: AttentionBatch, q: torch.Tensor) -> LayerCapture | None:
    """The group of a layer that rides inside its decode kernel: the first fusable one."""
    return next((group for group in groups if _fusable(group, batch, q)), None)


def _finish_key(group: LayerCapture) -> tuple:
    """Groups with equal keys capture the same rows with the same settings (their row tensors are shared)."""
    return id(group.index), group.top_k, group.statistics


def _deferred_finish(group: LayerCapture, batch: AttentionBatch, q: torch.Tensor) -> DeferredFinish | None:
    """The ``DeferredFinish`` of this forward's fused groups with ``group``'s key, made at the first of their layers
    with a slot per layer; ``None`` when only one layer fuses them, when they have no top-k (statistics only),
    or on a tensor-parallel rank, whose partials finish on their own.

    One finish after the last layer pays where Pass B ranks the head mean; a statistics-only
    finish rides each layer's split merge for little, and deferring it costs an extra
    launch: on an H100 (Llama-8B attention, four layers, every row captured) fingerprint
    statistics cost 1.12x the plain layers at 1 x 32K and 8 x 2K with one deferred finish
    against 1.06x and 1.08x finished per layer, while sketch rows cost 1.40x at 1 x 2K
    deferred against 1.75x per layer (``bench/capture_overhead.py``)."""
    key = _finish_key(group)
    if key not in batch.deferred:
        from attnscope.kernels.capture import DeferredFinish

        slots = 0
        if group.top_k > 0 and batch.q_heads is None:
            slots = sum(1 for groups in batch.capture.layers.values()
                        if (fused := _fused_group(groups, batch, q)) is not None and _finish_key(fused) == key)
        batch.deferred[key] = DeferredFinish(slots) if slots > 1 else None
    return batch.deferred[key]


def _launches(request: CaptureRequest, launch_rows: int | None) -> list[CaptureRequest]:
    """``request`` cut into consecutive launches of ``launch_rows`` rows (whole when ``None`` or when it fits)."""
    rows = request.q.shape[0]
    if launch_rows is None or rows <= launch_rows:
        return [request]
    return [request.row_slice(slice(start, start + launch_rows)) for start in range(0, rows, launch_rows)]


def standalone_capture(k_cache: torch.Tensor, request: CaptureRequest, scale: float,
                       launch_rows: int | None = None) -> CaptureResult:
    """A request's capture read from the cache on its own, not inside the decode kernel (prompt and first-token
    rows, de-rotated logits): Triton on CUDA, the float32 twin elsewhere; with ``launch_rows``, in launches of
    that many rows (``LaunchShapes.launch_rows``: the shapes compiled at start-up)."""
    if k_cache.is_cuda:
        from attnscope.kernels.capture import attention_capture as capture
    else:
        capture = capture_rows_ref
    return CaptureResult.concat([capture(k_cache, part, scale) for part in _launches(request, launch_rows)])


def standalone_partial(k_cache: torch.Tensor, request: CaptureRequest, scale: float,
                       launch_rows: int | None = None) -> PartialCapture:
    """A tensor-parallel rank's ``PartialCapture`` of a request read from the cache on its own (``request`` holds
    the rank's heads): Triton on CUDA, the float32 twin elsewhere; with ``launch_rows``, in launches of that
    many rows, like :func:`standalone_capture`."""
    if k_cache.is_cuda:
        from attnscope.kernels.capture import partial_capture as partial
    else:
        partial = partial_capture_ref
    return PartialCapture.concat([partial(k_cache, part, scale) for part in _launches(request, launch_rows)])


def capture_layer(q: torch.Tensor, q_unrotated: torch.Tensor, layer: int, batch: AttentionBatch,
                  scale: float) -> LayerCapture | None:
    """Compute the capture of this layer's captured rows (their keys are already in the cache).

    Returns the group to fuse into this layer's decode kernel instead (CUDA, decode rows
    with rotated logits), whose result the decode call fills in. On a tensor-parallel
    rank every group gets the rank's ``PartialCapture`` instead (exact, to be summed over
    the ranks; Triton on CUDA, the float32 twin elsewhere).
    """
    k_cache = batch.kv_caches[layer][0]
    groups = batch.capture.layers.get(layer, [])
    fused = _fused_group(groups, batch, q)
    for group in groups:
        if group is fused:
            continue
        rope = batch.rope if group.derotate else None
        request = batch.capture.request(group, q_unrotated if group.derotate else q, rope, batch.q_heads)
        if batch.q_heads is not None:
            group.partial = standalone_partial(k_cache, request, scale, batch.capture_launch_rows)
        else:
            group.result = standalone_capture(k_cache, request, scale, batch.capture_launch_rows)
    full = batch.capture.full.get(layer)
    if full is not None:
        unrotated = q_unrotated[full.index] if any(full.derotate) else None
        full.probs = full_attention_rows(q[full.index], k_cache, full.block_tables, full.positions, scale,
                                         full.mask_prefix, batch.rope, full.derotate, unrotated)
    return fused


def fused_decode_capture(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttentionBatch,
                         scale: float, group: LayerCapture) -> torch.Tensor:
    """Decode attention of the step's decode rows, the group's capture statistics in the same pass.

    The kernel runs the whole decode batch: captured rows run Pass A beside their attention,
    the others its plain tile loop, so requests without capture pay nothing for sharing the
    batch. An eager step launches it with ``batch.decode_num_splits`` (its rows and tables
    padded by ``StepCapture.finalize`` and the model runner to the graphs' launch shapes),
    so it reuses the kernel variants compiled at start-up. On a
    tensor-parallel rank the kernel computes the statistics of the rank's heads and the group's
    ``PartialCapture`` adds the dense ``p̄`` share when the group has top-k. Where several
    layers fuse groups of the same rows and settings, their captures finish in one launch
    after the last of them (``DeferredFinish``): an earlier layer's result is filled then.
    """
    from attnscope.kernels.capture import paged_decode_attention_capture

    decode_q = q[batch.decode_start :]
    tables, lengths = batch.decode_block_tables, batch.decode_context_lens
    # The fused kernel takes the captured rows' queries from the batch; a rank's partial reads them.
    request = batch.capture.request(group, q, None, batch.q_heads, gather_queries=batch.q_heads is not None)
    kernel_request = request if batch.q_heads is None else replace(request, top_k=0, head_top_k=0)
    deferred = _deferred_finish(group, batch, q)
    captured = group.decode_rows  # a CUDA-graph step: padding capture rows match no decode row
    if captured is None:  # on the device already: no copy, no sync; padded rows (LaunchShapes) match none
        # int32 like a graph's decode rows: the kernel variant compiled for the graphs serves this launch too
        captured = F.pad((group.index - batch.decode_start).int(), (0, request.q.shape[0] - group.index.shape[0]),
                         value=-1)
    out, _, result = paged_decode_attention_capture(decode_q, k_cache, v_cache, tables, lengths, scale,
                                                    kernel_request, captured, batch.decode_num_splits,
                                                    deferred=deferred)
    if batch.q_heads is None:
        group.result = result
    else:
        from attnscope.kernels.capture import partial_capture

        group.partial = partial_capture(k_cache, request, scale, stats=result)
    return out


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, batch: AttentionBatch,
                    scale: float, q_unrotated: torch.Tensor | None = None) -> torch.Tensor:
    """Attention output ``[N, Hq, D]`` for all of a step's tokens in layer ``layer``.

    When the step captures this layer, the captured rows' statistics are computed from the
    same cache (``q_unrotated`` serves rows that asked for de-rotated scores).
    """
    k_cache, v_cache = batch.kv_caches[layer]
    fused = None
    if batch.capture is not None:
        fused = capture_layer(q, q_unrotated if q_unrotated is not None else q, layer, batch, scale)
    decoded = None
    if fused is not None:
        decoded = fused_decode_capture(q, k_cache, v_cache, batch, scale, fused)
    elif batch.num_decodes:
        decoded = decode_attention(q[batch.decode_start :], k_cache, v_cache, batch.decode_block_tables,
                                   batch.decode_context_lens, scale, batch.decode_num_splits)
    if not batch.prefills:
        return decoded
    out = torch.empty_like(q)
    paged = batch.cached_prefills
    if paged is not None:
        from attnscope.kernels.paged_prefill import paged_prefill_attention

        paged_prefill_attention(q, k_cache, v_cache, paged.block_tables, paged.q_starts, paged.q_lens, paged.cached,
                                scale, paged.max_q_len, out=out)
    for chunk in batch.prefills:
        if paged is not None and runs_paged_prefill(chunk.cached, chunk.end - chunk.start):
            continue
        sl = slice(chunk.start, chunk.end)
        out[sl] = prefill_attention(q[sl], k[sl], v[sl], k_cache, v_cache, chunk, scale)
    if decoded is not None:
        out[batch.decode_start :] = decoded
    return out
