"""Full attention rows for the vLLM-family ``full`` capture mode (a debugging mode, torch only)."""

from __future__ import annotations

import torch

from attnscope.kernels.layer_ops_reference import rotate_ref
from attnscope.kernels.reference import gather_paged_kv


def full_attention_rows(q: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor,
                        query_pos: torch.Tensor, scale: float, mask_prefix: list[int] | None = None,
                        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                        derotate: list[bool] | None = None) -> list[torch.Tensor]:
    """Per row, every head's attention probabilities over positions ``n..P``: ``[Hq, P + 1 - n]`` float32.

    ``n`` is the row's ``mask_prefix`` (default 0): positions before it are removed and the
    rest renormalised, as every capture mode does (DESIGN: privacy mask). A row with
    ``derotate`` takes its logits on keys rotated back by their own positions (``rope`` =
    the model's ``(cos, sin)`` tables; its query in ``q`` un-rotated by the caller).
    Materialises the rows (this mode exists to return them); the caller bounds the length.
    """
    hq, hkv = q.shape[1], k_cache.shape[2]
    rows = []
    for i in range(q.shape[0]):
        length = int(query_pos[i]) + 1
        start = mask_prefix[i] if mask_prefix else 0
        keys = gather_paged_kv(k_cache, block_tables[i : i + 1], length)[0].float()
        if derotate and derotate[i]:
            cos, sin = (table[:length, None, :].float() for table in rope)
            keys = rotate_ref(keys, cos, -sin)
        keys = keys[start:].repeat_interleave(hq // hkv, dim=1)
        logits = torch.einsum("hd,thd->ht", q[i].float(), keys) * scale
        rows.append(torch.softmax(logits, dim=-1))
    return rows
