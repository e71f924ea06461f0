"""Capture reference (``kernels/capture_reference.py``) vs a naive float64 oracle.

The oracle follows ``docs/capture.md`` literally: per row and per head, Python loops
over position sets on logits from a contiguous copy of each sequence's keys. The paged
cache is built from those keys through shuffled block tables and is NaN outside them,
so paging mistakes show. Every test draws a fresh seed (printed, and shown on failure);
rerun one with ATTNSCOPE_TEST_SEED=<seed>.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import torch

from attnscope.engine.attention import standalone_capture, standalone_partial
from attnscope.engine.rope import RotaryEmbedding
from attnscope.kernels.layer_ops_reference import rotate_ref as rotate
from attnscope.kernels.capture_reference import (
    NUM_BINS,
    CaptureRequest,
    CaptureResult,
    capture_rows_ref,
    distance_bin,
    entropy_norm,
    fingerprint_v1,
    partial_capture_ref,
)


@dataclass
class Row:
    """One captured row: which sequence, the query position and the row's set options."""

    seq: int
    pos: int
    mask_prefix: int = 0
    window: int = 0
    sink_tokens: int = 0


@dataclass
class Case:
    """Per-sequence contiguous keys and the same keys scattered into a paged cache."""

    keys: list[torch.Tensor]
    k_cache: torch.Tensor
    seq_tables: torch.Tensor
    scale: float


@dataclass
class Expected:
    """Oracle outputs of one row, float64 / Python values."""

    lse: list[float]
    hist: list[float]
    entropy: float
    sink_mass: float
    num_stat: int
    pbar: list[float]
    logits: list[list[float]]
    candidates: list[int]


def paged_case(gen: torch.Generator, keys: list[torch.Tensor], block_size: int) -> Case:
    """Scatter contiguous keys ``[n, Hkv, D]`` into a NaN-filled cache through shuffled block tables."""
    num_kv_heads, head_dim = keys[0].shape[1:]
    blocks_per_seq = [math.ceil(k.shape[0] / block_size) for k in keys]
    num_blocks = sum(blocks_per_seq) + 2
    physical = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros((len(keys), max(blocks_per_seq) + 1), dtype=torch.int32)
    cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    cursor = 0
    for s, (k, blocks) in enumerate(zip(keys, blocks_per_seq)):
        ids = physical[cursor : cursor + blocks]
        cursor += blocks
        tables[s, :blocks] = ids.int()
        slots = (ids[:, None] * block_size + torch.arange(block_size)).reshape(-1)[: k.shape[0]]
        cache.view(-1, num_kv_heads, head_dim)[slots] = k
    return Case(keys, cache, tables, head_dim**-0.5)


def random_case(gen: torch.Generator, lens: list[int], num_kv_heads: int, head_dim: int, block_size: int) -> Case:
    """A paged case with standard-normal keys."""
    keys = [torch.randn((n, num_kv_heads, head_dim), generator=gen) for n in lens]
    return paged_case(gen, keys, block_size)


def random_queries(gen: torch.Generator, num_rows: int, num_heads: int, head_dim: int) -> torch.Tensor:
    """Queries whose per-row scale varies from diffuse to sharply focused attention."""
    scales = torch.tensor([0.5, 1.5, 6.0])[torch.randint(0, 3, (num_rows,), generator=gen)]
    return torch.randn((num_rows, num_heads, head_dim), generator=gen) * scales[:, None, None]


def mean_weights(num_rows: int, num_heads: int, heads: list[int]) -> torch.Tensor:
    """``1/|H|`` on the selected heads of every row, 0 elsewhere."""
    weights = torch.zeros((num_rows, num_heads))
    weights[:, heads] = 1.0 / len(heads)
    return weights


def request(
    case: Case, rows: list[Row], q: torch.Tensor, weights: torch.Tensor, top_k: int, head_top_k: int
) -> CaptureRequest:
    """The capture request for ``rows`` of ``case``."""
    column = lambda name: torch.tensor([getattr(r, name) for r in rows], dtype=torch.int32)  # noqa: E731
    return CaptureRequest(
        q=q,
        block_tables=case.seq_tables[[r.seq for r in rows]],
        query_pos=column("pos"),
        head_weights=weights,
        mask_prefix=column("mask_prefix"),
        window=column("window"),
        sink_tokens=column("sink_tokens"),
        top_k=top_k,
        head_top_k=head_top_k,
    )


