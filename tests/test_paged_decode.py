"""Paged decode attention: Triton split-K kernel vs the float32 reference vs float64 naive.

Runs the Triton kernels on the CPU through the interpreter, so TRITON_INTERPRET
must be set before triton is imported. Every test draws a fresh seed (printed,
and shown on failure); rerun one with ATTNSCOPE_TEST_SEED=<seed>. The
interpreter's bf16 ``tl.dot`` is wrong, so kernel tests use fp16 and fp32.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import itertools  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from attnscope.kernels.paged_decode import default_num_splits, paged_decode_attention  # noqa: E402
from attnscope.kernels.reference import (  # noqa: E402
    gather_paged_kv,
    paged_decode_attention_ref,
)

TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3)}  # (rtol, atol)


@dataclass
class PagedCase:
    """One random decode batch: paged caches plus the same K/V stored contiguously."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    scale: float

    def inputs(self) -> tuple:
        """Positional arguments shared by the kernel and the reference."""
        return self.q, self.k_cache, self.v_cache, self.block_tables, self.context_lens, self.scale


def make_case(
    seed: int,
    lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    v_row_stride_factor: int = 1,
) -> PagedCase:
    """Scatter random per-sequence K/V into a NaN-filled cache through shuffled block tables.

    Unused slots, unused blocks and the tail of each last block stay NaN, so any
    read outside a sequence's context poisons the result. Tables are padded with
    0 (a real block of some other sequence). ``v_row_stride_factor > 1`` makes
    the V cache a non-contiguous view to exercise stride plumbing.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(n / block_size) for n in lens]
    num_blocks = sum(blocks_per_seq) + 3
    physical = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.zeros((len(lens), max(blocks_per_seq) + 2), dtype=torch.int32)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
    v_storage = torch.full(cache_shape[:3] + (head_dim * v_row_stride_factor,), float("nan"), dtype=dtype)
    v_cache = v_storage[..., :head_dim]

    keys, values, cursor = [], [], 0
    for b, (n, blocks) in enumerate(zip(lens, blocks_per_seq)):
        ids = physical[cursor : cursor + blocks]
        cursor += blocks
        block_tables[b, :blocks] = ids.int()
        slots = (ids[:, None] * block_size + torch.arange(block_size)).reshape(-1)[:n]
        keys.append(torch.randn((n, num_kv_heads, head_dim), generator=gen).to(dtype))
        values.append(torch.randn((n, num_kv_heads, head_dim), generator=gen).to(dtype))
        k_cache.view(-1, num_kv_heads, head_dim)[slots] = keys[-1]
        v_cache.flatten(0, 1)[slots] = values[-1]
    q = (1.5 * torch.randn((len(lens), num_heads, head_dim), generator=gen)).to(dtype)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    return PagedCase(q, k_cache, v_cache, block_tables, context_lens, keys, values, head_dim**-0.5)


def naive_attention_f64(case: PagedCase) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent oracle: per-sequence, per-head float64 softmax over contiguous K/V."""
    batch, num_heads, head_dim = case.q.shape
    group = num_heads // case.keys[0].shape[1]
    out = torch.zeros((batch, num_heads, head_dim), dtype=torch.float64)
    lse = torch.full((batch, num_heads), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        for h in range(num_heads):
            if case.keys[b].shape[0] == 0:
                continue
            k = case.keys[b][:, h // group].double()
            v = case.values[b][:, h // group].double()
            logits = (k @ case.q[b, h].double()) * case.scale
            lse[b, h] = torch.logsumexp(logits, dim=0)
            out[b, h] = torch.softmax(logits, dim=0) @ v
    return out, lse


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, what: str, seed: int
) -> None:
    """``torch.testing.assert_close`` in float64 whose message names the quantity and the seed."""
    torch.testing.assert_close(
        actual.double(),
        expected.double(),
        rtol=rtol,
        atol=atol,
        equal_nan=False,
        msg=lambda m: f"{what} (seed={seed}): {m}",
    )


def check_kernel_against_reference(case: PagedCase, num_splits: int | None, seed: int) -> None:
    """Run the Triton kernel and compare out / lse with the reference on the upcast inputs."""
    out, lse = paged_decode_attention(*case.inputs(), num_splits=num_splits)
    q, k_cache, v_cache, block_tables, context_lens, scale = case.inputs()
    ref_out, ref_lse = paged_decode_attention_ref(
        q.float(), k_cache.float(), v_cache.float(), block_tables, context_lens, scale
    )
    rtol, atol = TOLERANCES[q.dtype]
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:2]
    assert_close(out, ref_out, rtol, atol, "out", seed)
    assert_close(lse, ref_lse, 1e-5, 1e-5, "lse", seed)


# (dtype, lens, num_heads, num_kv_heads, head_dim, block_size, num_splits)
KERNEL_CASES = [
    pytest.param(torch.float32, [1], 4, 4, 64, 16, None, id="len1-mha-auto"),
    pytest.param(torch.float32, [37, 16, 64, 1], 9, 3, 64, 16, 1, id="smollm2-gqa3-mixed-1split"),
    pytest.param(torch.float32, [100, 33, 7], 9, 3, 64, 16, 3, id="gqa3-3splits"),
    pytest.param(torch.float16, [130, 48, 5], 8, 2, 128, 16, 4, id="fp16-gqa4-d128"),
    pytest.param(torch.float16, [200, 1, 64], 16, 2, 64, 8, 7, id="fp16-gqa8-bs8-7splits"),
    pytest.param(torch.float32, [40, 17], 8, 1, 32, 32, 16, id="gqa8-d32-more-splits-than-blocks"),
    pytest.param(torch.float16, [257, 128], 6, 6, 64, 128, 2, id="fp16-bs128-wider-than-tile"),
    pytest.param(torch.float32, [64, 192, 65], 12, 4, 64, 64, 5, id="bs64-boundaries-5splits"),
    pytest.param(torch.float16, [300, 9], 9, 3, 64, 16, None, id="fp16-auto-splits"),
    pytest.param(torch.float32, [333, 70, 128], 8, 4, 64, 16, 2, id="gqa2-many-tiles-per-split"),
    pytest.param(torch.float16, [450], 9, 3, 64, 16, 1, id="fp16-long-1split"),
]


@pytest.mark.parametrize(
    "dtype, lens, num_heads, num_kv_heads, head_dim, block_size, num_splits", KERNEL_CASES
)
def test_kernel_matches_reference(
    seed: int,
    dtype: torch.dtype,
    lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    num_splits: int | None,
) -> None:
    """Triton output and lse agree with the float32 reference on the same (upcast) inputs."""
    case = make_case(seed, lens, num_heads, num_kv_heads, head_dim, block_size, dtype)
    check_kernel_against_reference(case, num_splits, seed)


@pytest.mark.parametrize("draw", range(6))
def test_kernel_matches_reference_random_config(seed: int, draw: int) -> None:
    """A fresh random shape per draw: GQA ratio, head_dim, block_size, dtype, lengths and splits."""
    rng = random.Random(seed)
    group = rng.choice([1, 2, 3, 4, 8])
    num_kv_heads = rng.choice([1, 2, 3])
    block_size = rng.choice([8, 16, 32, 64])
    lens = [rng.choice([1, block_size, rng.randint(1, 200)]) for _ in range(rng.randint(1, 4))]
    case = make_case(
        seed,
        lens,
        group * num_kv_heads,
        num_kv_heads,
        rng.choice([32, 64, 128]),
        block_size,
        rng.choice([torch.float16, torch.float32]),
    )
    num_splits = rng.choice([None, 1, 2, rng.randint(3, 12)])
    print(f"draw={draw} lens={lens} G={group} Hkv={num_kv_heads} bs={block_size} splits={num_splits}")
    check_kernel_against_reference(case, num_splits, seed)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_kernel_empty_sequence_and_out_buffer(seed: int, num_splits: int) -> None:
    """A zero-length sequence yields out 0 / lse -inf; a strided ``out`` is filled and returned."""
    case = make_case(seed, [45, 0, 16], 8, 4, 64, 16, torch.float32, v_row_stride_factor=2)
    out_storage = torch.full((3, 8, 128), float("nan"))
    out_view = out_storage[..., :64]
    out, lse = paged_decode_attention(*case.inputs(), num_splits=num_splits, out=out_view)
    ref_out, ref_lse = paged_decode_attention_ref(*case.inputs())
    assert out is out_view
    assert torch.isnan(out_storage[..., 64:]).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isneginf(lse[1]).all() and torch.isneginf(ref_lse[1]).all()
    assert_close(out, ref_out, 1e-5, 1e-5, "out", seed)
    assert_close(lse, ref_lse, 1e-5, 1e-5, "lse", seed)


# (dtype, lens, num_heads, num_kv_heads, head_dim, block_size)
REFERENCE_CASES = [
    pytest.param(torch.float32, [1, 16, 33], 4, 4, 32, 16, id="mha"),
    pytest.param(torch.float32, [50, 48, 1, 7], 9, 3, 64, 16, id="smollm2-gqa3"),
    pytest.param(torch.float32, [0, 100, 64], 8, 2, 64, 8, id="gqa4-empty-seq"),
    pytest.param(torch.float32, [129], 16, 2, 128, 32, id="gqa8-d128"),
    pytest.param(torch.float16, [70, 3], 8, 2, 64, 16, id="fp16"),
]


@pytest.mark.parametrize("dtype, lens, num_heads, num_kv_heads, head_dim, block_size", REFERENCE_CASES)
def test_reference_matches_naive_float64(
    seed: int,
    dtype: torch.dtype,
    lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
) -> None:
    """The paged reference (the oracle) agrees with float64 attention over contiguous K/V."""
    case = make_case(seed, lens, num_heads, num_kv_heads, head_dim, block_size, dtype)
    out, lse = paged_decode_attention_ref(*case.inputs())
    naive_out, naive_lse = naive_attention_f64(case)
    rtol, atol = TOLERANCES[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out, naive_out, rtol, atol, "out", seed)
    assert_close(lse, naive_lse, 1e-5, 1e-5, "lse", seed)


def test_gather_paged_kv_follows_block_tables(seed: int) -> None:
    """Gathered rows equal each sequence's contiguous K up to its own length."""
    case = make_case(seed, [20, 5, 32], 4, 2, 32, 8, torch.float32)
    gathered = gather_paged_kv(case.k_cache, case.block_tables, 32)
    assert gathered.shape == (3, 32, 2, 32)
    for b, keys in enumerate(case.keys):
        assert torch.equal(gathered[b, : keys.shape[0]], keys), f"seed={seed} seq={b}"
    with pytest.raises(ValueError):
        gather_paged_kv(case.k_cache, case.block_tables, 8 * case.block_tables.shape[1] + 1)


def test_default_num_splits() -> None:
    """Small batches with long contexts split to fill the GPU; large batches and short contexts do not."""
    assert default_num_splits(batch=1, num_kv_heads=8, max_len=131072, num_sms=132, head_dim=128) == 33
    assert default_num_splits(batch=1, num_kv_heads=1, max_len=1 << 20, num_sms=132, head_dim=128) == 64
    assert default_num_splits(batch=64, num_kv_heads=8, max_len=8192, num_sms=132, head_dim=128) == 1
    assert default_num_splits(batch=1, num_kv_heads=3, max_len=200, num_sms=132, head_dim=128) == 2
    assert default_num_splits(batch=1, num_kv_heads=3, max_len=0, num_sms=132, head_dim=128) == 1


def test_default_num_splits_leaves_no_split_without_a_tile() -> None:
    """At the length bound every split gets whole tiles, as many as the untrimmed count would give it.

    33 splits of 8K in tiles of 64 give 4 tiles to 32 splits and none to the 33rd, so 32 are launched."""
    assert default_num_splits(batch=1, num_kv_heads=8, max_len=8192, num_sms=132, head_dim=128) == 32
    for num_sms, num_kv_heads, batch, max_len, (head_dim, tile_tokens) in itertools.product(
            (78, 132), (1, 3, 8), (1, 2, 3, 5, 17), (1, 63, 64, 200, 2047, 4097, 8192, 32768, 100000),
            ((256, 32), (128, 64))):
        splits = default_num_splits(batch, num_kv_heads, max_len, num_sms, head_dim)
        wanted = min(-(-2 * num_sms // (batch * num_kv_heads)), -(-max_len // 128), 64)
        tiles = -(-max_len // tile_tokens)
        tiles_per_split = -(-tiles // splits)
        assert (splits - 1) * tiles_per_split < tiles, (num_sms, num_kv_heads, batch, max_len, tile_tokens)
        assert tiles_per_split == -(-tiles // max(wanted, 1)), (num_sms, num_kv_heads, batch, max_len, tile_tokens)


def test_kernel_rejects_bad_inputs(seed: int) -> None:
    """Mismatched heads, non-int32 tables and bad block sizes fail loudly before launch."""
    case = make_case(seed, [10], 6, 3, 32, 8, torch.float32)
    q, k_cache, v_cache, block_tables, context_lens, scale = case.inputs()
    with pytest.raises(ValueError):
        paged_decode_attention(q[:, :5], k_cache, v_cache, block_tables, context_lens, scale)
    with pytest.raises(ValueError):
        paged_decode_attention(q, k_cache, v_cache, block_tables.long(), context_lens, scale)
    with pytest.raises(ValueError):
        odd = torch.zeros((4, 12, 3, 32))
        paged_decode_attention(q, odd, odd, block_tables, context_lens, scale)
    with pytest.raises(ValueError):
        paged_decode_attention(q.half(), k_cache, v_cache, block_tables, context_lens, scale)
