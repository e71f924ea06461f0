"""Paged prefill attention: Triton kernel (interpreter) vs its float32 twin vs attention on contiguous keys.

Chunks continue a cached prefix (prefix-cache hits, later chunks of a chunked prompt): each
query attends causally to its sequence's keys, all read through a block table. The
interpreter's bf16 ``tl.dot`` is wrong, so kernel tests use fp16 and fp32.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from attnscope.kernels.paged_prefill import paged_prefill_attention  # noqa: E402
from attnscope.kernels.reference import paged_prefill_attention_ref  # noqa: E402

TOLERANCES = {torch.float32: 2e-5, torch.float16: 2e-3}


def make_case(seed: int, chunks: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int,
              block_size: int, dtype: torch.dtype, gap: int = 3):
    """Chunks ``(cached, length)`` of distinct sequences in shuffled physical blocks; query rows of the chunks
    separated by ``gap`` unrelated rows (as decode rows sit beside prefill rows in a step).

    Returns q, caches, tables, q_starts, q_lens, cached, and per chunk its contiguous keys and values.
    """
    gen = torch.Generator().manual_seed(seed)
    need = [-(-(c + n) // block_size) for c, n in chunks]
    num_blocks = sum(need) + 5
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    order = torch.randperm(num_blocks, generator=gen).int()
    tables = torch.zeros((len(chunks), max(need)), dtype=torch.int32)
    used = 0
    for c, n in enumerate(need):
        tables[c, :n] = order[used : used + n]
        used += n
    starts, row = [], gap
    for _, length in chunks:
        starts.append(row)
        row += length + gap
    q = (torch.randn((row, num_heads, head_dim), generator=gen) * 1.5).to(dtype)
    contiguous = []
    for c, (offset, length) in enumerate(chunks):
        blocks = tables[c, : need[c]].long()
        keys = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[: offset + length]
        values = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[: offset + length]
        contiguous.append((keys, values))
    ints = lambda values: torch.tensor(values, dtype=torch.int32)  # noqa: E731
    return (q, k_cache, v_cache, tables, ints(starts), ints([n for _, n in chunks]), ints([c for c, _ in chunks]),
            contiguous)


CASES = [  # (chunks (cached, length), Hq, Hkv, head_dim, block_size, dtype)
    pytest.param([(16, 40), (5, 1), (0, 17)], 8, 2, 32, 16, torch.float32, id="gqa4-len1-nocache"),
    pytest.param([(100, 65), (37, 64)], 9, 3, 64, 8, torch.float16, id="fp16-gqa3-block-boundaries"),
    pytest.param([(130, 3)], 4, 4, 32, 32, torch.float32, id="mha-short-after-long-prefix"),
    pytest.param([(7, 130), (64, 64), (1, 2)], 8, 1, 32, 16, torch.float16, id="fp16-gqa8-two-query-blocks"),
]


@pytest.mark.parametrize("chunks, num_heads, num_kv_heads, head_dim, block_size, dtype", CASES)
def test_paged_prefill_matches_reference(seed, chunks, num_heads, num_kv_heads, head_dim, block_size, dtype):
    q, k_cache, v_cache, tables, starts, lens, cached, _ = make_case(
        seed, chunks, num_heads, num_kv_heads, head_dim, block_size, dtype)
    scale = head_dim**-0.5
    sentinel = torch.full_like(q, 7.0)
    got = paged_prefill_attention(q, k_cache, v_cache, tables, starts, lens, cached, scale,
                                  max(n for _, n in chunks), out=sentinel.clone())
    want = paged_prefill_attention_ref(q, k_cache, v_cache, tables, starts, lens, cached, scale)
    owned = torch.zeros(q.shape[0], dtype=torch.bool)
    for s, n in zip(starts.tolist(), lens.tolist()):
        owned[s : s + n] = True
    tol = TOLERANCES[dtype]
    assert torch.allclose(got[owned].float(), want[owned].float(), rtol=tol, atol=tol), f"seed={seed}"
    assert torch.equal(got[~owned], sentinel[~owned])  # rows of no chunk are left alone


def test_reference_equals_causal_attention_on_contiguous_keys(seed):
    """The twin against SDPA on each chunk's keys stored contiguously (queries offset by the cached length)."""
    rng = random.Random(seed)
    chunks = [(rng.randint(0, 90), rng.randint(1, 40)) for _ in range(3)]
    q, k_cache, v_cache, tables, starts, lens, cached, contiguous = make_case(
        seed, chunks, 6, 2, 32, rng.choice([8, 16]), torch.float64)
    scale = 32**-0.5
    got = paged_prefill_attention_ref(q, k_cache, v_cache, tables, starts, lens, cached, scale)
    for (offset, length), start, (keys, values) in zip(chunks, starts.tolist(), contiguous):
        mask = torch.arange(offset + length)[None, :] <= torch.arange(offset, offset + length)[:, None]
        want = F.scaled_dot_product_attention(q[start : start + length].transpose(0, 1)[None],
                                              keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                                              attn_mask=mask, scale=scale, enable_gqa=True)[0].transpose(0, 1)
        assert torch.allclose(got[start : start + length], want, atol=1e-5), f"seed={seed}"  # float32 math


def test_random_shapes(seed):
    rng = random.Random(seed)
    group, num_kv_heads = rng.choice([1, 3, 4, 8]), rng.choice([1, 2])
    block_size, head_dim = rng.choice([8, 16, 32]), rng.choice([16, 32, 64])
    chunks = [(rng.choice([0, 1, block_size, rng.randint(0, 150)]), rng.choice([1, 63, 64, rng.randint(1, 140)]))
              for _ in range(rng.randint(1, 3))]
    dtype = rng.choice([torch.float32, torch.float16])
    q, k_cache, v_cache, tables, starts, lens, cached, _ = make_case(
        seed, chunks, group * num_kv_heads, num_kv_heads, head_dim, block_size, dtype, gap=rng.randint(0, 2))
    print(f"chunks={chunks} G={group} Hkv={num_kv_heads} bs={block_size} D={head_dim} {dtype}")
    scale = head_dim**-0.5
    got = paged_prefill_attention(q, k_cache, v_cache, tables, starts, lens, cached, scale, max(lens.tolist()))
    want = paged_prefill_attention_ref(q, k_cache, v_cache, tables, starts, lens, cached, scale)
    for s, n in zip(starts.tolist(), lens.tolist()):
        tol = TOLERANCES[dtype]
        assert torch.allclose(got[s : s + n].float(), want[s : s + n].float(), rtol=tol, atol=tol), f"seed={seed}"


def test_bad_inputs_name_the_problem():
    q, k_cache, v_cache, tables, starts, lens, cached, _ = make_case(0, [(4, 4)], 4, 2, 32, 16, torch.float32)
    with pytest.raises(ValueError, match="q_lens must be int32"):
        paged_prefill_attention(q, k_cache, v_cache, tables, starts, lens.long(), cached, 1.0, 4)
    with pytest.raises(ValueError, match="share a dtype"):
        paged_prefill_attention(q.half(), k_cache, v_cache, tables, starts, lens, cached, 1.0, 4)
    with pytest.raises(ValueError, match="block_tables"):
        paged_prefill_attention(q, k_cache, v_cache, tables.long(), starts, lens, cached, 1.0, 4)
