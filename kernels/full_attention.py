"""Full attention rows for the vLLM-family ``full`` capture mode (a debugging mode, torch only)."""

from __future__ import annotations

import torch

from attnscope.kernels.capture_reference import paged_logits


def full_attention_rows(q: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor,
                        query_pos: torch.Tensor, scale: float, mask_prefix: list[int] | None = None,
                        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                        derotate: list[bool] | None = None,
                        q_unrotated: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per row, every head's attention probabilities over positions ``n..P``: ``[Hq, P + 1 - n]`` float32.

    ``n`` is the row's ``mask_prefix`` (default 0): positions before it are removed and the
    rest renormalised, as every capture mode does (DESIGN: privacy mask). A row with
    ``derotate`` takes its logits on its un-rotated query (its row of ``q_unrotated``) and keys
    rotated back by their own positions (``rope`` = the model's ``(cos, sin)`` tables).
    Materialises the rows (this mode exists to return them); the caller bounds the length.
    """
    rows = []
    for i in range(q.shape[0]):
        length = int(query_pos[i]) + 1
        start = mask_prefix[i] if mask_prefix else 0
        unrotate = bool(derotate and derotate[i])
        query = (q_unrotated if unrotate else q)[i : i + 1]
        logits = paged_logits(query, k_cache, block_tables[i : i + 1], length, scale, rope if unrotate else None)[0]
        rows.append(torch.softmax(logits[:, start:], dim=-1))
    return rows
