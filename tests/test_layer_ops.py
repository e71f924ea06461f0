"""The fused layer kernels (Triton, through the CPU interpreter) against their float32 torch twins.

Fresh random inputs per test (seed printed; rerun one with ATTNSCOPE_TEST_SEED=<seed>), odd
sizes, non-contiguous views as the model passes them, GQA head counts, padding slots.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from attnscope.kernels.layer_ops import rms_norm, rotate_and_store, silu_and_mul  # noqa: E402
from attnscope.kernels.layer_ops_reference import rotate_ref  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture
def rng():
    seed = int(os.environ.get("ATTNSCOPE_TEST_SEED", random.randrange(2**31)))
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 64), (5, 576), (3, 1000)])
def test_rms_norm_matches_float32_math(rng, dtype, rows, cols):
    x = torch.randn(rows, cols, generator=rng).to(dtype)
    w = (1 + 0.1 * torch.randn(cols, generator=rng)).to(dtype)
    got, none = rms_norm(x, w, 1e-5, force_triton=True)
    assert none is None
    xf = x.float()
    want = w.float() * (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5))
    _close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_residual_returns_the_rounded_sum(rng, dtype):
    x = torch.randn(7, 96, generator=rng).to(dtype)
    res = torch.randn(7, 96, generator=rng).to(dtype)
    w = torch.randn(96, generator=rng).to(dtype)
    got, summed = rms_norm(x, w, 1e-6, residual=res, force_triton=True)
    ref, ref_sum = rms_norm(x, w, 1e-6, residual=res)
    assert torch.equal(ref_sum, x + res)  # the twin rounds the sum to the dtype as torch does
    if dtype == torch.bfloat16:  # the interpreter truncates bf16 conversions instead of rounding
        _close(summed, ref_sum, dtype)
    else:
        assert torch.equal(summed, ref_sum)
    _close(got, ref, dtype)


def test_rms_norm_of_per_head_views(rng):
    """Qwen3's q/k norms normalise each head of a strided ``[N, H, D]`` view."""
    qkv = torch.randn(4, 3 * 8 * 32, generator=rng, dtype=torch.float16)
    q = qkv[:, : 8 * 32].view(4, 8, 32)
    w = torch.randn(32, generator=rng, dtype=torch.float16)
    got, _ = rms_norm(q, w, 1e-6, force_triton=True)
    want, _ = rms_norm(q, w, 1e-6)
    assert got.shape == q.shape
    _close(got, want, torch.float16)


def _rope(n: int, dim: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.rand(n, dim // 2, generator=rng) * 100
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_heads,kv_heads,dim", [(9, 3, 64), (8, 8, 16), (6, 1, 128), (12, 4, 32)])
def test_rotate_and_store_matches_twin(rng, dtype, q_heads, kv_heads, dim):
    n, block_size, blocks = 5, 8, 6
    qkv = torch.randn(n, (q_heads + 2 * kv_heads) * dim, generator=rng).to(dtype)
    q, k, v = (t.view(n, -1, dim) for t in qkv.split([q_heads * dim, kv_heads * dim, kv_heads * dim], dim=-1))
    cos, sin = _rope(n, dim, rng)
    cos, sin = cos.to(dtype), sin.to(dtype)
    slots = torch.randperm(blocks * block_size, generator=rng)[:n]
    slots[2] = -1  # a CUDA-graph padding row: rotated, never stored
    caches = [torch.full((blocks, block_size, kv_heads, dim), float("nan"), dtype=dtype) for _ in range(4)]
    q_rot, k_rot = rotate_and_store(q, k, v, cos, sin, caches[0], caches[1], slots, force_triton=True)
    q_ref, k_ref = rotate_and_store(q, k, v, cos, sin, caches[2], caches[3], slots)
    _close(q_rot, q_ref, dtype)
    _close(k_rot, k_ref, dtype)
    for got, want in ((caches[0], caches[2]), (caches[1], caches[3])):
        flat_got, flat_want = got.view(-1, kv_heads, dim), want.view(-1, kv_heads, dim)
        assert torch.equal(flat_got.isnan(), flat_want.isnan())  # same slots written, padding row skipped
        assert flat_got.isnan().all(dim=(1, 2)).sum() == blocks * block_size - (n - 1)
        written = ~flat_got.isnan().all(dim=(1, 2))
        _close(flat_got[written], flat_want[written], dtype)
    assert torch.equal(caches[1].view(-1, kv_heads, dim)[slots[0]], v[0])


def test_rotation_is_undone_by_negated_sine(rng):
    x = torch.randn(3, 4, 64, generator=rng)
    cos, sin = _rope(3, 64, rng)
    back = rotate_ref(rotate_ref(x, cos, sin), cos, -sin)
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,features", [(1, 1536), (4, 100), (3, 2500)])
def test_silu_and_mul_matches_float32_math(rng, dtype, rows, features):
    gate_up = torch.randn(rows, 2 * features, generator=rng).to(dtype)
    got = silu_and_mul(gate_up, force_triton=True)
    gate, up = gate_up.float().chunk(2, dim=-1)
    _close(got, F.silu(gate) * up, dtype)
