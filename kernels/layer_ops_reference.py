"""Float32-semantics torch twins of the fused layer kernels in ``attnscope.kernels.layer_ops``.

They are the CPU path of the engine and the oracle the Triton kernels are tested against.
Each computes in float32 and rounds once to the input dtype, as the kernels do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``weight * x / rms(x)`` over the last dimension; with ``residual``, normalises ``x + residual``.

    Returns ``(normed, x + residual)`` (the new residual stream, in ``x``'s dtype) or
    ``(normed, None)`` without a residual. The sum is rounded to ``x``'s dtype before
    it is normalised, like an unfused ``x + residual`` followed by the norm.
    """
    summed = None
    if residual is not None:
        summed = (x.float() + residual.float()).to(x.dtype)
        x = summed
    xf = x.float()
    normed = F.rms_norm(xf, (x.shape[-1],), eps=eps).to(x.dtype)
    return (weight.float() * normed.float()).to(x.dtype), summed


def rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the HF "rotate half" layout: ``x * cos + rotate_half(x) * sin``: pairs (i, i + D/2) turn
    by the token's angles.

    ``x`` ``[N, H, D]`` with ``cos``/``sin`` ``[N, D]``, or any ``cos``/``sin`` that broadcast against
    ``x``. Computed in float32 (float64 for float64 input) and rounded once. With negated
    ``sin`` it undoes the rotation (de-rotated capture scores).
    """
    math_dtype = torch.promote_types(x.dtype, torch.float32)
    if x.dim() == 3 and cos.dim() == 2:
        cos, sin = cos[:, None], sin[:, None]
    cos, sin = cos.to(math_dtype), sin.to(math_dtype)
    xf = x.to(math_dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def write_kv_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slots: torch.Tensor) -> None:
    """Store keys and values ``[N, Hkv, D]`` at their physical cache slots; slot ``-1`` writes nothing.

    A cache ``[blocks, block_size, Hkv, D]`` has slot ``block * block_size + offset``.
    Padding rows of a CUDA-graph batch carry slot ``-1``.
    """
    slots = slots.long()
    keep = slots >= 0
    if not bool(keep.all()):
        slots, k, v = slots[keep], k[keep], v[keep]
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    k_cache.view(num_slots, *k_cache.shape[2:]).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(num_slots, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))


def rotate_and_store_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys by their tokens' angles and store the rotated keys and the values in the cache.

    Returns the rotated ``(q, k)``.
    """
    q_rot, k_rot = rotate_ref(q, cos, sin), rotate_ref(k, cos, sin)
    write_kv_ref(k_cache, v_cache, k_rot, v, slots)
    return q_rot, k_rot


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a ``[N, 2F]`` tensor holding gate then up (float32 math, one rounding)."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)
