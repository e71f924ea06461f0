"""Attention capture: Triton kernels (standalone and fused into decode) vs the float32 reference.

Runs the Triton kernels on the CPU through the interpreter, so TRITON_INTERPRET must be set
before triton is imported. Every test draws a fresh seed (printed, and shown on failure);
rerun one with ATTNSCOPE_TEST_SEED=<seed>. Kernel tests use fp16 and fp32 (the interpreter's
bf16 ``tl.dot`` is wrong). Top-k positions must match the reference exactly wherever the
ranked value is clearly separated from every other candidate's; where values tie within the
tolerance, the reported values must still match rank by rank and be the true values of the
reported positions (checked against a float64 recomputation).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402
import random  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from attnscope.engine.parallel import partition_heads  # noqa: E402
from attnscope.engine.rope import RotaryEmbedding  # noqa: E402
from attnscope.kernels.layer_ops_reference import rotate_ref as rotate  # noqa: E402
import attnscope.kernels.capture as capture_kernels  # noqa: E402
from attnscope.kernels.capture import (  # noqa: E402
    LOGIT_STORE_MAX_BYTES,
    _distance_bins,
    _empty_partials,
    _pack_keys,
    _unpack_keys,
    DENSE_CHUNK,
    DENSE_MAX_CHUNK,
    DENSE_MAX_LISTS,
    DeferredFinish,
    attention_capture,
    dense_topk,
    paged_decode_attention_capture,
    partial_capture,
)
from attnscope.kernels.capture_reference import (  # noqa: E402
    CaptureRequest,
    CaptureResult,
    PartialCapture,
    capture_rows_ref,
    distance_bin,
    _rank_top_k,
    finish_partial,
    partial_capture_ref,
)
from attnscope.kernels.paged_decode import paged_decode_attention  # noqa: E402

# dtype -> (lse / logit tolerance, probability / statistic tolerance), absolute and relative
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 2e-3)}


@dataclass
class Case:
    """A paged K/V cache of random sequences plus the same keys stored contiguously."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    keys: list[torch.Tensor]
    scale: float


def make_case(
    seed: int,
    lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    key_alphabet: int = 0,
) -> Case:
    """Scatter random K/V into a NaN-filled cache through shuffled block tables.

    Slots outside every sequence stay NaN, so a read past a row's positions poisons the
    result. ``key_alphabet > 0`` draws every key from that many integer-valued vectors and
    makes ``q`` integer-valued too: every dot product is exact, so positions sharing a key
    tie exactly in any implementation.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(n / block_size) for n in lens]
    num_blocks = sum(blocks_per_seq) + 2
    physical = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.zeros((len(lens), max(blocks_per_seq) + 1), dtype=torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    keys, cursor = [], 0
    for b, (n, blocks) in enumerate(zip(lens, blocks_per_seq)):
        ids = physical[cursor : cursor + blocks]
        cursor += blocks
        block_tables[b, :blocks] = ids.int()
        slots = (ids[:, None] * block_size + torch.arange(block_size)).reshape(-1)[:n]
        if key_alphabet:
            alphabet = torch.randint(-2, 3, (key_alphabet, num_kv_heads, head_dim), generator=gen).float()
            k = alphabet[torch.randint(0, key_alphabet, (n,), generator=gen)]
        else:
            k = torch.randn((n, num_kv_heads, head_dim), generator=gen)
        keys.append(k.to(dtype))
        k_cache.view(-1, num_kv_heads, head_dim)[slots] = keys[-1]
        v_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn((n, num_kv_heads, head_dim), generator=gen).to(dtype)
    q = (1.5 * torch.randn((len(lens), num_heads, head_dim), generator=gen)).to(dtype)
    if key_alphabet:
        q = torch.randint(-1, 2, q.shape, generator=gen).to(dtype)
    return Case(q, k_cache, v_cache, block_tables, torch.tensor(lens, dtype=torch.int32), keys, head_dim**-0.5)


def make_request(
    case: Case,
    rng: random.Random,
    top_k: int,
    head_top_k: int,
    query_pos: list[int] | None = None,
    mask_prefix: list[int] | None = None,
    window: list[int] | None = None,
    sink_tokens: list[int] | None = None,
    heads: list[int] | None = None,
) -> CaptureRequest:
    """A capture request over every sequence of ``case``; unspecified settings are drawn at random."""
    rows, num_heads, _ = case.q.shape
    lens = case.context_lens.tolist()
    if query_pos is None:
        query_pos = [n - 1 if rng.random() < 0.6 else rng.randint(0, n - 1) for n in lens]
    if mask_prefix is None:
        mask_prefix = [rng.choice([0, 0, rng.randint(0, p + 1)]) for p in query_pos]
    if window is None:
        window = [rng.choice([0, 0, rng.randint(1, p + 2)]) for p in query_pos]
    if sink_tokens is None:
        sink_tokens = [rng.choice([0, 1, 4]) for _ in query_pos]
    weights = torch.zeros((rows, num_heads))
    for r in range(rows):
        selected = heads if heads is not None else sorted(rng.sample(range(num_heads), rng.randint(1, num_heads)))
        weights[r, selected] = 1.0 / len(selected)

    def ints(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32)

    return CaptureRequest(
        q=case.q,
        block_tables=case.block_tables,
        query_pos=ints(query_pos),
        head_weights=weights,
        mask_prefix=ints(mask_prefix),
        window=ints(window),
        sink_tokens=ints(sink_tokens),
        top_k=top_k,
        head_top_k=head_top_k,
    )


def dense_f64(case: Case, req: CaptureRequest, row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 logits ``[Hq, P+1]``, ``p̄`` ``[P+1]`` and the candidate mask ``W`` of one row."""
    pos = int(req.query_pos[row])
    num_heads, head_dim = req.q.shape[1:]
    keys = case.keys[row][: pos + 1].double()
    if req.rope_cos is not None:
        keys = rotate(keys, req.rope_cos[: pos + 1, None].double(), -req.rope_sin[: pos + 1, None].double())
    group = num_heads // keys.shape[1]
    logits = torch.einsum("hd,thd->ht", req.q[row].double(), keys.repeat_interleave(group, dim=1)) * case.scale
    j = torch.arange(pos + 1)
    unmasked = j >= int(req.mask_prefix[row])
    window = int(req.window[row])
    candidates = unmasked & ((window == 0) | (j > pos - window))
    masked = logits.masked_fill(~unmasked, float("-inf"))
    lse = torch.logsumexp(masked, dim=1, keepdim=True)
    probs = torch.exp(masked - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)))
    p_bar = (req.head_weights[row].double()[:, None] * probs).sum(dim=0)
    return logits, p_bar, candidates


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str, seed: int) -> None:
    """``torch.testing.assert_close`` in float64 with equal infinities, naming quantity and seed."""
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=tol, atol=tol, msg=lambda m: f"{what} (seed={seed}): {m}"
    )


