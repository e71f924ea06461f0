"""Float32 torch twins of the Triton kernels.

These materialise full attention rows, so they are the oracle the kernels are
tested against, and they are also the engine's CPU decode path: everything is
vectorised over the batch (no per-sequence or per-token Python loops).
"""

from __future__ import annotations

import torch


def gather_paged_kv(cache: torch.Tensor, block_tables: torch.Tensor, max_len: int) -> torch.Tensor:
    """Gather the first ``max_len`` logical tokens of every sequence from a paged cache.

    ``cache`` is ``[num_blocks, block_size, num_kv_heads, head_dim]`` and
    ``block_tables[b, j]`` names the physical block holding logical tokens
    ``j * block_size ... (j + 1) * block_size - 1`` of sequence ``b``. Returns a
    padded ``[B, max_len, num_kv_heads, head_dim]`` tensor (cache dtype) built
    with one ``index_select`` for the whole batch; positions past a sequence's
    own length hold whatever its (padding) table entries point at, so callers
    must mask them.
    """
    batch = block_tables.shape[0]
    _, block_size, num_kv_heads, head_dim = cache.shape
    num_table_blocks = -(-max_len // block_size)
    if num_table_blocks > block_tables.shape[1]:
        raise ValueError(
            f"max_len={max_len} needs {num_table_blocks} blocks per sequence, "
            f"block_tables has {block_tables.shape[1]}"
        )
    block_ids = block_tables[:, :num_table_blocks].reshape(-1).long()
    gathered = cache.index_select(0, block_ids)
    gathered = gathered.view(batch, num_table_blocks * block_size, num_kv_heads, head_dim)
    return gathered[:, :max_len]


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact float32 single-token (decode) attention over a paged KV cache.

    ``q`` is ``[B, Hq, D]``; query head ``h`` reads KV head
    ``h // (Hq // Hkv)``; sequence ``b`` attends to its first
    ``context_lens[b]`` cached tokens. Returns ``out`` ``[B, Hq, D]`` in
    ``q.dtype`` and ``lse`` ``[B, Hq]`` float32, the natural-log logsumexp of the
    scaled logits. A sequence with ``context_lens[b] == 0`` gets ``out = 0`` and
    ``lse = -inf`` (the same convention as an empty split in the Triton kernel).
    Cache slots outside a sequence's context never reach the result, even if
    they hold NaN.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    max_len = int(context_lens.max()) if batch > 0 else 0

    keys = gather_paged_kv(k_cache, block_tables, max_len).float()
    values = gather_paged_kv(v_cache, block_tables, max_len).float()
    valid = torch.arange(max_len, device=q.device) < context_lens.to(q.device)[:, None]  # [B, T]
    values.masked_fill_(~valid[:, :, None, None], 0.0)  # gathered tensors are fresh copies

    q_groups = q.float().reshape(batch, num_kv_heads, group, head_dim)
    logits = torch.matmul(q_groups, keys.permute(0, 2, 3, 1)) * scale  # [B, Hkv, G, T]
    logits.masked_fill_(~valid[:, None, None, :], float("-inf"))

    lse = torch.logsumexp(logits, dim=-1)  # [B, Hkv, G]
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = logits.sub_(finite_lse[..., None]).exp_()
    out = torch.matmul(probs, values.transpose(1, 2))  # [B, Hkv, G, D]
    return out.reshape(batch, num_heads, head_dim).to(q.dtype), lse.reshape(batch, num_heads)


def paged_prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    q_starts: torch.Tensor,
    q_lens: torch.Tensor,
    cached: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Exact float32 causal attention of prefill chunks over their paged keys (twin of the Triton kernel).

    Chunk ``c`` owns query rows ``q_starts[c] .. + q_lens[c]`` of ``q`` ``[N, Hq, D]`` at logical
    positions ``cached[c] ..``; its keys and values, its own included, are read from the caches
    through ``block_tables[c]``, and a query at position ``p`` attends to keys ``0 .. p``.
    Returns ``[N, Hq, D]`` in ``q.dtype`` with the chunks' rows filled (other rows zero).
    """
    out = torch.zeros_like(q)
    num_heads = q.shape[1]
    group = num_heads // k_cache.shape[2]
    for c in range(q_lens.shape[0]):
        start, length, offset = int(q_starts[c]), int(q_lens[c]), int(cached[c])
        if not length:
            continue
        context = offset + length
        keys = gather_paged_kv(k_cache, block_tables[c : c + 1], context)[0].float()  # [T, Hkv, D]
        values = gather_paged_kv(v_cache, block_tables[c : c + 1], context)[0].float()
        queries = q[start : start + length].float()  # [L, Hq, D]
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        logits = torch.einsum("lhd,thd->hlt", queries, keys) * scale
        positions = torch.arange(offset, context, device=q.device)
        allowed = torch.arange(context, device=q.device)[None, :] <= positions[:, None]
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        out[start : start + length] = torch.einsum("hlt,thd->lhd", probs, values).to(q.dtype)
    return out
