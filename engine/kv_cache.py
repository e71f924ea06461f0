"""The paged KV cache tensors: one key and one value tensor per layer."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from attnscope.engine.engine_config import EngineConfig


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of cache one token occupies over all layers (keys and values)."""
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def allocate_kv_cache(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                      dtype: torch.dtype, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(k, v)``, each ``[num_blocks, block_size, num_kv_heads, head_dim]``, zero-filled."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(num_layers)
    ]


def kv_cache_blocks(config: EngineConfig, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                    device: torch.device) -> int:
    """KV blocks to allocate: ``num_kv_blocks`` when set, else what the memory budget holds.

    CPU: ``kv_cache_memory_gib``; CUDA: ``gpu_memory_utilization`` of the memory still free
    (call it after the weights are loaded). ``num_kv_heads`` are the heads this process holds.
    """
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    per_block = config.block_size * kv_bytes_per_token(num_layers, num_kv_heads, head_dim, dtype)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free * config.gpu_memory_utilization
    else:
        budget = config.kv_cache_memory_gib * 2**30
    return max(1, int(budget // per_block))
