"""Fused Triton kernels for the per-layer glue of a decoder step: norm, rotary + cache write, SwiGLU.

Unfused, each of these is five to eight tiny elementwise launches; at decode batch sizes
launches, not bytes, dominate them, so a Llama-8B step would spend milliseconds between
its matmuls. Fused, a decode layer runs nine kernels: two norms, the QKV matmul, one
rotate-and-store, attention, the output matmul, the gate/up matmul with SwiGLU's activation
in its epilogue (``attnscope.kernels.decode_matmul``) and the down matmul; prefill chunks run
the activation here, after a cuBLAS gate/up matmul.

Every kernel computes in float32 and rounds once, exactly like its twin in
``attnscope.kernels.layer_ops_reference``. The public functions dispatch: Triton for
CUDA tensors (or under ``TRITON_INTERPRET=1`` when ``force_triton``), the twin otherwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnscope.kernels.layer_ops_reference import rms_norm_ref, rotate_and_store_ref, silu_and_mul_ref

SILU_BLOCK = 1024


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
                     stride_x, stride_r, stride_o, stride_ro,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """One row: optionally add the residual (rounded to the input dtype), then RMS-normalise and scale."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    valid = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=valid, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=valid, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=valid)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = (xf * inv_rms).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _rotate_heads(x_ptr, out_ptr, token, heads, dims, partner, sign, cos, sin, num_heads,
                  stride_xn, stride_xh, stride_on, stride_oh):
    """Rotate one token's heads ``[H_PAD, D]`` and store them; returns the rotated values (float32)."""
    valid = heads[:, None] < num_heads
    base = x_ptr + token * stride_xn + heads[:, None] * stride_xh
    x = tl.load(base + dims[None, :], mask=valid, other=0.0).to(tl.float32)
    x_partner = tl.load(base + partner[None, :], mask=valid, other=0.0).to(tl.float32)
    rotated = x * cos[None, :] + sign[None, :] * x_partner * sin[None, :]
    tl.store(out_ptr + token * stride_on + heads[:, None] * stride_oh + dims[None, :],
             rotated.to(out_ptr.dtype.element_ty), mask=valid)
    return rotated


@triton.jit
def _rotate_and_store_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, k_cache_ptr,
                             v_cache_ptr, slots_ptr, num_q_heads, num_kv_heads,
                             stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
                             stride_cn, stride_qon, stride_qoh, stride_kon, stride_koh,
                             stride_kcs, stride_kch, stride_vcs, stride_vch,
                             HEAD_DIM: tl.constexpr, Q_HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr):
    """One token: rotate its query and key heads, store the rotated keys and the values at its slot."""
    token = tl.program_id(0).to(tl.int64)
    half: tl.constexpr = HEAD_DIM // 2
    dims = tl.arange(0, HEAD_DIM)
    partner = (dims + half) % HEAD_DIM
    sign = tl.where(dims < half, -1.0, 1.0)
    cos = tl.load(cos_ptr + token * stride_cn + dims).to(tl.float32)
    sin = tl.load(sin_ptr + token * stride_cn + dims).to(tl.float32)
    q_heads = tl.arange(0, Q_HEADS_PAD)
    _rotate_heads(q_ptr, q_out_ptr, token, q_heads, dims, partner, sign, cos, sin, num_q_heads,
                  stride_qn, stride_qh, stride_qon, stride_qoh)
    kv_heads = tl.arange(0, KV_HEADS_PAD)
    k_rot = _rotate_heads(k_ptr, k_out_ptr, token, kv_heads, dims, partner, sign, cos, sin, num_kv_heads,
                          stride_kn, stride_kh, stride_kon, stride_koh)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    write = (kv_heads[:, None] < num_kv_heads) & (dims[None, :] * 0 + slot >= 0)  # padding rows: slot -1
    tl.store(k_cache_ptr + slot * stride_kcs + kv_heads[:, None] * stride_kch + dims[None, :],
             k_rot.to(k_cache_ptr.dtype.element_ty), mask=write)
    v = tl.load(v_ptr + token * stride_vn + kv_heads[:, None] * stride_vh + dims[None, :],
                mask=kv_heads[:, None] < num_kv_heads, other=0.0)
    tl.store(v_cache_ptr + slot * stride_vcs + kv_heads[:, None] * stride_vch + dims[None, :],
             v.to(v_cache_ptr.dtype.element_ty), mask=write)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_o, BLOCK: tl.constexpr):
    """``silu(gate) * up`` for one block of one row (gate in the first half of the row, up in the second)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=valid, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=valid, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=valid)


def _use_triton(x: torch.Tensor, force_triton: bool) -> bool:
    """Triton on CUDA tensors, or anywhere when the caller forces it (interpreter tests)."""
    return x.is_cuda or force_triton


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             force_triton: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMS norm of the rows of ``x`` ``[..., C]``, optionally of ``x + residual`` (one kernel either way).

    Returns ``(normed, x + residual)``, or ``(normed, None)`` without ``residual``; see
    ``rms_norm_ref``.
    """
    if not _use_triton(x, force_triton):
        return rms_norm_ref(x, weight, eps, residual)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    res2 = res_out = None
    if residual is not None:
        res2 = residual.reshape(-1, shape[-1])
        if res2.stride(-1) != 1:
            res2 = res2.contiguous()
        res_out = torch.empty_like(out)
    rows, cols = x2.shape
    if rows:
        _rms_norm_kernel[(rows,)](
            x2, res2 if res2 is not None else x2, weight, out, res_out if res_out is not None else out, cols, eps,
            x2.stride(0), res2.stride(0) if res2 is not None else 0, out.stride(0),
            res_out.stride(0) if res_out is not None else 0,
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(cols),
            num_warps=4 if cols <= 4096 else 8,
        )
    return out.view(shape), None if res_out is None else res_out.view(shape)


