"""The decode matmul kernel (Triton, through the CPU interpreter) against its float32 torch twins.

Fresh random inputs per test (seed printed; rerun one with ATTNSCOPE_TEST_SEED=<seed>): batch
sizes from one row to past ``MAX_ROWS``, widths and depths that are not multiples of the tiles,
bias, fused SwiGLU, the launch shapes ``tile_config`` picks for real model shapes. fp32 and
fp16 only: the interpreter computes bf16 ``tl.dot`` wrongly.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from attnscope.kernels.decode_matmul import (MAX_ROWS, TileConfig, _block_rows, decode_matmul,  # noqa: E402
                                             decode_matmul_ref, decode_matmul_silu, decode_matmul_silu_ref,
                                             tile_config, variant_rows)
from attnscope.kernels.layer_ops_reference import silu_and_mul_ref  # noqa: E402

TOL = {torch.float32: 2e-5, torch.float16: 2e-3}


@pytest.fixture
def rng():
    seed = int(os.environ.get("ATTNSCOPE_TEST_SEED", random.randrange(2**31)))
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def _inputs(rng, rows, columns, depth, dtype):
    x = torch.randn(rows, depth, generator=rng).to(dtype)
    w = (torch.randn(columns, depth, generator=rng) / depth ** 0.5).to(dtype)
    return x, w


def _close(got, want, dtype):
    torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,columns,depth", [(1, 40, 70), (3, 96, 200), (17, 130, 96), (MAX_ROWS, 64, 300),
                                                (MAX_ROWS + 5, 33, 129)])
def test_matmul_matches_float32_math(rng, dtype, rows, columns, depth):
    x, w = _inputs(rng, rows, columns, depth, dtype)
    bias = torch.randn(columns, generator=rng).to(dtype)
    config = TileConfig(block_n=32, block_k=64, stages=3, warps=4)
    _close(decode_matmul(x, w, force_triton=True, config=config), decode_matmul_ref(x, w), dtype)
    _close(decode_matmul(x, w, bias, force_triton=True, config=config), decode_matmul_ref(x, w, bias), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,features,depth", [(1, 20, 70), (5, 48, 200), (33, 65, 64)])
def test_fused_swiglu_equals_matmul_then_activation(rng, dtype, rows, features, depth):
    """Both halves are rounded to the dtype before the activation, as an unfused matmul + SwiGLU does."""
    x, w = _inputs(rng, rows, 2 * features, depth, dtype)
    got = decode_matmul_silu(x, w, force_triton=True, config=TileConfig(block_n=16, block_k=64, stages=2, warps=4))
    _close(got, decode_matmul_silu_ref(x, w), dtype)
    assert got.shape == (rows, features)
    if dtype == torch.float32:
        _close(got, silu_and_mul_ref(x @ w.T), dtype)


def test_picked_launch_shapes_run_model_shaped_matmuls(rng):
    """The shapes ``tile_config`` picks for a narrow and a wide projection, leading dims kept."""
    x, w = _inputs(rng, 6, 2 * 160, 256, torch.float16)
    x3 = x.view(2, 3, 256)
    got = decode_matmul(x3, w, force_triton=True)
    assert got.shape == (2, 3, 320)
    _close(got.view(6, 320), decode_matmul_ref(x, w), torch.float16)
    _close(decode_matmul_silu(x3, w, force_triton=True).view(6, 160), decode_matmul_silu_ref(x, w), torch.float16)


def test_tile_config_fits_shared_memory_and_covers_the_sms():
    for rows in (1, 8, 32, MAX_ROWS):
        for columns, silu in ((2048, False), (4096, False), (6144, False), (14336, True), (128256, False)):
            config = tile_config(rows, columns, silu, num_sms=132)
            weight_rows = config.block_n * (2 if silu else 1)
            block_rows = max(16, rows)
            assert config.stages * (block_rows + weight_rows) * config.block_k * 2 <= 224 * 1024
            assert -(-columns // config.block_n) >= 132 // 2 or config.block_n == 16


def test_cpu_inputs_take_torch(rng):
    """Without a GPU (or forcing) the functions are exactly ``F.linear`` and a matmul + SwiGLU."""
    x, w = _inputs(rng, 4, 64, 32, torch.float32)
    assert torch.equal(decode_matmul(x, w), F.linear(x, w))
    assert torch.equal(decode_matmul_silu(x, w), silu_and_mul_ref(F.linear(x, w)))


def test_variant_rows_reach_every_variant_a_row_count_selects():
    """Every row count the kernel takes (2 to ``MAX_ROWS``; a single row is what every one-row decode graph launches)
    selects the same variant as one of ``variant_rows``, which the engine runs at start-up: rows per program, the
    launch shape they imply (plain and SwiGLU, narrow and wide weights) and Triton's divisible-by-16 case."""
    def variant(rows: int) -> tuple:
        shapes = tuple(tile_config(rows, columns, silu, 132) for columns in (4096, 14336) for silu in (False, True))
        return _block_rows(rows), shapes, rows % 16 == 0

    warmed = {variant(rows) for rows in variant_rows()}
    assert {variant(rows) for rows in range(2, MAX_ROWS + 1)} == warmed