def assert_topk_matches(
    pos: torch.Tensor, values: torch.Tensor, ref_pos: torch.Tensor, ref_values: torch.Tensor,
    dense: torch.Tensor, tol: float, what: str, seed: int,
) -> None:
    """One row's top-k against the reference, tolerant to ties (see the module docstring).

    ``dense`` is the float64 value of every position (``-inf`` outside the candidates).
    """
    assert torch.equal(pos == -1, ref_pos == -1), f"{what} (seed={seed}): padding {pos} vs {ref_pos}"
    assert_close(values, ref_values, tol, f"{what} values", seed)
    valid = pos >= 0
    chosen = pos[valid].long()
    assert len(set(chosen.tolist())) == chosen.numel(), f"{what} (seed={seed}): repeated positions {pos}"
    assert torch.isfinite(dense[chosen]).all() or not valid.any(), f"{what} (seed={seed}): non-candidate in {pos}"
    assert_close(values[valid], dense[chosen], tol, f"{what} values at reported positions", seed)
    for rank in torch.nonzero(valid).flatten().tolist():
        at = int(ref_pos[rank])
        gaps = (torch.cat([dense[:at], dense[at + 1 :]]) - dense[at]).abs()
        if gaps.numel() == 0 or gaps.min() > 2 * tol:
            assert pos[rank] == ref_pos[rank], f"{what} (seed={seed}) rank {rank}: {pos} vs {ref_pos}"


def check_result(result: CaptureResult, case: Case, req: CaptureRequest, seed: int) -> None:
    """Compare every field of ``result`` with ``capture_rows_ref`` on the upcast inputs."""
    ref = capture_rows_ref(case.k_cache.float(), replace(req, q=req.q.float()), case.scale)
    logit_tol, prob_tol = TOLERANCES[case.q.dtype]
    rows, num_heads = req.q.shape[:2]
    assert result.lse.dtype == torch.float32 and result.lse.shape == (rows, num_heads)
    assert_close(result.lse, ref.lse, logit_tol, "lse", seed)
    assert_close(result.hist, ref.hist, prob_tol, "hist", seed)
    assert_close(result.entropy, ref.entropy, 10 * prob_tol, "entropy", seed)
    assert_close(result.sink_mass, ref.sink_mass, prob_tol, "sink_mass", seed)
    assert torch.equal(result.num_stat_positions, ref.num_stat_positions), f"seed={seed}"
    for field in ("topk_pos", "head_topk_pos"):
        assert (getattr(result, field) is None) == (getattr(ref, field) is None), field
    for row in range(rows):
        logits, p_bar, candidates = dense_f64(case, req, row)
        if req.top_k:
            dense = p_bar.masked_fill(~candidates, float("-inf"))
            assert_topk_matches(
                result.topk_pos[row], result.topk_prob[row], ref.topk_pos[row], ref.topk_prob[row],
                dense, prob_tol, f"top-k row {row}", seed,
            )
        for head in range(num_heads if req.head_top_k else 0):
            dense = logits[head].masked_fill(~candidates, float("-inf"))
            assert_topk_matches(
                result.head_topk_pos[row, head], result.head_topk_logit[row, head],
                ref.head_topk_pos[row, head], ref.head_topk_logit[row, head],
                dense, logit_tol * 10, f"head top-k row {row} head {head}", seed,
            )


# Pass B reads the logits Pass A stored, or (no store budget) re-reads the keys.
LOGIT_PATHS = pytest.mark.parametrize("logit_store_bytes", [LOGIT_STORE_MAX_BYTES, 0], ids=["stored", "reread"])

# (dtype, lens, Hq, Hkv, head_dim, block_size, splits, top_k, head_top_k)
CAPTURE_CASES = [
    pytest.param(torch.float32, [37, 1, 64, 100], 8, 2, 32, 16, 3, 8, 5, id="gqa4-odd-len1-3splits"),
    pytest.param(torch.float16, [130, 17], 9, 3, 64, 8, 5, 16, 0, id="fp16-gqa3-bs8-5splits"),
    pytest.param(torch.float32, [5, 70], 4, 4, 32, 32, 1, 64, 64, id="mha-k-over-length"),
    pytest.param(torch.float16, [200, 9], 8, 1, 64, 16, 7, 4, 3, id="fp16-gqa8-7splits"),
    pytest.param(torch.float32, [48, 33], 4, 2, 256, 16, 2, 20, 12, id="d256-tile32"),
    pytest.param(torch.float32, [16, 32, 3], 9, 3, 32, 16, 6, 3, 2, id="block-boundaries-more-splits-than-blocks"),
]


