"""Triton matmuls for decode-sized inputs: ``y = x Wᵀ`` when ``x`` has a handful of rows.

A decode step multiplies a few rows (one per sequence) by every weight of the model, so its
matmuls are bound by reading the weights. These kernels tile only the output columns (about
one program per SM, each streaming its weight rows along ``K`` through a deep pipeline) and can
finish SwiGLU in the epilogue: with gate and up rows in one weight ``[2F, K]`` a program
accumulates both halves of its columns and writes ``silu(gate) * up`` ``[M, F]`` directly, so
the activation costs no launch and no round trip. On an H100 (``bench/decode_matmul.py``) they
read Llama-8B's weights faster than cuBLAS at 1–8 rows (gate/up 3–4 %, down 5 %, LM head 6–7 %,
output 14 %) and cut a step's matmul time by 1.5–2.7 % at 32–64 rows.

Both SwiGLU products are rounded to the weight dtype before the activation, exactly like a
matmul followed by ``silu_and_mul``; the float32 twins are ``decode_matmul_ref`` and
``decode_matmul_silu_ref``. The public functions dispatch: Triton for CUDA inputs of at most
``MAX_ROWS`` rows and ``MIN_COLUMNS`` outputs or SwiGLU (anywhere when ``force_triton``, for
interpreter tests), torch otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from attnscope.kernels.layer_ops import silu_and_mul
from attnscope.kernels.layer_ops_reference import silu_and_mul_ref
from attnscope.kernels.paged_decode import _num_sms

MAX_ROWS = 64
MIN_COLUMNS = 4096
SHARED_MEMORY_BUDGET = 224 * 1024  # of the 227 KB a Hopper block may hold


@dataclass(frozen=True)
class TileConfig:
    """Launch shape of one decode matmul: output columns and ``K`` per step, pipeline depth, warps."""

    block_n: int
    block_k: int
    stages: int
    warps: int


@triton.jit
def _decode_matmul_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                          HAS_BIAS: tl.constexpr, SILU: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program: ``BLOCK_N`` output columns for ``BLOCK_M`` rows; with ``SILU`` also the matching
    up-projection rows ``N + n`` and the SwiGLU of the two (``N`` is then the intermediate size)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :]
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_wn + ks[:, None]
    u_ptrs = w_ptrs + N * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = (k + ks) < K
        x = tl.load(x_ptrs + k, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs + k, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        if SILU:
            u = tl.load(u_ptrs + k, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc_up = tl.dot(x, u, acc_up, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = acc.to(out_ptr.dtype.element_ty)
    if SILU:
        gate = out.to(tl.float32)
        up = acc_up.to(out_ptr.dtype.element_ty).to(tl.float32)
        out = (gate / (1.0 + tl.exp(-gate)) * up).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :], out,
             mask=row_ok[:, None] & col_ok[None, :])


def _block_rows(rows: int) -> int:
    """Rows per program: the batch padded to a power of two, at least the 16 a ``tl.dot`` needs."""
    return max(16, triton.next_power_of_2(min(rows, MAX_ROWS)))


def variant_rows() -> tuple[int, ...]:
    """A row count for every kernel variant that the number of rows selects: rows per program 16, 32 or 64 (and
    the launch shape that implies), each for a count divisible by 16 and for another (Triton compiles those
    apart; a single row is a third case, which every single-row decode step launches). The engine runs steps of
    these sizes at start-up, so that no step compiles a variant while serving."""
    return tuple(rows for block in (16, 32, MAX_ROWS) for rows in (block - 3, block))


def _stage_bytes(rows: int, weight_rows: int, block_k: int, element_bytes: int) -> int:
    """Shared memory one pipeline stage holds: a ``K`` step of the input rows and of the weight rows."""
    return (_block_rows(rows) + weight_rows) * block_k * element_bytes


def tile_config(rows: int, columns: int, silu: bool, num_sms: int, element_bytes: int = 2) -> TileConfig:
    """The launch shape for ``rows`` inputs and ``columns`` outputs (SwiGLU: per half) on ``num_sms`` SMs,
    for weights of ``element_bytes`` each.

    Measured on an H100 and an H200 (``bench/decode_matmul.py --sweep``): the best shapes give
    about one program per SM — column blocks as narrow as that allows (16 to 128 weight rows),
    ``K`` steps of 256 for blocks of up to 32 rows and 128 for wider ones (shorter where three
    stages would not fit) — and as many pipeline stages as shared memory holds, up to five; eight
    warps where a program's tile is large (256 weight rows by 32 or more input rows), four elsewhere.
    """
    block_n = min(128, max(16, triton.next_power_of_2(triton.cdiv(columns, num_sms))))
    weight_rows = block_n * (2 if silu else 1)
    block_k = 256 if block_n <= 32 else 128
    while block_k > 32 and 3 * _stage_bytes(rows, weight_rows, block_k, element_bytes) > SHARED_MEMORY_BUDGET:
        block_k //= 2
    stages = max(2, min(5, SHARED_MEMORY_BUDGET // _stage_bytes(rows, weight_rows, block_k, element_bytes)))
    warps = 8 if weight_rows >= 256 and _block_rows(rows) >= 32 else 4
    return TileConfig(block_n=block_n, block_k=block_k, stages=stages, warps=warps)


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, columns: int, silu: bool,
            config: TileConfig | None) -> torch.Tensor:
    """Run the kernel on a 2-D ``x`` ``[M, K]`` (unit stride along ``K``) for ``columns`` outputs."""
    rows, depth = x.shape
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    config = config or tile_config(rows, columns, silu, _num_sms(x.device), weight.element_size())
    out = torch.empty((rows, columns), dtype=x.dtype, device=x.device)
    block_m = _block_rows(rows)
    grid = (triton.cdiv(columns, config.block_n), triton.cdiv(rows, block_m))
    _decode_matmul_kernel[grid](
        x, weight, bias if bias is not None else weight, out, rows, columns, depth,
        x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, SILU=silu, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_stages=config.stages, num_warps=config.warps,
    )
    return out


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, K]`` with unit stride along ``K``."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _use_kernel(x: torch.Tensor, columns: int, silu: bool, force_triton: bool) -> bool:
    """The Triton kernel for decode-sized CUDA inputs, or anywhere when forced (interpreter tests).

    Projections to fewer than ``MIN_COLUMNS`` outputs stay with cuBLAS: a program per SM leaves
    column blocks of 16 rows there, and cuBLAS's split-K kernels read such weights faster (an H100,
    Llama-1B's 2048-wide projections: 1.8 against 2.0 TB/s). SwiGLU always fuses.
    """
    rows = x.numel() // max(1, x.shape[-1])
    return force_triton or (x.is_cuda and rows <= MAX_ROWS and (silu or columns >= MIN_COLUMNS))


def decode_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  force_triton: bool = False, config: TileConfig | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x`` ``[..., K]`` and ``weight`` ``[N, K]``: the decode kernel for
    decode-sized CUDA inputs (see ``_use_kernel``), cuBLAS otherwise. ``config`` overrides the launch
    shape (benchmarks)."""
    if not _use_kernel(x, weight.shape[0], False, force_triton):
        return F.linear(x, weight, bias)
    out = _launch(_flat(x), weight, bias, weight.shape[0], False, config)
    return out.view(*x.shape[:-1], weight.shape[0])


def decode_matmul_silu(x: torch.Tensor, weight: torch.Tensor, force_triton: bool = False,
                       config: TileConfig | None = None) -> torch.Tensor:
    """``silu(x Wᵀ[:F]) * (x Wᵀ[F:])`` for ``weight`` ``[2F, K]`` (gate rows, then up rows): SwiGLU's two
    projections and activation in one kernel for decode-sized CUDA inputs; a matmul followed by
    ``silu_and_mul`` otherwise."""
    if not _use_kernel(x, weight.shape[0] // 2, True, force_triton):
        return silu_and_mul(F.linear(x, weight))
    features = weight.shape[0] // 2
    out = _launch(_flat(x), weight, None, features, True, config)
    return out.view(*x.shape[:-1], features)


def decode_matmul_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 twin of ``decode_matmul``: the product (plus bias) in float32, rounded once."""
    out = x.float() @ weight.float().T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def decode_matmul_silu_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Float32 twin of ``decode_matmul_silu``: both products rounded to the dtype, then SwiGLU in float32."""
    return silu_and_mul_ref(decode_matmul_ref(x, weight))
