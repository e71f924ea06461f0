"""Building blocks of the decoder, written so tensor parallelism shards them in place.

Each parallel layer holds only its rank's shard and knows how to cut that shard out of
a full (unsharded) checkpoint tensor with ``load``; with one rank the shard is the whole
tensor. Weights are plain tensors (no autograd): this is an inference engine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnscope.engine.parallel import HeadPartition, TensorParallel, shard_range
from attnscope.kernels.decode_matmul import decode_matmul, decode_matmul_silu
from attnscope.kernels.layer_ops import rms_norm


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    """An uninitialised inference-only parameter."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 like the reference implementations (one fused kernel on CUDA)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _param(dim, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension and scale it."""
        return rms_norm(x, self.weight, self.eps)[0]

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add ``x`` to the residual stream and normalise the sum: ``(norm(x + residual), x + residual)``."""
        return rms_norm(x, self.weight, self.eps, residual)

    def load(self, full: torch.Tensor) -> None:
        """Copy the (replicated) norm weight."""
        self.weight.copy_(full)


class RowParallelLinear(nn.Module):
    """``y = x Wᵀ`` with the input features split across ranks; partial outputs are summed over ranks."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel, dtype: torch.dtype,
                 in_range: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.tp = tp
        self.start, self.end = in_range if in_range is not None else shard_range(in_features, tp.size, tp.rank)
        self.weight = _param(out_features, self.end - self.start, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The full output, reduced over ranks (one all-reduce per call)."""
        return self.tp.all_reduce(decode_matmul(x, self.weight))

    def load(self, full: torch.Tensor) -> None:
        """Cut this rank's input columns out of the full weight."""
        self.weight.copy_(full[:, self.start : self.end])


class QKVParallelLinear(nn.Module):
    """The fused Q, K and V projections of this rank's heads (one matmul instead of three)."""

    def __init__(self, hidden: int, head_dim: int, heads: HeadPartition, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.heads = heads
        self.q_size = len(heads.q_heads) * head_dim
        self.kv_size = len(heads.kv_heads) * head_dim
        out = self.q_size + 2 * self.kv_size
        self.weight = _param(out, hidden, dtype=dtype)
        self.bias = _param(out, dtype=dtype) if bias else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of this rank's heads, each ``[tokens, heads * head_dim]``."""
        return decode_matmul(x, self.weight, self.bias).split([self.q_size, self.kv_size, self.kv_size], dim=-1)

    def load(self, which: str, full: torch.Tensor, bias: bool = False) -> None:
        """Place this rank's heads of the full ``q``, ``k`` or ``v`` projection into the fused weight."""
        heads = self.heads.q_heads if which == "q" else self.heads.kv_heads
        offset = {"q": 0, "k": self.q_size, "v": self.q_size + self.kv_size}[which]
        rows = full[heads.start * self.head_dim : heads.stop * self.head_dim]
        target = self.bias if bias else self.weight
        target[offset : offset + rows.shape[0]].copy_(rows)


class GateUpParallelLinear(nn.Module):
    """The fused gate and up projections of the MLP, intermediate features split across ranks."""

    def __init__(self, hidden: int, intermediate: int, tp: TensorParallel, dtype: torch.dtype) -> None:
        super().__init__()
        self.start, self.end = shard_range(intermediate, tp.size, tp.rank)
        self.size = self.end - self.start
        self.weight = _param(2 * self.size, hidden, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` for this rank's intermediate features."""
        return decode_matmul_silu(x, self.weight)

    def load(self, which: str, full: torch.Tensor) -> None:
        """Place this rank's rows of the full ``gate`` or ``up`` projection."""
        offset = 0 if which == "gate" else self.size
        self.weight[offset : offset + self.size].copy_(full[self.start : self.end])


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split across ranks; rows outside a rank's slice read as zero."""

    def __init__(self, vocab: int, hidden: int, tp: TensorParallel, dtype: torch.dtype) -> None:
        super().__init__()
        self.tp = tp
        self.start, self.end = shard_range(vocab, tp.size, tp.rank)
        self.weight = _param(self.end - self.start, hidden, dtype=dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of ``ids``, summed over ranks so every rank holds the full result."""
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        inside = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        out = out * inside.unsqueeze(-1).to(out.dtype)
        return self.tp.all_reduce(out)

    def load(self, full: torch.Tensor) -> None:
        """Cut this rank's vocabulary rows out of the full table."""
        self.weight.copy_(full[self.start : self.end])


class ParallelLMHead(nn.Module):
    """Output projection to the vocabulary, vocab split across ranks and gathered for sampling."""

    def __init__(self, vocab: int, hidden: int, tp: TensorParallel, dtype: torch.dtype) -> None:
        super().__init__()
        self.tp = tp
        self.sizes = [e - s for s, e in (shard_range(vocab, tp.size, r) for r in range(tp.size))]
        self.start, self.end = shard_range(vocab, tp.size, tp.rank)
        self.weight = _param(self.end - self.start, hidden, dtype=dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits over the whole vocabulary."""
        return self.tp.all_gather_last_dim(decode_matmul(hidden, self.weight).float(), self.sizes)

    def load(self, full: torch.Tensor) -> None:
        """Cut this rank's vocabulary rows out of the full projection."""
        self.weight.copy_(full[self.start : self.end])