@LOGIT_PATHS
@pytest.mark.parametrize(
    "dtype, lens, num_heads, num_kv_heads, head_dim, block_size, num_splits, top_k, head_top_k", CAPTURE_CASES
)
def test_attention_capture_matches_reference(
    seed: int, dtype: torch.dtype, lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
    block_size: int, num_splits: int, top_k: int, head_top_k: int, logit_store_bytes: int,
) -> None:
    """Standalone capture agrees with the reference under random masks, windows, sinks and heads."""
    case = make_case(seed, lens, num_heads, num_kv_heads, head_dim, block_size, dtype)
    req = make_request(case, random.Random(seed), top_k, head_top_k)
    print(f"pos={req.query_pos.tolist()} mask={req.mask_prefix.tolist()} window={req.window.tolist()} "
          f"sinks={req.sink_tokens.tolist()}")
    result = attention_capture(case.k_cache, req, case.scale, num_splits=num_splits,
                               logit_store_bytes=logit_store_bytes)
    check_result(result, case, req, seed)


def test_attention_capture_edge_sets(seed: int) -> None:
    """Empty ``U``, a single unmasked position, all-sink rows, window < k and one selected head."""
    case = make_case(seed, [40, 40, 40, 40, 40], 8, 2, 32, 16, torch.float32)
    req = make_request(
        case, random.Random(seed), top_k=6, head_top_k=4,
        query_pos=[39, 39, 20, 39, 0],
        mask_prefix=[40, 39, 0, 2, 0],  # U empty / one position / full / prefix / position 0 only
        window=[0, 0, 3, 5, 1],
        sink_tokens=[0, 0, 30, 4, 1],  # C empty in row 2 (all of U are sinks) and row 4
        heads=[5],
    )
    result = attention_capture(case.k_cache, req, case.scale, num_splits=2)
    check_result(result, case, req, seed)
    assert torch.isneginf(result.lse[0]).all() and (result.topk_pos[0] == -1).all()
    assert result.hist[0].sum() == 0 and result.hist[2].sum() == 0 and result.hist[4].sum() == 0
    assert result.topk_pos[1].tolist() == [39, -1, -1, -1, -1, -1]
    assert abs(float(result.topk_prob[1, 0]) - 1.0) < 1e-6


@pytest.mark.parametrize("draw", range(3))
def test_attention_capture_random_config(seed: int, draw: int) -> None:
    """A fresh random shape per draw: GQA ratio, head_dim, block size, dtype, lengths, splits, k."""
    rng = random.Random(seed)
    group = rng.choice([1, 3, 4, 8])
    num_kv_heads = rng.choice([1, 2, 3])
    block_size = rng.choice([8, 16, 32])
    lens = [rng.choice([1, block_size, rng.randint(1, 160)]) for _ in range(rng.randint(1, 3))]
    dtype = rng.choice([torch.float16, torch.float32])
    case = make_case(seed, lens, group * num_kv_heads, num_kv_heads, rng.choice([32, 64]), block_size, dtype)
    req = make_request(case, rng, rng.choice([0, 1, 7, 32]), rng.choice([0, 2, 9]))
    num_splits = rng.choice([None, 1, rng.randint(2, 9)])
    print(f"draw={draw} lens={lens} G={group} Hkv={num_kv_heads} bs={block_size} splits={num_splits} "
          f"k={req.top_k}/{req.head_top_k}")
    check_result(attention_capture(case.k_cache, req, case.scale, num_splits=num_splits), case, req, seed)


def exact_tie_ranking(case: Case, req: CaptureRequest, row: int) -> list[int]:
    """Candidates of ``row`` ranked by ``p̄`` descending, exact ties by position ascending.

    Positions whose selected heads' logits are identical (exact here: integer dot products)
    share one ``p̄`` value by construction, so they tie exactly, whatever the float noise
    of any implementation's ``exp`` at different positions.
    """
    logits, p_bar, candidates = dense_f64(case, req, row)
    selected = logits[req.head_weights[row] > 0].T  # [P+1, |H|]
    positions = torch.nonzero(candidates).flatten().tolist()
    shared: dict[tuple, float] = {}
    value = {j: shared.setdefault(tuple(selected[j].tolist()), float(p_bar[j])) for j in positions}
    return sorted(positions, key=lambda j: (-value[j], j))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ties_rank_lower_position_first(seed: int, dtype: torch.dtype) -> None:
    """Exactly tied logits / ``p̄`` (keys from a 3-vector alphabet) rank by lower position first."""
    case = make_case(seed, [90, 45], 6, 2, 32, 16, dtype, key_alphabet=3)
    req = make_request(case, random.Random(seed), 7, 5, query_pos=[89, 44], mask_prefix=[7, 0],
                       window=[0, 30], sink_tokens=[0, 4])
    result = attention_capture(case.k_cache, req, case.scale, num_splits=3)
    ref = capture_rows_ref(case.k_cache.float(), replace(req, q=req.q.float()), case.scale)
    for row in range(2):
        expected = exact_tie_ranking(case, req, row)[: req.top_k]
        assert result.topk_pos[row].tolist() == expected, f"seed={seed} row {row}: {result.topk_pos[row]}"
    assert torch.equal(result.head_topk_pos, ref.head_topk_pos), f"seed={seed}"  # logits are exact
    for values, positions in ((result.topk_prob, result.topk_pos), (result.head_topk_logit, result.head_topk_pos)):
        tied = values[..., 1:] == values[..., :-1]
        assert tied.any() and (positions[..., 1:] > positions[..., :-1])[tied].all()
    check_result(result, case, req, seed)