def naive_bin(d: int) -> int:
    """Distance bin straight from the definition."""
    return 0 if d < 2 else min(NUM_BINS - 1, d.bit_length() - 1)


def naive_lse(values: list[float]) -> float:
    """logsumexp of a list (``-inf`` when empty)."""
    if not values:
        return float("-inf")
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def naive_row(case: Case, row: Row, q: torch.Tensor, weights: list[float]) -> Expected:
    """Float64 capture of one row over the contiguous keys, head by head, following docs/capture.md."""
    keys = case.keys[row.seq][: row.pos + 1].double()
    num_heads = q.shape[0]
    group = num_heads // keys.shape[1]
    p = row.pos
    unmasked = [j for j in range(p + 1) if j >= row.mask_prefix]
    candidates = [j for j in unmasked if row.window == 0 or j > p - row.window]
    sinks = [j for j in unmasked if j < row.sink_tokens]
    stats = [j for j in unmasked if j >= row.sink_tokens]
    pbar = [0.0] * (p + 1)
    hist = [0.0] * NUM_BINS
    lses, all_logits = [], []
    entropy = sink_mass = 0.0
    for h in range(num_heads):
        s = ((keys[:, h // group] @ q[h].double()) * case.scale).tolist()
        all_logits.append(s)
        lse = naive_lse([s[j] for j in unmasked])
        lses.append(lse)
        for j in unmasked:
            pbar[j] += weights[h] * math.exp(s[j] - lse)
        sink_mass += weights[h] * sum(math.exp(s[j] - lse) for j in sinks)
        lse_stats = naive_lse([s[j] for j in stats])
        for j in stats:
            prob = math.exp(s[j] - lse_stats)
            hist[naive_bin(p - j)] += weights[h] * prob
            if prob > 0:
                entropy -= weights[h] * prob * math.log(prob)
    return Expected(lses, hist, entropy, sink_mass, len(stats), pbar, all_logits, candidates)


def assert_close(actual: torch.Tensor, expected, rtol: float, atol: float, what: str, seed: int) -> None:
    """``torch.testing.assert_close`` in float64 whose message names the quantity and the seed."""
    torch.testing.assert_close(
        actual.double(),
        torch.as_tensor(expected, dtype=torch.float64),
        rtol=rtol,
        atol=atol,
        msg=lambda m: f"{what} (seed={seed}): {m}",
    )


def assert_ranking(
    pos: list[int], val: list[float], exact: list[float], candidates: list[int], pad: float, atol: float, what: str
) -> None:
    """Top-k ``pos``/``val`` against the oracle's ranking of ``candidates`` by ``exact`` (desc, then position).

    Values must match rank by rank; a position may differ from the oracle's only where
    the two candidates' exact values are tied within float32 error (``atol`` + 2e-5 relative).
    """
    k = len(pos)
    tol = lambda v: atol + 2e-5 * abs(v)  # noqa: E731
    expected = sorted(candidates, key=lambda j: (-exact[j], j))[:k]
    n = len(expected)
    assert pos[n:] == [-1] * (k - n), f"{what}: padding positions {pos}"
    assert val[n:] == [pad] * (k - n), f"{what}: padding values {val}"
    assert len(set(pos[:n])) == n and set(pos[:n]) <= set(candidates), f"{what}: {pos} not distinct candidates"
    for rank, (got, want) in enumerate(zip(pos, expected)):
        assert abs(val[rank] - exact[want]) <= tol(exact[want]), f"{what} rank {rank}: {val[rank]} vs {exact[want]}"
        if got != want:
            assert abs(exact[got] - exact[want]) <= tol(exact[want]), f"{what} rank {rank}: {got} vs {want}"


def check_invariants(result: CaptureResult, weights: torch.Tensor, seed: int) -> None:
    """Sum rules and ranges that hold whatever the inputs (weights summing to ``w`` per row)."""
    total = weights.sum(dim=1).double()
    has_stats = result.num_stat_positions > 0
    assert_close(result.hist.sum(dim=1), torch.where(has_stats, total, 0.0), 1e-5, 1e-5, "hist sum", seed)
    assert (result.hist >= 0).all() and (result.sink_mass >= 0).all()
    upper = torch.log(result.num_stat_positions.double().clamp(min=1)) * total
    assert (result.entropy.double() >= -1e-5).all(), f"entropy < 0 (seed={seed})"
    assert (result.entropy.double() <= upper + 1e-5).all(), f"entropy > ln|C| (seed={seed})"
    assert (result.entropy[~has_stats] == 0).all()
    if result.topk_prob is not None:
        assert (result.topk_prob.double().sum(dim=1) <= total + 1e-5).all(), f"top-k mass > 1 (seed={seed})"
    norm = entropy_norm(result.entropy, result.num_stat_positions)
    assert (norm[result.num_stat_positions <= 1] == 0).all()
    if bool((total == 1).all()):
        assert ((norm >= -1e-5) & (norm <= 1 + 1e-5)).all(), f"entropy_norm outside [0, 1] (seed={seed})"


def check_against_naive(
    result: CaptureResult, case: Case, rows: list[Row], q: torch.Tensor, weights: torch.Tensor, seed: int
) -> list[Expected]:
    """Every output of ``result`` against the float64 oracle, plus the invariants."""
    expected = [naive_row(case, row, q[r], weights[r].tolist()) for r, row in enumerate(rows)]
    assert_close(result.lse, [e.lse for e in expected], 1e-5, 1e-5, "lse", seed)
    assert_close(result.hist, [e.hist for e in expected], 1e-5, 1e-5, "hist", seed)
    assert_close(result.entropy, [e.entropy for e in expected], 1e-5, 2e-5, "entropy", seed)
    assert_close(result.sink_mass, [e.sink_mass for e in expected], 1e-5, 1e-6, "sink_mass", seed)
    assert result.num_stat_positions.dtype == torch.int32
    assert result.num_stat_positions.tolist() == [e.num_stat for e in expected]
    for r, (row, e) in enumerate(zip(rows, expected)):
        where = f"row {r} {row} (seed={seed})"
        if result.topk_pos is not None:
            assert result.topk_pos.dtype == torch.int32
            top_pos, top_prob = result.topk_pos[r].tolist(), result.topk_prob[r].tolist()
            assert_ranking(top_pos, top_prob, e.pbar, e.candidates, 0.0, 1e-7, f"top-k {where}")
        if result.head_topk_pos is not None:
            for h in range(q.shape[1]):
                assert_ranking(
                    result.head_topk_pos[r, h].tolist(),
                    result.head_topk_logit[r, h].tolist(),
                    e.logits[h],
                    e.candidates,
                    float("-inf"),
                    2e-5,
                    f"head {h} top-k {where}",
                )
    check_invariants(result, weights, seed)
    return expected


def random_rows(rng: random.Random, lens: list[int], block_size: int, top_k: int, per_seq: int) -> list[Row]:
    """Rows at the ends, block boundaries and random positions, with random mask/window/sink options."""
    rows = []
    for s, n in enumerate(lens):
        boundaries = [p for p in (block_size - 1, block_size, 2 * block_size - 1) if p < n]
        for _ in range(per_seq):
            p = rng.choice([n - 1, n - 1, 0, rng.randint(0, n - 1), *boundaries])
            mask = rng.choice([0, 0, 0, rng.randint(0, p), p])
            window = rng.choice([0, 0, 1, rng.randint(1, max(1, top_k - 1)), rng.randint(1, p + 2)])
            rows.append(Row(s, p, mask, window, rng.choice([0, 1, 4])))
    rng.shuffle(rows)
    return rows


# (lens, num_heads, num_kv_heads, head_dim, block_size, top_k, head_top_k)
CONFIGS = [
    pytest.param([1, 37, 16, 64], 9, 3, 64, 16, 8, 4, id="smollm2-gqa3-odd-and-boundaries"),
    pytest.param([5, 3], 4, 4, 32, 8, 16, 12, id="mha-k-exceeds-length"),
    pytest.param([129, 47], 8, 2, 64, 32, 32, 8, id="gqa4-bs32"),
    pytest.param([200, 1, 65], 16, 2, 32, 64, 64, 64, id="gqa8-k64"),
    pytest.param([33, 17], 3, 1, 16, 16, 5, 0, id="gqa3-mqa-no-head-topk"),
    pytest.param([90], 6, 3, 32, 16, 0, 7, id="gqa2-head-topk-only"),
]


@pytest.mark.parametrize("lens, num_heads, num_kv_heads, head_dim, block_size, top_k, head_top_k", CONFIGS)
def test_matches_naive(
    seed: int, lens, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, top_k: int, head_top_k: int
) -> None:
    """Random rows (all heads, a head subset, or one head) agree with the float64 oracle on every output."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    case = random_case(gen, lens, num_kv_heads, head_dim, block_size)
    rows = random_rows(rng, lens, block_size, top_k, per_seq=5)
    heads = rng.choice([list(range(num_heads)), sorted(rng.sample(range(num_heads), max(1, num_heads // 2)))])
    q = random_queries(gen, len(rows), num_heads, head_dim)
    weights = mean_weights(len(rows), num_heads, heads)
    result = capture_rows_ref(case.k_cache, request(case, rows, q, weights, top_k, head_top_k), case.scale)
    assert (result.topk_pos is None) == (top_k == 0) and (result.head_topk_pos is None) == (head_top_k == 0)
    check_against_naive(result, case, rows, q, weights, seed)


def test_edge_rows(seed: int) -> None:
    """Length 1, window 1, window < k, masks leaving only the query or nothing, sinks inside and outside U."""
    gen = torch.Generator().manual_seed(seed)
    num_heads, num_kv_heads, top_k = 8, 2, 6
    case = random_case(gen, [40], num_kv_heads, 32, 16)
    rows = [
        Row(0, 0),
        Row(0, 0, sink_tokens=1),
        Row(0, 39, window=1),
        Row(0, 39, window=3, sink_tokens=4),
        Row(0, 20, mask_prefix=20),
        Row(0, 20, mask_prefix=20, sink_tokens=4),
        Row(0, 20, mask_prefix=2, sink_tokens=4),
        Row(0, 10, mask_prefix=11),
        Row(0, 15, sink_tokens=1),
        Row(0, 16, window=17),
        Row(0, 31, mask_prefix=16, window=40),
        Row(0, 3, sink_tokens=4),
    ]
    q = random_queries(gen, len(rows), num_heads, 32)
    weights = mean_weights(len(rows), num_heads, list(range(num_heads)))
    result = capture_rows_ref(case.k_cache, request(case, rows, q, weights, top_k, 5), case.scale)
    check_against_naive(result, case, rows, q, weights, seed)

    assert result.topk_pos[2].tolist() == [39] + [-1] * 5
    assert result.topk_pos[3, :3].sort().values.tolist() == [37, 38, 39] and result.topk_pos[3, 3:].eq(-1).all()
    assert result.topk_pos[4].tolist() == [20] + [-1] * 5 and result.num_stat_positions[4] == 1
    assert result.hist[4, 0].item() == pytest.approx(1.0)
    assert result.entropy[4] == 0 and result.topk_prob[4, 0].item() == pytest.approx(1.0)
    assert result.sink_mass[5] == 0
    assert torch.isinf(result.lse[7]).all() and result.topk_pos[7].eq(-1).all() and result.hist[7].eq(0).all()
    assert result.head_topk_pos[7].eq(-1).all() and torch.isneginf(result.head_topk_logit[7]).all()
    assert result.sink_mass[1].item() == pytest.approx(1.0) and result.hist[1].eq(0).all()
    assert result.sink_mass[11].item() == pytest.approx(1.0) and result.num_stat_positions[11] == 0


def test_single_head_is_that_heads_attention(seed: int) -> None:
    """One selected head: p̄ = p_h, and exp(head logit - lse) reproduces p̄ at the same top-k positions."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_heads, k = 9, 8
    case = random_case(gen, [77, 30], 3, 32, 16)
    rows = random_rows(rng, [77, 30], 16, k, per_seq=4)
    head = rng.randrange(num_heads)
    q = random_queries(gen, len(rows), num_heads, 32)
    weights = mean_weights(len(rows), num_heads, [head])
    result = capture_rows_ref(case.k_cache, request(case, rows, q, weights, k, k), case.scale)
    check_against_naive(result, case, rows, q, weights, seed)
    assert torch.equal(result.head_topk_pos[:, head], result.topk_pos), f"seed={seed}"
    valid = result.topk_pos >= 0
    from_logits = torch.exp(result.head_topk_logit[:, head] - result.lse[:, head, None])
    assert_close(from_logits[valid], result.topk_prob[valid], 1e-5, 1e-7, "exp(logit - lse)", seed)


def test_ties_break_by_lower_position(seed: int) -> None:
    """Keys with exactly equal logits: both top-k orders put the lower position first among equals."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    lens, num_heads, num_kv_heads, head_dim = [70, 33], 4, 2, 8
    labels = [torch.randint(0, 3, (n,), generator=gen) for n in lens]
    keys = [torch.randn((n, num_kv_heads, head_dim), generator=gen) for n in lens]
    for k, label in zip(keys, labels):
        k[:, :, 0] = label[:, None].float()
    case = paged_case(gen, keys, 16)
    rows = random_rows(rng, lens, 16, 10, per_seq=5)
    signs = [1.0, 2.0, 3.0, -1.0]  # logits are exact multiples of the label; head 3 prefers low labels
    q = torch.zeros((len(rows), num_heads, head_dim))
    q[:, :, 0] = torch.tensor(signs)
    weights = mean_weights(len(rows), num_heads, [0, 1, 2])
    result = capture_rows_ref(case.k_cache, request(case, rows, q, weights, 10, 10), case.scale)
    check_against_naive(result, case, rows, q, weights, seed)
    for r, row in enumerate(rows):
        label = labels[row.seq].tolist()
        cands = [j for j in range(row.mask_prefix, row.pos + 1) if row.window == 0 or j > row.pos - row.window]
        for h, sign in enumerate(signs):
            want = sorted(cands, key=lambda j: (-sign * label[j], j))[:10]
            assert result.head_topk_pos[r, h].tolist()[: len(want)] == want, f"head {h} row {row} (seed={seed})"
        want = sorted(cands, key=lambda j: (-label[j], j))[:10]
        assert result.topk_pos[r].tolist()[: len(want)] == want, f"row {row} (seed={seed})"


def test_distance_bin_edges() -> None:
    """Bin edges from the definition, for integer and float distances."""
    d = [0, 1, 2, 3, 4, 7, 8, 255, 256, 32767, 32768, 10**6]
    want = [0, 0, 1, 1, 2, 2, 3, 7, 8, 14, 15, 15]
    for dtype in (torch.int32, torch.int64, torch.float32):
        assert distance_bin(torch.tensor(d, dtype=dtype)).tolist() == want
    span = torch.arange(70000)
    assert distance_bin(span).tolist() == [naive_bin(x) for x in span.tolist()]


def test_long_distances_reach_the_last_bin(seed: int) -> None:
    """Rows beyond 32768 positions fill bin 15, exactly as the oracle bins them."""
    gen = torch.Generator().manual_seed(seed)
    case = random_case(gen, [32900], 1, 8, 256)
    rows = [Row(0, 32899, sink_tokens=4), Row(0, 32768), Row(0, 32767, window=9)]
    q = random_queries(gen, len(rows), 2, 8) * 0.2
    weights = mean_weights(len(rows), 2, [0, 1])
    result = capture_rows_ref(case.k_cache, request(case, rows, q, weights, 4, 3), case.scale)
    check_against_naive(result, case, rows, q, weights, seed)
    assert result.hist[0, 15] > 0 and result.hist[1, 15] > 0 and result.hist[2, 15] == 0


def test_fingerprint_and_entropy_norm(seed: int) -> None:
    """fingerprint_v1 bands and entropy_norm follow their definitions on captured rows."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    case = random_case(gen, [300, 2], 2, 32, 16)
    rows = random_rows(rng, [300, 2], 16, 4, per_seq=6)
    q = random_queries(gen, len(rows), 4, 32)
    weights = mean_weights(len(rows), 4, [0, 1, 2, 3])
    result = capture_rows_ref(case.k_cache, request(case, rows, q, weights, 0, 0), case.scale)
    expected = check_against_naive(result, case, rows, q, weights, seed)
    fp = fingerprint_v1(result.hist, result.entropy, result.num_stat_positions)
    assert fp.shape == (len(rows), 20)
    for r, e in enumerate(expected):
        norm = e.entropy / math.log(e.num_stat) if e.num_stat > 1 else 0.0
        want = [sum(e.hist[0:3]), sum(e.hist[3:8]), sum(e.hist[8:16]), norm, *e.hist]
        assert_close(fp[r], want, 1e-5, 2e-5, f"fingerprint row {r}", seed)


def test_derotated_capture_equals_unrotated(seed: int) -> None:
    """Keys cached after RoPE, de-rotated in the capture, give the capture of the un-rotated keys."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    lens, num_heads, num_kv_heads, head_dim = [150, 41], 6, 2, 64
    rope = RotaryEmbedding(head_dim, 256, 10000.0, None, torch.float32)
    plain = [torch.randn((n, num_kv_heads, head_dim), generator=gen) for n in lens]
    rotated = [rotate(k, rope.cos[: k.shape[0], None], rope.sin[: k.shape[0], None]) for k in plain]
    rows = random_rows(rng, lens, 16, 8, per_seq=4)
    q = random_queries(gen, len(rows), num_heads, head_dim)
    weights = mean_weights(len(rows), num_heads, list(range(num_heads)))
    plain_case = paged_case(torch.Generator().manual_seed(seed), plain, 16)
    rotated_case = paged_case(torch.Generator().manual_seed(seed), rotated, 16)
    derotated_req = request(rotated_case, rows, q, weights, 8, 4)
    derotated_req.rope_cos, derotated_req.rope_sin = rope.cos, rope.sin
    derotated = capture_rows_ref(rotated_case.k_cache, derotated_req, rotated_case.scale)
    check_against_naive(derotated, plain_case, rows, q, weights, seed)
    unrotated = capture_rows_ref(plain_case.k_cache, request(plain_case, rows, q, weights, 8, 4), plain_case.scale)
    assert_close(derotated.lse, unrotated.lse, 1e-5, 1e-5, "derotated lse", seed)
    assert_close(derotated.hist, unrotated.hist, 1e-5, 1e-5, "derotated hist", seed)
    assert_close(derotated.entropy, unrotated.entropy, 1e-5, 2e-5, "derotated entropy", seed)


# Chunking changes padding and matmul batch shapes, hence float32 summation order: outputs agree to noise.
CHUNK_ATOL = {"lse": 1e-5, "hist": 1e-7, "entropy": 1e-5, "sink_mass": 1e-7, "topk_prob": 1e-7, "head_topk_logit": 1e-5}


def test_rows_per_chunk_does_not_change_results(seed: int) -> None:
    """Chunks of 1, 5 and 16 rows (different padding) give the same capture, and so do launches of 7 rows whose
    results are concatenated (how the engine runs more captured rows than one launch takes)."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    lens = [260, 9, 70, 1]
    case = random_case(gen, lens, 3, 32, 16)
    rows = random_rows(rng, lens, 16, 12, per_seq=5)
    q = random_queries(gen, len(rows), 9, 32)
    weights = mean_weights(len(rows), 9, [1, 2, 5])
    req = request(case, rows, q, weights, 12, 6)
    results = [capture_rows_ref(case.k_cache, req, case.scale, rows_per_chunk=n) for n in (16, 1, 5)]
    results.append(standalone_capture(case.k_cache, req, case.scale, launch_rows=7))
    assert results[-1].topk_pos.shape[0] == len(rows) > 7
    base = results[0]
    for other in results[1:]:
        assert torch.equal(other.num_stat_positions, base.num_stat_positions)
        for name, atol in CHUNK_ATOL.items():
            assert_close(getattr(other, name), getattr(base, name), 1e-5, atol, name, seed)
        for pos_name, val_name in (("topk_pos", "topk_prob"), ("head_topk_pos", "head_topk_logit")):
            clear = separated_ranks(getattr(base, val_name), CHUNK_ATOL[val_name])
            same = torch.equal(getattr(other, pos_name)[clear], getattr(base, pos_name)[clear])
            assert same, f"{pos_name} differ (seed={seed})"


def test_rank_partial_in_launches_is_the_partial_of_all_rows(seed: int) -> None:
    """A tensor-parallel rank's partial of more rows than one launch takes (prompt attention), run in launches of
    7 rows and concatenated, is its partial of all rows at once: statistics and dense ``p̄`` share alike."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    lens = [150, 40, 3]
    case = random_case(gen, lens, 2, 32, 16)
    rows = random_rows(rng, lens, 16, 12, per_seq=6)
    q = random_queries(gen, len(rows), 4, 32)
    weights = mean_weights(len(rows), 4, [0, 1, 3]) / 2  # the rank's share of the global head weights
    req = request(case, rows, q, weights, 12, 0)
    whole = partial_capture_ref(case.k_cache, req, case.scale)
    launched = standalone_partial(case.k_cache, req, case.scale, launch_rows=7)
    assert launched.p_bar.shape == whole.p_bar.shape and len(rows) > 7
    assert torch.equal(launched.stats.num_stat_positions, whole.stats.num_stat_positions)
    for name in ("lse", "hist", "entropy", "sink_mass"):
        assert_close(getattr(launched.stats, name), getattr(whole.stats, name), 1e-5, CHUNK_ATOL[name], name, seed)
    assert torch.equal(torch.isinf(launched.p_bar), torch.isinf(whole.p_bar))
    assert_close(launched.p_bar, whole.p_bar, 1e-5, 1e-7, "p_bar", seed)


def separated_ranks(values: torch.Tensor, atol: float) -> torch.Tensor:
    """Ranks whose value is not within float32 noise of a neighbouring rank's (their order is unambiguous)."""
    gap = (values[..., 1:] - values[..., :-1]).abs() > atol + 1e-4 * values[..., 1:].abs()
    gap = gap | torch.isinf(values[..., 1:])
    pad = torch.ones_like(gap[..., :1])
    return torch.cat([pad, gap], dim=-1) & torch.cat([gap, pad], dim=-1)


def test_tensor_parallel_partial_sums_add(seed: int) -> None:
    """Two ranks each holding half the heads (weights 1/|H_total|): their weighted sums add to the full capture."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_heads, num_kv_heads, lens = 8, 4, [120, 31]
    case = random_case(gen, lens, num_kv_heads, 32, 16)
    rows = random_rows(rng, lens, 16, 4, per_seq=4)
    q = random_queries(gen, len(rows), num_heads, 32)
    weights = mean_weights(len(rows), num_heads, list(range(num_heads)))
    full = capture_rows_ref(case.k_cache, request(case, rows, q, weights, 0, 0), case.scale)
    parts = []
    for rank in range(2):
        heads, kv_heads = slice(4 * rank, 4 * rank + 4), slice(2 * rank, 2 * rank + 2)
        shard = Case(case.keys, case.k_cache[:, :, kv_heads].contiguous(), case.seq_tables, case.scale)
        shard_req = request(shard, rows, q[:, heads].contiguous(), weights[:, heads].contiguous(), 0, 0)
        parts.append(capture_rows_ref(shard.k_cache, shard_req, shard.scale))
        check_invariants(parts[-1], weights[:, heads], seed)
    assert_close(torch.cat([p.lse for p in parts], dim=1), full.lse, 1e-6, 1e-6, "gathered lse", seed)
    for name in ("hist", "entropy", "sink_mass"):
        summed = getattr(parts[0], name) + getattr(parts[1], name)
        assert_close(summed, getattr(full, name), 1e-5, 1e-6, f"summed {name}", seed)
