"""Split-K ("flash-decoding") paged decode attention in Triton.

Stage 1 runs one program per (sequence, KV head, split). The program owns all
``G = Hq // Hkv`` query heads of its GQA group (the G rows are the M dimension
of ``tl.dot``, padded to at least 16) and a contiguous range of whole key tiles
of its sequence. It streams those tiles through an online softmax and writes
one partial result per query row: the normalised output of its split and the
split's natural-log logsumexp. Stage 2 merges the splits exactly, weighting each
by ``exp(lse_split - lse_total)``; an empty split has ``lse = -inf`` and weight 0.

Key tiles are gathered token by token through the block table, so the tile
width is independent of the cache ``block_size`` (any power of two >= 8).
The per-split state (``m_i``, ``l_i``, ``acc``) and the per-tile scaled
``logits`` are kept as explicit named values so attention capture (row
logsumexp, per-split top-k, distance histograms) can hook into the tile loop.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from attnscope.kernels.capture_reference import CaptureRequest, CaptureResult

DEFAULT_NUM_SMS = 132
MIN_TOKENS_PER_SPLIT = 128
MAX_SPLITS = 64
MIN_DOT_ROWS = 16
# Warps of the split combine; capture's finish launch, which merges a captured layer's splits with
# the same code, runs at this width too, so attention with and without capture stays bit-equal.
SPLIT_COMBINE_NUM_WARPS = 8


@triton.jit
def _paged_decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    part_out_ptr,
    part_lse_ptr,
    scale,
    num_splits,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_btb,
    stride_pob,
    stride_poh,
    stride_pos,
    stride_plb,
    stride_plh,
    stride_pls,
    GROUP_SIZE: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Attend one GQA group of one sequence over one split of its context."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # This split's token range [split_start, split_end), in whole tiles.
    seq_len = tl.load(context_lens_ptr + seq)
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, TILE_N), num_splits)
    split_start = split * tiles_per_split * TILE_N
    split_end = tl.minimum(split_start + tiles_per_split * TILE_N, seq_len)

    rows = tl.arange(0, GROUP_PAD)
    row_valid = rows < GROUP_SIZE
    heads = kv_head * GROUP_SIZE + rows
    dims = tl.arange(0, HEAD_DIM)
    tile_offsets = tl.arange(0, TILE_N)

    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
        mask=row_valid[:, None],
        other=0.0,
    )

    # Per-split online-softmax state, one entry per query row.
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)  # running max logit
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)  # running sum of exp(logit - m_i)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)  # running sum of p * v

    block_table_row = block_tables_ptr + seq * stride_btb
    for tile_start in range(split_start, split_end, TILE_N):
        tokens = tile_start + tile_offsets
        token_valid = tokens < split_end
        physical_block = tl.load(
            block_table_row + tokens // BLOCK_SIZE, mask=token_valid, other=0
        ).to(tl.int64)
        slot = tokens % BLOCK_SIZE

        k_rows = physical_block * stride_kb + slot * stride_kt + kv_head * stride_kh
        k = tl.load(
            k_cache_ptr + k_rows[:, None] + dims[None, :], mask=token_valid[:, None], other=0.0
        )
        logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        logits = tl.where(token_valid[None, :], logits, float("-inf"))  # [GROUP_PAD, TILE_N]

        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(logits - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)

        v_rows = physical_block * stride_vb + slot * stride_vt + kv_head * stride_vh
        v = tl.load(
            v_cache_ptr + v_rows[:, None] + dims[None, :], mask=token_valid[:, None], other=0.0
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # An empty split (no tokens) reports out = 0 and lse = -inf.
    has_tokens = l_i > 0.0
    safe_l = tl.where(has_tokens, l_i, 1.0)
    split_out = acc / safe_l[:, None]
    split_lse = tl.where(has_tokens, m_i + tl.log(safe_l), float("-inf"))

    out_rows = part_out_ptr + seq * stride_pob + heads * stride_poh + split * stride_pos
    tl.store(
        out_rows[:, None] + dims[None, :],
        split_out.to(part_out_ptr.dtype.element_ty),
        mask=row_valid[:, None],
    )
    lse_rows = part_lse_ptr + seq * stride_plb + heads * stride_plh + split * stride_pls
    tl.store(lse_rows, split_lse, mask=row_valid)


@triton.jit
def _combine_split_row(
    seq,
    head,
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    lse_ptr,
    num_splits,
    stride_pob,
    stride_poh,
    stride_pos,
    stride_plb,
    stride_plh,
    stride_pls,
    stride_ob,
    stride_oh,
    stride_lb,
    stride_lh,
    HEAD_DIM: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    """Merge the splits of one (sequence, query head) row, weighted by their lse (also run by capture's
    finish kernel, so a captured layer's attention needs no launch of its own for this)."""
    splits = tl.arange(0, SPLITS_PAD)
    split_valid = splits < num_splits
    dims = tl.arange(0, HEAD_DIM)

    split_lse = tl.load(
        part_lse_ptr + seq * stride_plb + head * stride_plh + splits * stride_pls,
        mask=split_valid,
        other=float("-inf"),
    )
    max_lse = tl.max(split_lse, axis=0)
    shift = tl.where(max_lse == float("-inf"), 0.0, max_lse)
    weights = tl.exp(split_lse - shift)
    total = tl.sum(weights, axis=0)
    safe_total = tl.where(total > 0.0, total, 1.0)

    split_out = tl.load(
        part_out_ptr
        + seq * stride_pob
        + head * stride_poh
        + splits[:, None] * stride_pos
        + dims[None, :],
        mask=split_valid[:, None],
        other=0.0,
    )
    out = tl.sum(weights[:, None] * split_out, axis=0) / safe_total
    lse = tl.where(total > 0.0, shift + tl.log(safe_total), float("-inf"))

    tl.store(
        out_ptr + seq * stride_ob + head * stride_oh + dims,
        out.to(out_ptr.dtype.element_ty),
    )
    tl.store(lse_ptr + seq * stride_lb + head * stride_lh, lse)


@triton.jit
def _combine_splits_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    lse_ptr,
    num_splits,
    stride_pob,
    stride_poh,
    stride_pos,
    stride_plb,
    stride_plh,
    stride_pls,
    stride_ob,
    stride_oh,
    stride_lb,
    stride_lh,
    HEAD_DIM: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    """Merge the splits of one (sequence, query head) row, weighted by their lse."""
    _combine_split_row(
        tl.program_id(0), tl.program_id(1), part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, num_splits,
        stride_pob, stride_poh, stride_pos, stride_plb, stride_plh, stride_pls, stride_ob, stride_oh, stride_lb,
        stride_lh, HEAD_DIM, SPLITS_PAD,
    )


def _tile_tokens(head_dim: int) -> int:
    """Keys per tile of the stage-1 loop: 64, halved for head_dim > 128 to bound registers."""
    return 64 if head_dim <= 128 else 32


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (the H100 count off-GPU, e.g. the interpreter)."""
    if device.type != "cuda":
        return DEFAULT_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_num_splits(batch: int, num_kv_heads: int, max_len: int, num_sms: int, head_dim: int) -> int:
    """Pick how many splits each sequence's context is cut into.

    Aims for about two programs per SM (``batch * num_kv_heads * splits``)
    without giving a split fewer than ``MIN_TOKENS_PER_SPLIT`` tokens of the
    longest possible context ``max_len``, capped at ``MAX_SPLITS``. Long
    contexts at small batch get many splits; large batches get one, which also
    skips the combine pass. The kernels cut a context into whole tiles of
    ``_tile_tokens(head_dim)`` keys, so splits that would get no tile of ``max_len`` are
    dropped (33 splits of 8K in tiles of 64 fill only 32): each split keeps its
    length, and the combine reads fewer partials (on an H200, batch 1 with 8 KV heads:
    the attention and its combine 22.0 -> 20.6 us at 8K, 53.6 -> 51.8 us at 32K).
    """
    base_programs = max(batch * num_kv_heads, 1)
    wanted = triton.cdiv(2 * num_sms, base_programs)
    useful = triton.cdiv(max(max_len, 1), MIN_TOKENS_PER_SPLIT)
    return splits_with_tiles(max(1, min(wanted, useful, MAX_SPLITS)), max_len, _tile_tokens(head_dim))


def splits_with_tiles(splits: int, max_len: int, tile_tokens: int) -> int:
    """The fewest splits that cut ``max_len`` keys into as many whole tiles a split as ``splits`` splits would.

    The kernels give each split ``cdiv(tiles, splits)`` tiles, so the last splits of a
    count that does not divide the tiles can be left with none."""
    tiles = triton.cdiv(max(max_len, 1), tile_tokens)
    return triton.cdiv(tiles, triton.cdiv(tiles, splits))


def _check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    out: torch.Tensor | None,
) -> None:
    """Reject shapes, dtypes and layouts the kernel does not handle, with a readable error."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"expected q [B, Hq, D] and equal caches [blocks, block_size, Hkv, D], got "
            f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[3] != head_dim or num_heads % num_kv_heads != 0:
        raise ValueError(f"q {tuple(q.shape)} does not fit cache {tuple(k_cache.shape)}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if block_size < 8 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 8, got {block_size}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k_cache.dtype != q.dtype:
        raise ValueError(f"q and caches must share fp16/bf16/fp32, got {q.dtype}, {k_cache.dtype}")
    if v_cache.dtype != q.dtype:
        raise ValueError(f"v_cache dtype {v_cache.dtype} differs from q dtype {q.dtype}")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError("block_tables and context_lens must be int32")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or context_lens.shape != (batch,):
        raise ValueError(
            f"expected block_tables [{batch}, max_blocks] and context_lens [{batch}], got "
            f"{tuple(block_tables.shape)}, {tuple(context_lens.shape)}"
        )
    if block_tables.stride(1) != 1 or not context_lens.is_contiguous():
        raise ValueError("block_tables rows and context_lens must be contiguous")
    tensors = [q, k_cache, v_cache] + ([out] if out is not None else [])
    if any(t.stride(-1) != 1 for t in tensors):
        raise ValueError("q, caches and out must be contiguous in head_dim")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    capture: CaptureRequest | None = None,
    capture_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, CaptureResult]:
    """Decode attention of one new token per sequence over a paged KV cache.

    Same contract as ``attnscope.kernels.reference.paged_decode_attention_ref``:
    ``q`` ``[B, Hq, D]``, caches ``[num_blocks, block_size, Hkv, D]``, int32
    ``block_tables`` ``[B, max_blocks]`` and ``context_lens`` ``[B]``; returns
    ``out`` ``[B, Hq, D]`` (``q.dtype``, written into ``out`` when given) and
    ``lse`` ``[B, Hq]`` float32 natural-log logsumexp of the scaled logits.
    ``num_splits=None`` picks a split count from the batch and from
    ``max_blocks * block_size`` as the length bound, so the launch needs no
    device-to-host sync on ``context_lens``.

    With ``capture`` (a ``CaptureRequest`` for the decode rows ``capture_rows`` ``[R]``; its
    ``q`` ``[R, Hq, D]`` is read for its shape, see the capture function) it returns the
    3-tuple ``(out, lse, CaptureResult)`` from
    ``attnscope.kernels.capture.paged_decode_attention_capture``, which computes the capture
    statistics in the same pass as the attention; without it, the 2-tuple above.
    """
    if capture is not None:
        if capture_rows is None:
            raise ValueError("capture needs capture_rows (the captured decode rows)")
        from attnscope.kernels.capture import paged_decode_attention_capture  # capture imports this module

        return paged_decode_attention_capture(
            q, k_cache, v_cache, block_tables, context_lens, scale, capture, capture_rows, num_splits, out
        )
    _check_inputs(q, k_cache, v_cache, block_tables, context_lens, out)
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    if num_splits is None:
        max_len = block_tables.shape[1] * block_size
        num_splits = default_num_splits(batch, num_kv_heads, max_len, _num_sms(q.device), head_dim)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")

    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty((batch, num_heads), dtype=torch.float32, device=q.device)
    if num_splits == 1:
        # One split is already the final answer: write it straight into out / lse.
        part_out, part_lse = out, lse
        part_out_strides = (out.stride(0), out.stride(1), 0)
        part_lse_strides = (lse.stride(0), lse.stride(1), 0)
    else:
        part_out = torch.empty(
            (batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
        )
        part_lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
        part_out_strides = part_out.stride()[:3]
        part_lse_strides = part_lse.stride()

    _paged_decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        part_out,
        part_lse,
        scale,
        num_splits,
        q.stride(0),
        q.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        block_tables.stride(0),
        *part_out_strides,
        *part_lse_strides,
        GROUP_SIZE=group,
        GROUP_PAD=max(MIN_DOT_ROWS, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        TILE_N=_tile_tokens(head_dim),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    if num_splits > 1:
        combine_splits(part_out, part_lse, out, lse)
    return out, lse


def combine_splits(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge a split decode kernel's per-split outputs ``[B, Hq, S, D]`` / logsumexps ``[B, Hq, S]`` into
    ``out`` ``[B, Hq, D]`` and ``lse`` ``[B, Hq]`` (one program per sequence and head)."""
    batch, num_heads, num_splits, head_dim = part_out.shape
    _combine_splits_kernel[(batch, num_heads)](
        part_out,
        part_lse,
        out,
        lse,
        num_splits,
        *part_out.stride()[:3],
        *part_lse.stride(),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        lse.stride(1),
        HEAD_DIM=head_dim,
        SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)),
        num_warps=SPLIT_COMBINE_NUM_WARPS,
    )