def rotate_and_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     force_triton: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` ``[N, Hq, D]`` and ``k`` ``[N, Hkv, D]`` by ``cos``/``sin`` ``[N, D]`` and store the rotated
    keys and ``v`` at ``slots`` ``[N]`` (``-1`` = no write) of the caches ``[blocks, block_size, Hkv, D]``.

    One kernel for the whole step. Returns the rotated ``(q, k)``; see ``rotate_and_store_ref``.
    """
    if not _use_triton(q, force_triton):
        return rotate_and_store_ref(q, k, v, cos, sin, k_cache, v_cache, slots)
    n, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if head_dim & (head_dim - 1) or head_dim < 2:
        raise ValueError(f"head_dim must be a power of two, got {head_dim}")
    if k_cache.stride(0) != k_cache.shape[1] * k_cache.stride(1) or v_cache.stride(0) != v_cache.shape[1] * v_cache.stride(1):
        raise ValueError("caches must hold their blocks' slots contiguously")
    cos, sin = cos.reshape(n, head_dim), sin.reshape(n, head_dim)
    if cos.stride(1) != 1 or cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    q_out = torch.empty((n, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((n, num_kv_heads, head_dim), dtype=k.dtype, device=k.device)
    if n:
        _rotate_and_store_kernel[(n,)](
            q, k, v, cos, sin, q_out, k_out, k_cache, v_cache, slots, num_q_heads, num_kv_heads,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
            HEAD_DIM=head_dim, Q_HEADS_PAD=triton.next_power_of_2(num_q_heads),
            KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        )
    return q_out, k_out


def silu_and_mul(gate_up: torch.Tensor, force_triton: bool = False) -> torch.Tensor:
    """``silu(gate) * up`` of ``[N, 2F]`` (gate columns first) in one kernel; see ``silu_and_mul_ref``."""
    if not _use_triton(gate_up, force_triton):
        return silu_and_mul_ref(gate_up)
    rows, width = gate_up.shape
    cols = width // 2
    if gate_up.stride(1) != 1:
        gate_up = gate_up.contiguous()
    out = torch.empty((rows, cols), dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        _silu_and_mul_kernel[(rows, triton.cdiv(cols, SILU_BLOCK))](
            gate_up, out, cols, gate_up.stride(0), out.stride(0), BLOCK=SILU_BLOCK)
    return out
