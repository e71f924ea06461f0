"""Full attention rows for the vLLM-family ``full`` capture mode (a debugging mode, torch only)."""

from __future__ import annotations

import torch

from attnscope.kernels.reference import gather_paged_kv


def full_attention_rows(q: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor,
                        query_pos: torch.Tensor, scale: float) -> list[torch.Tensor]:
    """Per row, every head's attention probabilities over positions ``0..P``: ``[Hq, P + 1]`` float32.

    Materialises the rows (this mode exists to return them); the caller bounds the length.
    """
    hq, hkv = q.shape[1], k_cache.shape[2]
    rows = []
    for i in range(q.shape[0]):
        length = int(query_pos[i]) + 1
        keys = gather_paged_kv(k_cache, block_tables[i : i + 1], length)[0].float()
        keys = keys.repeat_interleave(hq // hkv, dim=1)
        logits = torch.einsum("hd,thd->ht", q[i].float(), keys) * scale
        rows.append(torch.softmax(logits, dim=-1))
    return rows
