"""The capture kernels on a CUDA GPU, where the finish launch's programs really run at once.

Skipped without a GPU. The CPU interpreter runs a launch's programs one after another, so
the finish kernel's tickets (the last program of a row to finish a job finishes the row)
are only raced here: many rows, chunks and splits, repeated, must give bit-identical
results that match the float32 reference.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROWS, HQ, HKV, D, BLOCK = 24, 32, 8, 128, 16


def _decode_case(length: int, seed: int):
    """Random bf16 paged caches and queries for ``ROWS`` sequences of ``length - r`` tokens, every row captured."""
    from attnscope.kernels.capture_reference import CaptureRequest

    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_row = -(-length // BLOCK)
    k_cache = torch.randn((ROWS * blocks_per_row + 1, BLOCK, HKV, D), generator=gen, device="cuda").bfloat16()
    v_cache = torch.randn_like(k_cache, dtype=torch.float32).bfloat16()
    order = torch.randperm(ROWS * blocks_per_row, generator=gen, device="cuda")
    tables = order.view(ROWS, blocks_per_row).int()
    lengths = torch.tensor([length - r for r in range(ROWS)], dtype=torch.int32, device="cuda")
    q = torch.randn((ROWS, HQ, D), generator=gen, device="cuda").bfloat16() * 2
    weights = torch.full((ROWS, HQ), 1.0 / HQ, device="cuda")
    zeros = torch.zeros(ROWS, dtype=torch.int32, device="cuda")
    req = CaptureRequest(q, tables, lengths - 1, weights, zeros, zeros, zeros + 4, top_k=32)
    return q, k_cache, v_cache, tables, lengths, req


@pytest.mark.parametrize("length,splits,statistics", [(8192, 1, True), (5000, 6, True), (5000, 6, False)])
def test_finish_launch_is_deterministic_and_exact_on_cuda(length: int, splits: int, statistics: bool) -> None:
    """Fused decode capture (stored logits, several chunks per row; with and without split-K; with and
    without the statistics, as raw top-k runs) repeated 8 times: identical every time, and top-k,
    probabilities and statistics (zeros without them) match the float32 reference."""
    from dataclasses import replace

    from attnscope.kernels.capture_reference import capture_rows_ref
    from attnscope.kernels.paged_decode import paged_decode_attention

    q, k_cache, v_cache, tables, lengths, req = _decode_case(length, seed=length)
    req = replace(req, statistics=statistics)
    scale = D**-0.5
    rows = torch.arange(ROWS, device="cuda")
    runs = [paged_decode_attention(q, k_cache, v_cache, tables, lengths, scale, num_splits=splits, capture=req,
                                   capture_rows=rows) for _ in range(8)]
    plain_out, plain_lse = paged_decode_attention(q, k_cache, v_cache, tables, lengths, scale, num_splits=splits)
    first = runs[0][2]
    for out, lse, result in runs:
        assert torch.equal(out, plain_out) and torch.equal(lse, plain_lse)
        for name in ("lse", "hist", "entropy", "sink_mass", "num_stat_positions", "topk_pos", "topk_prob"):
            assert torch.equal(getattr(result, name), getattr(first, name)), name
    ref = capture_rows_ref(k_cache, req, scale)
    assert first.recomputed_tiles is None  # ranked from stored logits
    torch.testing.assert_close(first.topk_prob, ref.topk_prob, rtol=2e-3, atol=1e-6)
    gap = (ref.topk_prob[:, :-1] - ref.topk_prob[:, 1:]) > 1e-3 * ref.topk_prob[:, :-1]  # ranks i and i + 1
    separated = gap & torch.cat([torch.ones_like(gap[:, :1]), gap[:, :-1]], dim=1)  # from both neighbours
    assert separated.sum() > ROWS  # the comparison below is not vacuous
    assert torch.equal(first.topk_pos[:, :-1][separated], ref.topk_pos[:, :-1][separated])
    for name in ("lse", "hist", "entropy", "sink_mass"):
        torch.testing.assert_close(getattr(first, name), getattr(ref, name), rtol=1e-3, atol=1e-4)
    assert torch.equal(first.num_stat_positions, ref.num_stat_positions)
    assert bool(first.hist.any()) == statistics


@pytest.mark.parametrize("splits,statistics", [(1, False), (6, True)])
def test_deferred_finish_matches_a_finish_per_layer_on_cuda(splits: int, statistics: bool) -> None:
    """Four layers' fused captures of the same rows finished by one launch (``DeferredFinish``, 96 stacked rows)
    give each layer the attention of the plain kernel and bit for bit the results of finishing alone."""
    from dataclasses import replace

    from attnscope.kernels.capture import DeferredFinish, paged_decode_attention_capture
    from attnscope.kernels.paged_decode import paged_decode_attention

    q, k_cache, v_cache, tables, lengths, req = _decode_case(5000, seed=splits)
    req = replace(req, statistics=statistics)
    gen = torch.Generator(device="cuda").manual_seed(7)
    layers = [(q, k_cache, v_cache)] + [
        (torch.randn(q.shape, generator=gen, device="cuda").bfloat16() * 2,
         torch.randn(k_cache.shape, generator=gen, device="cuda").bfloat16(),
         torch.randn(v_cache.shape, generator=gen, device="cuda").bfloat16()) for _ in range(3)]
    rows = torch.arange(ROWS, device="cuda")
    deferred = DeferredFinish(slots=len(layers))
    stacked = []
    for layer_q, layer_k, layer_v in layers:
        args = (layer_q, layer_k, layer_v, tables, lengths, D**-0.5)
        out, lse, result = paged_decode_attention_capture(*args, req, rows, num_splits=splits, deferred=deferred)
        assert torch.equal(out, paged_decode_attention(*args, num_splits=splits)[0])
        stacked.append(result)
    assert deferred.active
    for (layer_q, layer_k, layer_v), got in zip(layers, stacked):
        want = paged_decode_attention_capture(layer_q, layer_k, layer_v, tables, lengths, D**-0.5, req, rows,
                                              num_splits=splits)[2]
        for name in ("lse", "hist", "entropy", "sink_mass", "num_stat_positions", "topk_pos", "topk_prob"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name


@pytest.mark.parametrize("width", [3000, 70_000])
def test_rank0_ranks_summed_partials_like_the_reference_on_cuda(width: int) -> None:
    """Tensor-parallel rank 0 ranks the summed ``p̄`` with the ``dense_topk`` kernel on a GPU: the same positions
    and probabilities as the reference ranking on the CPU (ties among few distinct values, positions outside
    ``W``, an empty row), the statistics passed through."""
    from attnscope.engine.rank_capture import finish_summed
    from attnscope.kernels.capture_reference import CaptureResult, PartialCapture, finish_partial

    gen = torch.Generator(device="cuda").manual_seed(width)
    rows = 6
    p_bar = torch.rand((rows, width), generator=gen, device="cuda") * 1e-3
    p_bar[1] = torch.randint(0, 5, (width,), generator=gen, device="cuda").float() * 0.125
    p_bar[2, : width // 3] = float("-inf")
    p_bar[3] = float("-inf")
    stats = [torch.randn((rows, HQ), generator=gen, device="cuda"),
             torch.rand((rows, 16), generator=gen, device="cuda"),
             torch.rand(rows, generator=gen, device="cuda"), torch.rand(rows, generator=gen, device="cuda"),
             torch.full((rows,), width, dtype=torch.int32, device="cuda")]
    got = finish_summed(PartialCapture(CaptureResult(*stats, None, None, None, None), p_bar), 32)
    want = finish_partial(PartialCapture(CaptureResult(*(s.cpu() for s in stats), None, None, None, None),
                                         p_bar.cpu()), 32)
    assert got.topk_pos.is_cuda
    assert torch.equal(got.topk_pos.cpu(), want.topk_pos)
    assert torch.equal(got.topk_prob.cpu(), want.topk_prob)
    assert (got.topk_pos[3] == -1).all()
    assert torch.equal(got.lse.cpu(), want.lse) and torch.equal(got.hist.cpu(), want.hist)
