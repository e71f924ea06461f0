"""Tensor-parallel placement: which heads and rows a rank owns, and the collectives it needs.

With ``size == 1`` every collective is a no-op, so the single-device engine pays nothing.
The tensor-parallel engine creates one ``TensorParallel`` per rank over a
``torch.distributed`` process group (NCCL on GPUs, gloo on CPUs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class HeadPartition:
    """The attention heads one rank computes: contiguous query heads and the KV heads they read."""

    q_heads: range
    kv_heads: range


def partition_heads(num_heads: int, num_kv_heads: int, size: int, rank: int) -> HeadPartition:
    """Split attention heads across ``size`` ranks without ever splitting a GQA group's KV head.

    When there are at least as many KV heads as ranks, KV heads are dealt out as evenly
    as possible and each rank takes the query heads of its KV heads (uneven splits such
    as 3 KV heads over 2 ranks are allowed). When there are fewer KV heads than ranks,
    the ranks sharing a KV head replicate it and split its query heads between them.
    Query heads never overlap across ranks and their union is all heads.
    """
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} outside tensor-parallel size {size}")
    group = num_heads // num_kv_heads
    if num_kv_heads >= size:
        kv_start, kv_end = _even_range(num_kv_heads, size, rank)
        return HeadPartition(range(kv_start * group, kv_end * group), range(kv_start, kv_end))
    if size % num_kv_heads != 0:
        raise ValueError(f"{size} ranks cannot share {num_kv_heads} KV heads evenly")
    ranks_per_kv = size // num_kv_heads
    if group < ranks_per_kv:
        raise ValueError(f"{size} ranks exceed the {num_heads} query heads")
    kv = rank // ranks_per_kv
    q_start, q_end = _even_range(group, ranks_per_kv, rank % ranks_per_kv)
    return HeadPartition(range(kv * group + q_start, kv * group + q_end), range(kv, kv + 1))


def _even_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """The ``index``-th of ``parts`` contiguous, near-equal slices of ``range(total)``."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def shard_range(total: int, size: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of a dimension of length ``total`` owned by ``rank`` (near-equal split)."""
    return _even_range(total, size, rank)


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks in place (row-parallel outputs); no-op for one rank."""
        if self.size > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def reduce_to_first(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks into rank 0's copy, in place (others' copies are left undefined)."""
        if self.size > 1:
            dist.reduce(tensor, dst=0, group=self.group)
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate each rank's shard along the last dimension (vocab-parallel logits)."""
        if self.size == 1:
            return tensor
        parts = [tensor.new_empty(*tensor.shape[:-1], n) for n in sizes]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


SINGLE_DEVICE = TensorParallel()