@pytest.mark.parametrize("width", [1, 63, 700, 5000, DENSE_CHUNK + 1, 3 * DENSE_CHUNK - 5, DENSE_MAX_LISTS * DENSE_CHUNK + 3])
def test_dense_topk_ranks_like_the_reference(seed: int, width: int) -> None:
    """Dense ``p̄`` rows (one chunk, several merged, or wider chunks past ``DENSE_MAX_LISTS`` of them): the
    same positions and values as the reference ranking, with ties, zeros, positions outside ``W``,
    ``k`` beyond ``|W|`` and an empty row."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    probs = torch.rand((5, width), generator=gen) * 1e-3
    probs[1] = torch.randint(0, 4, (width,), generator=gen).float() * 0.125  # few distinct values: ties
    probs[2, : width // 2] = float("-inf")  # outside W
    probs[3] = 0.0
    probs[3, rng.randrange(width)] = 0.5
    probs[4] = float("-inf")
    for k in (1, rng.randint(2, 63), 64):
        pos, values = dense_topk(probs, k)
        finite = torch.isfinite(probs).sum(dim=-1)
        ref_pos, ref_values = _rank_top_k(probs, finite, k, 0.0)
        assert torch.equal(pos, ref_pos.int()), f"seed={seed} k={k}"
        assert torch.equal(values, ref_values), f"seed={seed} k={k}"
        assert (pos[4] == -1).all() and (values[4] == 0).all()
        for row in (1, 2):  # a launch of one row merges its chunks' lists up a tree
            alone_pos, alone_values = dense_topk(probs[row : row + 1], k)
            assert torch.equal(alone_pos[0], pos[row]) and torch.equal(alone_values[0], values[row]), f"row {row}"


def test_dense_topk_refuses_rows_wider_than_its_chunks() -> None:
    """Rows past ``DENSE_MAX_LISTS`` chunks of ``DENSE_MAX_CHUNK`` positions are refused with the limit named."""
    with pytest.raises(ValueError, match=str(DENSE_MAX_LISTS * DENSE_MAX_CHUNK)):
        dense_topk(torch.zeros((1, DENSE_MAX_LISTS * DENSE_MAX_CHUNK + 1)), 4)


@LOGIT_PATHS
def test_attention_capture_derotates_keys(seed: int, logit_store_bytes: int) -> None:
    """With rope tables every key is rotated back by its own position before the logits."""
    case = make_case(seed, [70, 23], 8, 2, 64, 16, torch.float32)
    rope = RotaryEmbedding(64, 128, theta=10000.0, scaling=None, dtype=torch.float32)
    req = replace(make_request(case, random.Random(seed), 8, 4), rope_cos=rope.cos, rope_sin=rope.sin)
    result = attention_capture(case.k_cache, req, case.scale, num_splits=3, logit_store_bytes=logit_store_bytes)
    check_result(result, case, req, seed)



def rank_request(case: Case, req: CaptureRequest, heads: range, kv_heads: range) -> tuple[torch.Tensor, CaptureRequest]:
    """One tensor-parallel rank's view of ``req``: its KV heads' cache, its query heads and their global weights."""
    k_cache = case.k_cache[:, :, kv_heads.start : kv_heads.stop].contiguous()
    return k_cache, replace(req, q=req.q[:, heads.start : heads.stop].contiguous(),
                            head_weights=req.head_weights[:, heads.start : heads.stop].contiguous())


# (dtype, lens, Hq, Hkv, ranks, top_k, rope)
PARTIAL_CASES = [
    pytest.param(torch.float32, [37, 1, 100], 9, 3, 2, 8, False, id="uneven-6+3-heads"),
    pytest.param(torch.float16, [130, 17], 8, 1, 2, 16, False, id="fp16-replicated-kv-head"),
    pytest.param(torch.float32, [70, 23], 12, 4, 4, 5, True, id="derotated-4-ranks"),
    pytest.param(torch.float32, [5, 64], 4, 4, 2, 0, False, id="no-top-k"),
]


@pytest.mark.parametrize("dtype, lens, num_heads, num_kv_heads, ranks, top_k, rope", PARTIAL_CASES)
def test_rank_partials_match_reference_and_sum_to_the_whole_capture(
    seed: int, dtype: torch.dtype, lens: list[int], num_heads: int, num_kv_heads: int, ranks: int, top_k: int,
    rope: bool,
) -> None:
    """Each rank's Triton partial equals the float32 twin's; the ranks' partials summed (lse side by side)
    and ranked give the capture of all heads at once."""
    case = make_case(seed, lens, num_heads, num_kv_heads, 32, 16, dtype)
    req = make_request(case, random.Random(seed), top_k, 0)
    if rope:
        tables = RotaryEmbedding(32, 128, theta=10000.0, scaling=None, dtype=torch.float32)
        req = replace(req, rope_cos=tables.cos, rope_sin=tables.sin)
    logit_tol, prob_tol = TOLERANCES[dtype]
    parts = []
    for rank in range(ranks):
        part = partition_heads(num_heads, num_kv_heads, ranks, rank)
        k_cache, rank_req = rank_request(case, req, part.q_heads, part.kv_heads)
        mine = partial_capture(k_cache, rank_req, case.scale)
        ref = partial_capture_ref(k_cache.float(), replace(rank_req, q=rank_req.q.float()), case.scale)
        assert_close(mine.stats.lse, ref.stats.lse, logit_tol, f"rank {rank} lse", seed)
        for name in ("hist", "entropy", "sink_mass"):
            assert_close(getattr(mine.stats, name), getattr(ref.stats, name), 10 * prob_tol, f"rank {rank} {name}", seed)
        assert (mine.p_bar is None) == (top_k == 0)
        if top_k:
            assert mine.p_bar.shape == ref.p_bar.shape == (len(lens), case.block_tables.shape[1] * 16)
            assert torch.equal(torch.isinf(mine.p_bar), torch.isinf(ref.p_bar)), f"seed={seed}"
            assert_close(mine.p_bar, ref.p_bar, prob_tol, f"rank {rank} p_bar", seed)
        parts.append(mine)
    stats = replace(parts[0].stats, lse=torch.cat([p.stats.lse for p in parts], dim=1),
                    **{name: sum(getattr(p.stats, name) for p in parts) for name in ("hist", "entropy", "sink_mass")})
    p_bar = sum(p.p_bar for p in parts) if top_k else None
    check_result(finish_partial(PartialCapture(stats, p_bar), top_k), case, req, seed)


def plant_peaks(case: Case, row: int, positions: list[int], strength: float) -> None:
    """Make ``positions`` of ``row`` attract every query head: each KV head's key there points along its group's
    mean query, scaled to ``strength`` (like the sink and retrieved tokens of a trained model's attention)."""
    num_heads, head_dim = case.q.shape[1:]
    num_kv_heads = case.k_cache.shape[2]
    block_size = case.k_cache.shape[1]
    group = num_heads // num_kv_heads
    direction = case.q[row].float().view(num_kv_heads, group, head_dim).mean(dim=1)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    for j in positions:
        key = (strength * direction).to(case.k_cache.dtype)
        case.keys[row][j] = key
        case.k_cache[int(case.block_tables[row, j // block_size]), j % block_size] = key


def tiles_in_window(req: CaptureRequest, row: int, tile: int) -> int:
    """Key tiles of ``tile`` positions that hold a position of ``W`` for ``row``."""
    pos, window = int(req.query_pos[row]), int(req.window[row])
    lo = int(req.mask_prefix[row]) if window == 0 else max(int(req.mask_prefix[row]), pos - window + 1)
    return 0 if lo > pos else pos // tile - lo // tile + 1


@LOGIT_PATHS
@pytest.mark.parametrize("fused", [False, True], ids=["standalone", "fused"])
def test_head_mean_topk_rereads_only_candidate_tiles_and_stays_exact(
    seed: int, fused: bool, logit_store_bytes: int
) -> None:
    """Peaked rows: Pass B re-reads a few key tiles, not all of ``W``; flat rows what they must; both exact.
    With stored logits it re-reads none."""
    rng = random.Random(seed)
    case = make_case(seed, [1500, 1300, 900], 8, 2, 32, 16, torch.float32)
    peaks = [0, *rng.sample(range(1, 1290), 5), 1297]
    plant_peaks(case, 0, [0, 3, *rng.sample(range(5, 1490), 4)], strength=30.0)
    plant_peaks(case, 1, peaks, strength=30.0)  # row 2 stays flat (random keys)
    lens = case.context_lens.tolist()
    req = make_request(case, rng, 4, 0, query_pos=[n - 1 for n in lens], mask_prefix=[0, 2, 0],
                       window=[0, 0, 700], sink_tokens=[1, 0, 0])
    if fused:
        args = (case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, case.scale)
        _, _, result = paged_decode_attention_capture(*args, req, torch.arange(3, dtype=torch.int32), num_splits=3,
                                                      logit_store_bytes=logit_store_bytes)
    else:
        result = attention_capture(case.k_cache, req, case.scale, num_splits=3, logit_store_bytes=logit_store_bytes)
    check_result(result, case, req, seed)
    if logit_store_bytes:  # p̄ from the stored logits: no key is read twice
        assert result.recomputed_tiles is None
        return
    in_window = [tiles_in_window(req, row, 64) for row in range(3)]
    recomputed = result.recomputed_tiles.tolist()
    assert recomputed[0] <= 3 * req.top_k < in_window[0], (recomputed, in_window)
    assert recomputed[1] <= 3 * req.top_k < in_window[1], (recomputed, in_window)
    assert set(result.topk_pos[1].tolist()) <= set(peaks[1:])  # position 0 is masked
    assert recomputed[2] <= req.top_k + in_window[2]


@pytest.mark.parametrize("fused", [False, True], ids=["standalone", "fused"])
def test_stored_pass_b_ranks_across_blocks_and_chunks(seed: int, fused: bool, monkeypatch) -> None:
    """Pass B from stored logits with small blocks and chunks, so every row's ranking passes through the
    finish launch's whole ticket chain (blocks of a chunk, then the chunks of a row): exact, ties
    included, for rows of several chunks, one chunk, a partial last chunk and a narrow window."""
    monkeypatch.setattr(capture_kernels, "DENSE_BLOCK", 64)
    monkeypatch.setattr(capture_kernels, "DENSE_CHUNK", 256)
    rng = random.Random(seed)
    case = make_case(seed, [1500, 200, 777], 8, 2, 32, 16, torch.float32, key_alphabet=3)
    lens = case.context_lens.tolist()
    req = make_request(case, rng, 16, 0, query_pos=[n - 1 for n in lens], mask_prefix=[0, 5, 0],
                       window=[0, 0, 40], sink_tokens=[1, 0, 2])
    if fused:
        args = (case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, case.scale)
        _, _, result = paged_decode_attention_capture(*args, req, torch.arange(3, dtype=torch.int32), num_splits=2)
    else:
        result = attention_capture(case.k_cache, req, case.scale, num_splits=2)
    assert result.recomputed_tiles is None  # ranked from stored logits
    check_result(result, case, req, seed)
    for row in range(3):
        assert result.topk_pos[row].tolist() == exact_tie_ranking(case, req, row)[: req.top_k], f"row {row}"


@pytest.mark.parametrize("length", [1500, 1793])
def test_stored_pass_b_of_one_row_merges_up_a_tree(seed: int, length: int, monkeypatch) -> None:
    """One captured row (batch 1): its chunks' lists merge up a binary tree as they finish -- 6 and 8 chunks of
    256 positions, so pairs, a list without a sibling and the root all occur; a window of the last 300 positions
    puts the answer in the last chunks -- with the exact, tie-ordered top-k."""
    monkeypatch.setattr(capture_kernels, "DENSE_BLOCK", 64)
    monkeypatch.setattr(capture_kernels, "DENSE_CHUNK", 256)
    rng = random.Random(seed)
    case = make_case(seed, [length], 8, 2, 32, 16, torch.float32, key_alphabet=3)
    req = make_request(case, rng, 16, 0, query_pos=[length - 1], mask_prefix=[5], window=[300], sink_tokens=[1])
    args = (case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, case.scale)
    _, _, result = paged_decode_attention_capture(*args, req, torch.arange(1, dtype=torch.int32), num_splits=2)
    assert result.recomputed_tiles is None
    check_result(result, case, req, seed)
    assert result.topk_pos[0].tolist() == exact_tie_ranking(case, req, 0)[: req.top_k]


def test_logits_are_stored_only_within_the_budget(seed: int) -> None:
    """Pass A keeps float32 logits for every head and key tile position only when they fit the byte budget
    and Pass B's chunks span the row."""
    case = make_case(seed, [100, 30], 8, 2, 32, 16, torch.float32)
    req = make_request(case, random.Random(seed), 4, 0)
    needed = 2 * 8 * 2 * 64 * 4  # rows x heads x (2 tiles of 64 positions cover 7 blocks of 16) x float32
    stored = _empty_partials(2, 8, 3, req, 2, torch.device("cpu"), needed)
    assert stored.stores_logits and stored.logits.shape == (2, 8, 128)
    assert not _empty_partials(2, 8, 3, req, 2, torch.device("cpu"), needed - 1).stores_logits
    assert not _empty_partials(2, 8, 3, replace(req, top_k=0), 2, torch.device("cpu"), needed).stores_logits
    too_wide = DENSE_MAX_LISTS * DENSE_MAX_CHUNK // 64 + 1  # tiles: wider than the Pass B chunks rank
    assert not _empty_partials(2, 8, 3, req, too_wide, torch.device("cpu"), 1 << 40).stores_logits


def test_ties_across_many_tiles_rank_lower_position_first(seed: int) -> None:
    """Exact ties spread over more tiles than the floor search looks at still rank by position."""
    case = make_case(seed, [1000], 4, 2, 32, 16, torch.float32, key_alphabet=3)
    req = make_request(case, random.Random(seed), 3, 0, query_pos=[999], mask_prefix=[0], window=[0], sink_tokens=[0])
    result = attention_capture(case.k_cache, req, case.scale)
    assert result.topk_pos[0].tolist() == exact_tie_ranking(case, req, 0)[:3], f"seed={seed}"
    check_result(result, case, req, seed)


@pytest.mark.parametrize("head_top_k, key_alphabet", [(1, 0), (8, 0), (64, 0), (8, 3)],
                         ids=["k1", "k8", "k64", "k8-ties"])
def test_head_topk_over_many_tiles_of_one_split(seed: int, head_top_k: int, key_alphabet: int) -> None:
    """One split per row over up to 24 key tiles, so each program buffers per-head candidates and merges them
    into its running top-k many times (a tile that would overflow a buffer merges it first): the standalone
    and the fused kernel rank every head like the reference, and exactly tied logits by lower position."""
    case = make_case(seed, [1500, 700], 8, 2, 32, 16, torch.float32, key_alphabet=key_alphabet)
    rows = [0, 1]
    req = decode_request(case, rows, random.Random(seed), 0, head_top_k)
    standalone = attention_capture(case.k_cache, req, case.scale, num_splits=1)
    args = (case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, case.scale)
    _, _, fused = paged_decode_attention_capture(*args, req, torch.tensor(rows, dtype=torch.int32), num_splits=1)
    ref = capture_rows_ref(case.k_cache.float(), replace(req, q=req.q.float()), case.scale)
    for result in (standalone, fused):
        if key_alphabet:  # integer dot products: logits exact, every tie resolved by position
            assert torch.equal(result.head_topk_pos, ref.head_topk_pos), f"seed={seed}"
            tied = result.head_topk_logit[..., 1:] == result.head_topk_logit[..., :-1]
            assert tied.any() and (result.head_topk_pos[..., 1:] > result.head_topk_pos[..., :-1])[tied].all()
        check_result(result, case, req, seed)


def decode_request(case: Case, rows: list[int], rng: random.Random, top_k: int, head_top_k: int) -> CaptureRequest:
    """A capture request for the decode rows ``rows`` of ``case`` (query at the last position)."""
    full = make_request(case, rng, top_k, head_top_k, query_pos=[n - 1 for n in case.context_lens.tolist()])
    index = torch.tensor(rows, dtype=torch.long)
    return replace(
        full, q=case.q[index], block_tables=case.block_tables[index], query_pos=full.query_pos[index],
        head_weights=full.head_weights[index], mask_prefix=full.mask_prefix[index], window=full.window[index],
        sink_tokens=full.sink_tokens[index],
    )


# (dtype, lens, Hq, Hkv, head_dim, block_size, splits, captured rows, top_k, head_top_k)
FUSED_CASES = [
    pytest.param(torch.float32, [37, 1, 100, 64], 8, 2, 32, 16, 3, [2, 0], 8, 4, id="gqa4-3splits"),
    pytest.param(torch.float16, [130, 48, 5], 9, 3, 64, 8, 4, [1, 2, 0], 5, 0, id="fp16-gqa3-all-rows"),
    pytest.param(torch.float32, [40, 17], 8, 1, 32, 32, 16, [1], 0, 6, id="gqa8-more-splits-than-blocks"),
    pytest.param(torch.float16, [70, 33, 90], 4, 4, 64, 16, 1, [2], 3, 2, id="fp16-mha-1split"),
    pytest.param(torch.float32, [50, 20], 4, 2, 32, 16, 2, [], 4, 4, id="no-captured-rows"),
]


@LOGIT_PATHS
@pytest.mark.parametrize(
    "dtype, lens, num_heads, num_kv_heads, head_dim, block_size, num_splits, rows, top_k, head_top_k", FUSED_CASES
)
def test_fused_decode_capture(
    seed: int, dtype: torch.dtype, lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
    block_size: int, num_splits: int, rows: list[int], top_k: int, head_top_k: int, logit_store_bytes: int,
) -> None:
    """Fused decode: attention equals the plain kernel's for every row, capture equals the reference.

    The request's queries are NaN: the fused call takes the captured rows' queries from the
    batch (both where Pass B reads stored logits and where it re-reads keys)."""
    case = make_case(seed, lens, num_heads, num_kv_heads, head_dim, block_size, dtype)
    req = decode_request(case, rows, random.Random(seed), top_k, head_top_k)
    args = (case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, case.scale)
    plain_out, plain_lse = paged_decode_attention(*args, num_splits=num_splits)
    unread = replace(req, q=torch.full_like(req.q, float("nan")))
    out, lse, result = paged_decode_attention_capture(
        *args, unread, torch.tensor(rows, dtype=torch.int32), num_splits=num_splits,
        logit_store_bytes=logit_store_bytes,
    )
    assert torch.equal(out, plain_out) and torch.equal(lse, plain_lse), f"seed={seed}"
    index = torch.tensor(rows, dtype=torch.long)
    unmasked = req.mask_prefix == 0  # there the capture's lse over U is the attention's lse
    assert_close(result.lse[unmasked], plain_lse[index][unmasked], TOLERANCES[dtype][0], "lse vs attention", seed)
    case_rows = replace(case, q=case.q[index], keys=[case.keys[r] for r in rows])
    check_result(result, case_rows, req, seed)


# (dtype, lens, Hq, Hkv, head_dim, block_size, splits, captured rows, top_k, statistics)
DEFERRED_CASES = [
    pytest.param(torch.float32, [37, 1, 100, 64], 8, 2, 32, 16, 3, [2, 0], 8, True, id="sketch-like-3splits"),
    pytest.param(torch.float16, [130, 48, 5], 9, 3, 64, 8, 4, [1, 2, 0], 5, False, id="raw-fp16-gqa3"),
    pytest.param(torch.float32, [70, 33, 90], 4, 4, 32, 16, 1, [2], 0, True, id="fingerprint-1split-one-row"),
]


@pytest.mark.parametrize(
    "dtype, lens, num_heads, num_kv_heads, head_dim, block_size, num_splits, rows, top_k, statistics", DEFERRED_CASES
)
def test_deferred_finish_equals_a_finish_per_layer(
    seed: int, dtype: torch.dtype, lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
    block_size: int, num_splits: int, rows: list[int], top_k: int, statistics: bool,
) -> None:
    """Three layers' fused calls sharing a DeferredFinish: each layer's attention equals the plain kernel's,
    and the results the last call's one finish fills equal each layer finishing on its own, field by field."""
    case = make_case(seed, lens, num_heads, num_kv_heads, head_dim, block_size, dtype)
    req = replace(decode_request(case, rows, random.Random(seed), top_k, 0), statistics=statistics)
    gen = torch.Generator().manual_seed(seed)
    layers = [(case.q, case.k_cache, case.v_cache)] + [
        (torch.randn(case.q.shape, generator=gen).to(dtype), torch.randn(case.k_cache.shape, generator=gen).to(dtype),
         torch.randn(case.v_cache.shape, generator=gen).to(dtype)) for _ in range(2)]
    captured = torch.tensor(rows, dtype=torch.int32)
    deferred = DeferredFinish(slots=len(layers))
    stacked, alone = [], []
    for q, k_cache, v_cache in layers:
        args = (q, k_cache, v_cache, case.block_tables, case.context_lens, case.scale)
        plain_out, plain_lse = paged_decode_attention(*args, num_splits=num_splits)
        out, lse, result = paged_decode_attention_capture(*args, req, captured, num_splits=num_splits,
                                                          deferred=deferred)
        assert torch.equal(out, plain_out) and torch.equal(lse, plain_lse), f"seed={seed}"
        stacked.append(result)
        alone.append(paged_decode_attention_capture(*args, req, captured, num_splits=num_splits)[2])
    assert deferred.active and deferred.taken == len(layers)
    for got, want in zip(stacked, alone):
        for name in ("lse", "hist", "entropy", "sink_mass", "num_stat_positions", "topk_pos", "topk_prob"):
            a, b = getattr(got, name), getattr(want, name)
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), f"{name} seed={seed}"


def test_deferred_finish_falls_back_when_stacked_logits_do_not_fit(seed: int) -> None:
    """Where one layer's logits fit the store budget but the stacked layers' do not, each call finishes on its
    own (the DeferredFinish turns inactive) and still matches the reference."""
    rows = [1, 0]
    case = make_case(seed, [130, 48, 5], 8, 2, 32, 16, torch.float32)
    req = decode_request(case, rows, random.Random(seed), 5, 0)
    one_layer = 2 * 8 * 3 * 64 * 4  # rows x heads x (3 tiles of 64 cover 130) x float32
    args = (case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, case.scale)
    deferred = DeferredFinish(slots=2)
    _, _, result = paged_decode_attention_capture(*args, req, torch.tensor(rows, dtype=torch.int32), num_splits=2,
                                                  logit_store_bytes=one_layer, deferred=deferred)
    assert not deferred.active and result.recomputed_tiles is None  # its own finish, from stored logits
    check_result(result, replace(case, q=case.q[torch.tensor(rows)], keys=[case.keys[r] for r in rows]), req, seed)


@pytest.mark.parametrize("combine_elements", [512, 1 << 14], ids=["groups-of-4-heads", "one-group-per-row"])
def test_finish_merges_heads_in_groups(seed: int, combine_elements: int, monkeypatch) -> None:
    """With more (row, head) pairs than SMs the finish merges several heads per program: groups of 4 of a
    row's 9 heads (the last group partial) or the whole row at once give the reference's statistics and top-k."""
    monkeypatch.setattr(capture_kernels, "_num_sms", lambda device: 1)
    monkeypatch.setattr(capture_kernels, "COMBINE_ELEMENTS", combine_elements)  # 5 splits: 4 heads of 16 x 8
    rows = [1, 2, 0]
    case = make_case(seed, [130, 48, 5], 9, 3, 64, 8, torch.float32)
    req = decode_request(case, rows, random.Random(seed), 5, 0)
    args = (case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, case.scale)
    _, _, result = paged_decode_attention_capture(*args, req, torch.tensor(rows, dtype=torch.int32), num_splits=5)
    index = torch.tensor(rows, dtype=torch.long)
    check_result(result, replace(case, q=case.q[index], keys=[case.keys[r] for r in rows]), req, seed)


def test_fused_decode_with_rope_runs_capture_separately(seed: int) -> None:
    """De-rotated capture cannot share the attention's logits: plain attention + standalone capture."""
    case = make_case(seed, [33, 60], 4, 2, 32, 16, torch.float32)
    rope = RotaryEmbedding(32, 64, theta=10000.0, scaling=None, dtype=torch.float32)
    req = replace(decode_request(case, [1], random.Random(seed), 4, 0), rope_cos=rope.cos, rope_sin=rope.sin)
    args = (case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, case.scale)
    plain_out, _ = paged_decode_attention(*args, num_splits=2)
    out, _, result = paged_decode_attention(*args, num_splits=2, capture=req, capture_rows=torch.tensor([1]))
    assert torch.equal(out, plain_out)
    check_result(result, replace(case, q=case.q[1:], keys=case.keys[1:]), req, seed)


@LOGIT_PATHS
@pytest.mark.parametrize("fused", [False, True], ids=["standalone", "fused"])
def test_top_k_without_statistics_ranks_the_same_and_reports_zero_statistics(
    seed: int, fused: bool, logit_store_bytes: int,
) -> None:
    """``statistics=False`` (raw top-k): lse, counts and both top-k match the reference like the full
    capture's; the histogram, entropy and sink mass are zero, as the reference reports them."""
    case = make_case(seed, [150, 37, 1, 90], 8, 2, 32, 16, torch.float32)
    rows = [0, 1, 2, 3]
    req = decode_request(case, rows, random.Random(seed), 9, 3)
    args = (case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, case.scale)
    results = []
    for statistics in (True, False):
        request = replace(req, statistics=statistics)
        if fused:
            out, _, result = paged_decode_attention_capture(
                *args, request, torch.tensor(rows, dtype=torch.int32), num_splits=3,
                logit_store_bytes=logit_store_bytes)
            assert torch.equal(out, paged_decode_attention(*args, num_splits=3)[0]), f"seed={seed}"
        else:
            result = attention_capture(case.k_cache, request, case.scale, num_splits=3,
                                       logit_store_bytes=logit_store_bytes)
        results.append(result)
    full, raw = results
    check_result(full, case, req, seed)
    check_result(raw, case, replace(req, statistics=False), seed)
    assert full.hist.sum() > 0 and full.entropy.abs().sum() > 0
    assert not raw.hist.any() and not raw.entropy.any() and not raw.sink_mass.any()


def test_capture_api_contract(seed: int) -> None:
    """No capture keeps the 2-tuple; empty requests work; bad requests fail before launch."""
    case = make_case(seed, [20], 4, 2, 32, 8, torch.float32)
    args = (case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, case.scale)
    assert len(paged_decode_attention(*args)) == 2
    req = make_request(case, random.Random(seed), 3, 2)
    empty = replace(req, q=req.q[:0], block_tables=req.block_tables[:0], query_pos=req.query_pos[:0],
                    head_weights=req.head_weights[:0], mask_prefix=req.mask_prefix[:0], window=req.window[:0],
                    sink_tokens=req.sink_tokens[:0])
    result = attention_capture(case.k_cache, empty, case.scale)
    assert result.lse.shape == (0, 4) and result.topk_pos.shape == (0, 3) and result.head_topk_pos.shape == (0, 4, 2)
    with pytest.raises(ValueError):
        attention_capture(case.k_cache, replace(req, top_k=65), case.scale)
    with pytest.raises(ValueError):
        attention_capture(case.k_cache, replace(req, query_pos=req.query_pos.long()), case.scale)
    with pytest.raises(ValueError):
        attention_capture(case.k_cache, replace(req, q=req.q.half()), case.scale)
    with pytest.raises(ValueError):
        paged_decode_attention(*args, capture=req)


@triton.jit
def _bins_and_keys_kernel(dist_ptr, bins_ptr, values_ptr, positions_ptr, keys_ptr, out_values_ptr,
                          out_positions_ptr, N: tl.constexpr):
    """Test harness: distance bins, packed keys and their unpacking for N inputs."""
    offs = tl.arange(0, N)
    tl.store(bins_ptr + offs, _distance_bins(tl.load(dist_ptr + offs)))
    keys = _pack_keys(tl.load(values_ptr + offs), tl.load(positions_ptr + offs), offs >= 0)
    tl.store(keys_ptr + offs, keys)
    values, positions = _unpack_keys(keys)
    tl.store(out_values_ptr + offs, values)
    tl.store(out_positions_ptr + offs, positions)


def test_distance_bins_and_key_packing() -> None:
    """Bins match ``distance_bin`` at every edge; keys sort like (value desc, position asc) and round-trip."""
    edges = [0, 1, 2, 3, 4, 7, 8, 255, 256, 32767, 32768, 32769, (1 << 24) + 1, (1 << 31) - 1]
    dist = torch.tensor(edges + [5] * (32 - len(edges)), dtype=torch.int32)
    values = torch.tensor(
        [float("-inf"), -3.5, -1e-30, 0.0, -0.0, 1e-30, 0.25, 0.25, 7.0, float("inf")] + [1.0] * 22
    )
    positions = torch.tensor([3, 9, 1, 5, 4, 8, 2, 6, 0, 7] + list(range(100, 122)), dtype=torch.int32)
    bins = torch.empty(32, dtype=torch.int32)
    keys = torch.empty(32, dtype=torch.int64)
    out_values, out_positions = torch.empty(32), torch.empty(32, dtype=torch.int32)
    _bins_and_keys_kernel[(1,)](dist, bins, values, positions, keys, out_values, out_positions, N=32)
    assert torch.equal(bins.long(), distance_bin(dist.long()))
    assert torch.equal(out_values, torch.where(values == 0, 0.0, values)) and torch.equal(out_positions, positions)
    expected = sorted(range(32), key=lambda i: (-float(values[i]), int(positions[i])))
    assert torch.argsort(keys, descending=True, stable=True).tolist() == expected
