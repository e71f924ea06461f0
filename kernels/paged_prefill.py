"""Paged prefill attention in Triton: prompt chunks that continue a cached prefix, read straight from the cache.

A prefill chunk whose sequence already has ``cached`` tokens in the paged KV cache (a
prefix-cache hit, or the second chunk of a chunked prompt) attends causally to all its
sequence's keys, most of them in cache blocks. Its own keys and values are in the cache
too (the layer's rotate-and-store kernel wrote them first), so the kernel reads every
key the same way, through the chunk's block table: no gather into a contiguous copy, no
dense mask.

One launch covers all such chunks of a step: a program owns ``BLOCK_M`` query tokens of
one chunk and one query head, streams the key tiles ``[0, last query position]`` through
an online softmax, and masks the causal diagonal. ``kernels.reference.
paged_prefill_attention_ref`` is the float32 twin (and the CPU path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 64  # query tokens per program
BLOCK_N = 64  # keys per tile
NUM_WARPS = 4
# The block tables' row stride is the step's longest table, which changes from step to step: left
# unspecialised, so Triton does not compile another variant whenever it lands on or off a multiple of 16.
RUNTIME_INTS = ("stride_btc",)


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _paged_prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    q_starts_ptr,
    q_lens_ptr,
    cached_ptr,
    scale,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_btc,
    GROUP_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Causal attention of ``BLOCK_M`` queries of one chunk and one head over the chunk's paged keys."""
    m_block = tl.program_id(0)
    chunk = tl.program_id(1)
    head = tl.program_id(2)
    q_len = tl.load(q_lens_ptr + chunk)
    if m_block * BLOCK_M < q_len:
        q_start = tl.load(q_starts_ptr + chunk)
        cached = tl.load(cached_ptr + chunk)
        rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_valid = rows < q_len
        dims = tl.arange(0, HEAD_DIM)
        q_rows = (q_start + rows).to(tl.int64)
        q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + dims[None, :],
                    mask=row_valid[:, None], other=0.0)
        q_pos = cached + rows
        kv_head = head // GROUP_SIZE
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        end = cached + tl.minimum((m_block + 1) * BLOCK_M, q_len)  # keys [0, end) cover every row's causal range
        table = block_tables_ptr + chunk * stride_btc
        for start in range(0, end, BLOCK_N):
            tokens = start + tl.arange(0, BLOCK_N)
            token_valid = tokens < end
            block = tl.load(table + tokens // BLOCK_SIZE, mask=token_valid, other=0).to(tl.int64)
            slot = tokens % BLOCK_SIZE
            k = tl.load(k_cache_ptr + (block * stride_kb + slot * stride_kt + kv_head * stride_kh)[:, None]
                        + dims[None, :], mask=token_valid[:, None], other=0.0)
            logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
            allowed = token_valid[None, :] & (tokens[None, :] <= q_pos[:, None])
            logits = tl.where(allowed, logits, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(logits, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(logits - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_cache_ptr + (block * stride_vb + slot * stride_vt + kv_head * stride_vh)[:, None]
                        + dims[None, :], mask=token_valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    q_starts: torch.Tensor,
    q_lens: torch.Tensor,
    cached: torch.Tensor,
    scale: float,
    max_q_len: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of prefill chunks over their paged KV; same contract as ``paged_prefill_attention_ref``.

    ``q`` ``[N, Hq, D]`` holds the step's query rows; chunk ``c`` owns rows
    ``q_starts[c] .. + q_lens[c]`` at logical positions ``cached[c] ..`` and reads keys
    ``0 .. position`` through ``block_tables[c]`` (int32 ``[C, max_blocks]``; its own keys
    already written). ``max_q_len`` (>= every ``q_lens``, known on the host) sizes the grid,
    so the launch needs no device sync. Writes the chunks' rows of ``out`` (a new
    ``[N, Hq, D]`` tensor when not given; other rows untouched) and returns it.
    """
    num_rows, num_heads, head_dim = q.shape
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[3] != head_dim:
        raise ValueError(f"q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    if num_heads % num_kv_heads or head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"need Hq divisible by Hkv and a power-of-two head_dim >= 16, got q {tuple(q.shape)}")
    if q.dtype != k_cache.dtype or q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q and the caches must share a dtype and be contiguous in head_dim")
    chunks = q_lens.shape[0]
    for name, t in (("q_starts", q_starts), ("q_lens", q_lens), ("cached", cached)):
        if t.dtype != torch.int32 or t.shape != (chunks,):
            raise ValueError(f"{name} must be int32 [{chunks}]")
    if block_tables.dtype != torch.int32 or block_tables.shape[0] != chunks or block_tables.stride(1) != 1:
        raise ValueError("block_tables must be int32 [C, max_blocks] with contiguous rows")
    if out is None:
        out = torch.empty_like(q)
    if chunks and max_q_len > 0:
        _paged_prefill_kernel[(triton.cdiv(max_q_len, BLOCK_M), chunks, num_heads)](
            q, k_cache, v_cache, out, block_tables, q_starts, q_lens, cached, scale,
            q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], out.stride(0), out.stride(1),
            block_tables.stride(0),
            GROUP_SIZE=num_heads // num_kv_heads,
            HEAD_DIM=head_dim,
            BLOCK_SIZE=block_size,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            num_warps=NUM_WARPS,
        )
    return out
