"""H100 check and timing of the attention-capture kernels (``attnscope.kernels.capture``).

1. Correctness on the GPU against ``capture_rows_ref`` (float32 on the upcast inputs): the
   standalone capture (with and without de-rotation) and the fused decode path (a subset of
   the batch flagged; attention output compared with the plain kernel for every row), bf16
   and fp16, Llama-8B and GQA-3 shapes, random masks / windows / sinks / head subsets.
2. Timing at Llama-8B attention shapes (Hq=32, Hkv=8, D=128, bf16, block_size 16) for
   B in {1, 8, 32} and L in {2K, 32K, 128K} (one layer, every row the same length):
   (a) plain decode, (a0) the fused kernel with no row flagged, (b) fused decode + Pass A
   fingerprint statistics for all rows, (c) + head-mean top-32 (Pass A + B) on random keys
   ("flat" attention: no key tile can be ruled out), with ``p̄`` from the logits Pass A
   stored when they fit ``LOGIT_STORE_MAX_BYTES``; (c_reread) forces the re-read of K
   instead, which recomputes only candidate tiles -- every tile when flat) and
   (c_peaked) on keys with a trained model's profile (a sink at position 0, the 16 most
   recent and 16 scattered positions attract every head: logits 14 / 10 / 11 against a bulk
   of N(0, 1)), with the fraction of key tiles the re-read path re-read, (c_head) Pass A
   with per-head top-8, (c_raw) head-mean top-32 without the statistics (what raw mode runs:
   ``statistics=False``), (f) our standalone capture pass (top-32), (d) the separate-pass
   baseline of the reference systems (gather K, scores for all heads, logsumexp, softmax,
   head mean, ``torch.topk(32)``; timed alone and after the plain decode), (e) torch SDPA
   decode over contiguous K/V. Times are medians of CUDA-graph replays (many calls per
   graph, the L2 cache flushed before each call, the flush-only graph subtracted); (a),
   (b), (c), (c_raw) also with eager ``triton.testing.do_bench`` (median, Python launch included).
   (g) ``AUTO_LAYERS`` (4) layers in a row as an engine step runs them for ``auto`` captures:
   each layer's own cache, plain or with every row captured (fingerprint statistics, sketch's
   statistics + top-32, raw top-32), the layers' captures finished by one launch after the
   last (``DeferredFinish``); where four layers' caches fit the pool (not 32 x 128K).
3. Peak extra memory at 1M context, B=1 (``torch.cuda.max_memory_allocated`` over the
   allocation before each call) for (a), (b), (c) and (d).

Prints one JSON object (and writes it to ``--json PATH`` when given).
``--quick`` runs one small timing config, ``--cases 1x32768,1x131072`` only the listed ones (neither runs the
1M-context memory measurement). Needs a CUDA GPU; about 3 minutes on an H100.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
import triton

from attnscope.engine.rope import RotaryEmbedding
from attnscope.kernels import capture as capture_kernels
from attnscope.kernels.capture import DeferredFinish, attention_capture, paged_decode_attention_capture
from attnscope.kernels.capture_reference import CaptureRequest, CaptureResult, capture_rows_ref
from attnscope.kernels.paged_decode import paged_decode_attention
from attnscope.kernels.reference import gather_paged_kv
from cases import parse_cases  # bench/cases.py, beside this script
from report import emit  # bench/report.py, beside this script

HQ, HKV, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
TOP_K, HEAD_TOP_K = 32, 8
AUTO_LAYERS = 4  # what ``auto`` captures of a model's layers
BATCHES, LENGTHS = (1, 8, 32), (2048, 32768, 131072)
MAX_KV_BYTES = 40e9
LONG_CONTEXT = 1 << 20
DEVICE = "cuda"
CHECK_SHAPES = [  # (name, Hq, Hkv, D, dtype, sequence lengths)
    ("llama8b-bf16", HQ, HKV, 128, torch.bfloat16, [1, 37, 1000, 4099, 20000]),
    ("llama8b-fp16", HQ, HKV, 128, torch.float16, [16, 777, 5000]),
    ("gqa3-d64-bf16", 9, 3, 64, torch.bfloat16, [5, 300, 2048]),
]


# ----------------------------------------------------------------------------- inputs


def paged_cache(num_blocks: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator):
    """Random K and V caches ``[num_blocks, BLOCK_SIZE, Hkv, D]`` on the GPU."""
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    return (torch.randn(shape, generator=gen, device=DEVICE, dtype=dtype),
            torch.randn(shape, generator=gen, device=DEVICE, dtype=dtype))


def block_tables(lens: list[int], num_blocks: int, gen: torch.Generator) -> torch.Tensor:
    """Disjoint random physical blocks per sequence, ``[B, max_blocks]`` int32 (padded with block 0)."""
    need = [math.ceil(n / BLOCK_SIZE) for n in lens]
    ids = torch.randperm(num_blocks, generator=gen, device=DEVICE)[: sum(need)].int()
    table = torch.zeros((len(lens), max(need)), dtype=torch.int32, device=DEVICE)
    start = 0
    for b, n in enumerate(need):
        table[b, :n] = ids[start : start + n]
        start += n
    return table


def capture_request(q: torch.Tensor, table: torch.Tensor, query_pos: list[int], top_k: int, head_top_k: int,
                    rng: random.Random | None) -> CaptureRequest:
    """All rows captured; with ``rng`` random masks, windows, sinks and head subsets, else none of them."""
    rows, num_heads, _ = q.shape
    weights = torch.full((rows, num_heads), 1.0 / num_heads)
    mask, window, sinks = [0] * rows, [0] * rows, [0] * rows
    if rng is not None:
        for r, p in enumerate(query_pos):
            heads = rng.sample(range(num_heads), rng.choice([1, num_heads // 2, num_heads]))
            weights[r] = 0.0
            weights[r, heads] = 1.0 / len(heads)
            mask[r] = rng.choice([0, rng.randint(0, p)])
            window[r] = rng.choice([0, rng.randint(1, p + 1)])
            sinks[r] = rng.choice([0, 1, 4])

    def ints(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=DEVICE)

    return CaptureRequest(q=q, block_tables=table, query_pos=ints(query_pos), head_weights=weights.to(DEVICE),
                          mask_prefix=ints(mask), window=ints(window), sink_tokens=ints(sinks),
                          top_k=top_k, head_top_k=head_top_k)


def plant_peaks(q: torch.Tensor, k_cache: torch.Tensor, table: torch.Tensor, length: int,
                gen: torch.Generator):
    """Give every row a trained model's attention profile; returns a function restoring the keys.

    At the sink (position 0), the 16 most recent positions and 16 random others, each KV
    head's key points along its query group's mean direction, scaled so the group's mean
    logit is 14, 10 and 11 (the random bulk has logits of about N(0, 1)).
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    grouped = q.float().view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    direction = grouped.mean(dim=2)
    direction = direction / direction.norm(dim=-1, keepdim=True)  # [B, Hkv, D]
    gain = (grouped * direction[:, :, None]).sum(-1).mean(-1) * head_dim**-0.5  # logit per unit key length
    scattered = torch.randint(1, length - 17, (batch, 16), generator=gen, device=DEVICE)
    recent = torch.arange(length - 16, length, device=DEVICE).expand(batch, 16)
    positions = torch.cat([torch.zeros((batch, 1), dtype=torch.long, device=DEVICE), recent, scattered], dim=1)
    logits = torch.tensor([14.0] + [10.0] * 16 + [11.0] * 16, device=DEVICE)
    blocks = torch.gather(table.long(), 1, positions // BLOCK_SIZE)
    offsets = positions % BLOCK_SIZE
    saved = k_cache[blocks, offsets].clone()
    keys = logits[None, :, None, None] / gain[:, None, :, None] * direction[:, None]  # [B, 33, Hkv, D]
    k_cache[blocks, offsets] = keys.to(k_cache.dtype)

    def restore() -> None:
        k_cache[blocks, offsets] = saved

    return restore


def select_rows(req: CaptureRequest, rows: torch.Tensor) -> CaptureRequest:
    """The request restricted to ``rows``."""
    return replace(req, q=req.q[rows], block_tables=req.block_tables[rows], query_pos=req.query_pos[rows],
                   head_weights=req.head_weights[rows], mask_prefix=req.mask_prefix[rows],
                   window=req.window[rows], sink_tokens=req.sink_tokens[rows])


# ----------------------------------------------------------------------------- correctness


def topk_errors(pos: torch.Tensor, values: torch.Tensor, ref_pos: torch.Tensor, ref_values: torch.Tensor,
                rtol: float, atol: float) -> dict:
    """Rank-by-rank value error, and position mismatches at ranks whose value is clearly separated.

    ``ref_*`` hold one rank more than ``pos`` (the next candidate), so a rank counts as
    separated when its reference value differs from both neighbours by more than twice the
    tolerance; only there must the positions agree exactly.
    """
    k = pos.shape[-1]
    ref_k = ref_values[..., :k]
    finite = torch.isfinite(ref_k) & (ref_pos[..., :k] >= 0)
    tol = atol + rtol * ref_k.abs()
    err = torch.where(finite, (values - ref_k).abs(), torch.zeros_like(ref_k))
    padded = torch.nn.functional.pad(ref_values, (1, 0), value=float("inf"))
    below = torch.where(torch.isfinite(padded[..., 2:]), padded[..., 2:], torch.full_like(ref_k, -1e30))
    separated = finite & ((padded[..., : k] - ref_k) > 2 * tol) & ((ref_k - below[..., :k]) > 2 * tol)
    return {
        "max_value_err_over_tol": float((err / tol).max()) if err.numel() else 0.0,
        "padding_equal": bool(torch.equal(pos < 0, ref_pos[..., :k] < 0)),
        "separated_ranks": int(separated.sum()),
        "position_mismatches": int((separated & (pos != ref_pos[..., :k])).sum()),
    }


def compare(result: CaptureResult, k_cache: torch.Tensor, req: CaptureRequest, scale: float) -> dict:
    """Errors of ``result`` against the reference (run with one more top-k rank) and a pass flag."""
    ref_req = replace(req, q=req.q.float(), top_k=min(req.top_k + 1, 64) if req.top_k else 0,
                      head_top_k=min(req.head_top_k + 1, 64) if req.head_top_k else 0,
                      rope_cos=None if req.rope_cos is None else req.rope_cos.float(),
                      rope_sin=None if req.rope_sin is None else req.rope_sin.float())
    ref = capture_rows_ref(k_cache.float(), ref_req, scale)
    finite = torch.isfinite(ref.lse)
    report = {
        "lse": float((result.lse[finite] - ref.lse[finite]).abs().max()) if finite.any() else 0.0,
        "lse_inf_equal": bool(torch.equal(torch.isfinite(result.lse), finite)),
        "hist": float((result.hist - ref.hist).abs().max()),
        "entropy": float((result.entropy - ref.entropy).abs().max()),
        "sink_mass": float((result.sink_mass - ref.sink_mass).abs().max()),
        "num_stat_equal": bool(torch.equal(result.num_stat_positions, ref.num_stat_positions)),
    }
    ok = report["lse"] < 1e-3 and report["hist"] < 1e-3 and report["entropy"] < 1e-2
    ok = ok and report["sink_mass"] < 1e-3 and report["lse_inf_equal"] and report["num_stat_equal"]
    if req.top_k:
        report["topk"] = topk_errors(result.topk_pos, result.topk_prob, ref.topk_pos, ref.topk_prob, 1e-3, 1e-7)
    if req.head_top_k:
        report["head_topk"] = topk_errors(result.head_topk_pos, result.head_topk_logit, ref.head_topk_pos,
                                          ref.head_topk_logit, 1e-4, 1e-3)
    for key in ("topk", "head_topk"):
        if key in report:
            sub = report[key]
            ok = ok and sub["max_value_err_over_tol"] <= 1 and sub["padding_equal"] and sub["position_mismatches"] == 0
    report["ok"] = bool(ok)
    return report


def check_correctness(seed: int, shapes: list[tuple] = CHECK_SHAPES) -> dict:
    """Standalone, de-rotated and fused capture against the reference on ``shapes``."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    rng = random.Random(seed)
    checks = {}
    for name, num_heads, num_kv_heads, head_dim, dtype, lens in shapes:
        num_blocks = sum(math.ceil(n / BLOCK_SIZE) for n in lens) + 4
        k_cache, v_cache = paged_cache(num_blocks, num_kv_heads, head_dim, dtype, gen)
        table = block_tables(lens, num_blocks, gen)
        q = torch.randn((len(lens), num_heads, head_dim), generator=gen, device=DEVICE, dtype=dtype) * 1.5
        context = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
        scale = head_dim**-0.5
        query_pos = [n - 1 if rng.random() < 0.5 else rng.randint(0, n - 1) for n in lens]
        req = capture_request(q, table, query_pos, TOP_K, HEAD_TOP_K, rng)
        checks[f"{name}/standalone"] = compare(attention_capture(k_cache, req, scale), k_cache, req, scale)

        rope = RotaryEmbedding(head_dim, max(lens), theta=500000.0, scaling=None, dtype=dtype).to(DEVICE)
        derotated = replace(req, rope_cos=rope.cos, rope_sin=rope.sin)
        checks[f"{name}/derotated"] = compare(attention_capture(k_cache, derotated, scale), k_cache, derotated, scale)

        flagged = torch.tensor([r for r in range(len(lens)) if r % 2 == 0], device=DEVICE)
        decode_req = select_rows(capture_request(q, table, [n - 1 for n in lens], TOP_K, HEAD_TOP_K, rng), flagged)
        plain_out, plain_lse = paged_decode_attention(q, k_cache, v_cache, table, context, scale)
        out, lse, result = paged_decode_attention(q, k_cache, v_cache, table, context, scale,
                                                  capture=decode_req, capture_rows=flagged)
        report = compare(result, k_cache, decode_req, scale)
        report["out_vs_plain"] = float((out.float() - plain_out.float()).abs().max())
        report["lse_vs_plain"] = float((lse - plain_lse).abs().max())
        report["ok"] = report["ok"] and report["out_vs_plain"] < 2e-2 and report["lse_vs_plain"] < 1e-3
        checks[f"{name}/fused_decode"] = report
        _, _, reread = paged_decode_attention_capture(q, k_cache, v_cache, table, context, scale, decode_req, flagged,
                                                      logit_store_bytes=0)
        checks[f"{name}/fused_decode_reread"] = compare(reread, k_cache, decode_req, scale)

        long_rows = [r for r, n in enumerate(lens) if n > 40]
        index = torch.tensor(long_rows, device=DEVICE)
        peaked_q, peaked_table = q[index], table[index]
        restore = plant_peaks(peaked_q, k_cache, peaked_table, min(lens[r] for r in long_rows), gen)
        peaked_req = capture_request(peaked_q, peaked_table, [lens[r] - 1 for r in long_rows], TOP_K, 0, None)
        rows = torch.arange(len(long_rows), device=DEVICE)
        _, _, result = paged_decode_attention_capture(peaked_q, k_cache, v_cache, peaked_table, context[index],
                                                      scale, peaked_req, rows, logit_store_bytes=0)
        report = compare(result, k_cache, peaked_req, scale)
        report["recomputed_tiles"] = result.recomputed_tiles.tolist()
        checks[f"{name}/fused_decode_peaked"] = report
        restore()
    return checks


# ----------------------------------------------------------------------------- timing


def graph_ms(fn, flush: torch.Tensor, budget_ms: float = 40.0, replays: int = 7) -> float:
    """Median milliseconds per ``fn()`` call from CUDA-graph replays with an L2 flush before each call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    calls = int(min(max(budget_ms / max(start.elapsed_time(end), 1e-3), 2), 200))
    work, flush_only = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(work):
        for _ in range(calls):
            flush.zero_()
            fn()
    with torch.cuda.graph(flush_only):
        for _ in range(calls):
            flush.zero_()

    def replay_ms(graph: torch.cuda.CUDAGraph) -> float:
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    samples = [(replay_ms(work) - replay_ms(flush_only)) / calls for _ in range(replays)]
    del work, flush_only
    torch.cuda.empty_cache()
    return statistics.median(samples)


def auto_layers_ms(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: int,
                   flush: torch.Tensor, gen: torch.Generator) -> dict:
    """Times of ``AUTO_LAYERS`` layers' decode attention as an engine step runs them when a request captures
    ``auto`` layers: each layer its own cache (disjoint quarters of the pool, one block table as the step's
    sequences have), plain or with every row captured, the layers' captures finished by one launch after
    the last (``DeferredFinish``; fingerprint statistics, sketch's statistics + top-32, raw top-32)."""
    batch = q.shape[0]
    pool = k_cache.shape[0] // AUTO_LAYERS
    table = block_tables([length] * batch, pool, gen)
    layers = [(k_cache[i * pool : (i + 1) * pool], v_cache[i * pool : (i + 1) * pool]) for i in range(AUTO_LAYERS)]
    context = torch.full((batch,), length, dtype=torch.int32, device=DEVICE)
    scale = HEAD_DIM**-0.5
    rows = torch.arange(batch, device=DEVICE)
    stats_req = capture_request(q, table, [length - 1] * batch, 0, 0, None)
    requests = {"fused_stats": stats_req, "fused_top32": replace(stats_req, top_k=TOP_K),
                "raw_fused_top32": replace(stats_req, top_k=TOP_K, statistics=False)}

    def plain() -> None:
        for k, v in layers:
            paged_decode_attention(q, k, v, table, context, scale)

    def captured(req: CaptureRequest):
        def run() -> None:
            deferred = DeferredFinish(AUTO_LAYERS)
            for k, v in layers:
                paged_decode_attention_capture(q, k, v, table, context, scale, req, rows, deferred=deferred)
        return run

    return {"g_auto_layers_plain": graph_ms(plain, flush),
            **{f"g_auto_layers_{name}": graph_ms(captured(req), flush) for name, req in requests.items()}}


def separate_pass_topk(q: torch.Tensor, k_cache: torch.Tensor, table: torch.Tensor, length: int, scale: float):
    """The reference systems' capture: contiguous K, all heads' scores, softmax, head mean, top-k."""
    batch, num_heads, head_dim = q.shape
    keys = gather_paged_kv(k_cache, table, length)  # [B, L, Hkv, D]
    group = num_heads // keys.shape[2]
    scores = torch.matmul(q.view(batch, -1, group, head_dim), keys.permute(0, 2, 3, 1)).float() * scale
    probs = torch.exp(scores - torch.logsumexp(scores, dim=-1, keepdim=True))
    return torch.topk(probs.mean(dim=(1, 2)), TOP_K, dim=-1)


def sdpa_ms(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor, length: int,
            scale: float, flush: torch.Tensor) -> float:
    """Torch SDPA decode time over the same K/V stored contiguously ``[B, Hkv, L, D]``."""
    keys = gather_paged_kv(k_cache, table, length).permute(0, 2, 1, 3).contiguous()
    values = gather_paged_kv(v_cache, table, length).permute(0, 2, 1, 3).contiguous()
    q4 = q[:, :, None, :]
    return graph_ms(lambda: F.scaled_dot_product_attention(q4, keys, values, scale=scale, enable_gqa=True), flush)


def bench_config(batch: int, length: int, k_cache: torch.Tensor, v_cache: torch.Tensor, flush: torch.Tensor,
                 gen: torch.Generator) -> dict:
    """All timings of one (B, L) at the Llama-8B shapes; every row captured where capture runs."""
    table = block_tables([length] * batch, k_cache.shape[0], gen)
    context = torch.full((batch,), length, dtype=torch.int32, device=DEVICE)
    q = torch.randn((batch, HQ, HEAD_DIM), generator=gen, device=DEVICE, dtype=k_cache.dtype)
    scale = HEAD_DIM**-0.5
    rows = torch.arange(batch, device=DEVICE)
    stats_req = capture_request(q, table, [length - 1] * batch, 0, 0, None)
    topk_req = replace(stats_req, top_k=TOP_K)
    raw_req = replace(topk_req, statistics=False)
    head_req = replace(stats_req, head_top_k=HEAD_TOP_K)
    no_rows = select_rows(stats_req, rows[:0])
    args = (q, k_cache, v_cache, table, context, scale)
    runs = {
        "a_plain": lambda: paged_decode_attention(*args),
        "a0_fused_no_rows": lambda: paged_decode_attention(*args, capture=no_rows, capture_rows=rows[:0]),
        "b_fused_stats": lambda: paged_decode_attention(*args, capture=stats_req, capture_rows=rows),
        "c_fused_stats_top32": lambda: paged_decode_attention(*args, capture=topk_req, capture_rows=rows),
        "c_raw_fused_top32": lambda: paged_decode_attention(*args, capture=raw_req, capture_rows=rows),
        "c_fused_stats_top32_reread": lambda: paged_decode_attention_capture(*args, topk_req, rows,
                                                                             logit_store_bytes=0),
        "c_head_fused_stats_head_top8": lambda: paged_decode_attention(*args, capture=head_req, capture_rows=rows),
        "f_standalone_capture_top32": lambda: attention_capture(k_cache, topk_req, scale),
        "d_separate_pass_top32": lambda: separate_pass_topk(q, k_cache, table, length, scale),
        "d_plain_plus_separate_pass": lambda: (paged_decode_attention(*args),
                                               separate_pass_topk(q, k_cache, table, length, scale)),
    }
    positions = math.ceil(table.shape[1] * BLOCK_SIZE / 64) * 64  # key tiles of 64 at D=128
    topk_stores_logits = batch * HQ * positions * 4 <= capture_kernels.LOGIT_STORE_MAX_BYTES
    result = {"B": batch, "L": length, "ms": {name: graph_ms(fn, flush) for name, fn in runs.items()}}
    num_tiles = math.ceil(length / 64)
    result["pass_b_tiles_reread_fraction"] = {
        "flat": float(runs["c_fused_stats_top32_reread"]()[2].recomputed_tiles.float().mean()) / num_tiles}
    restore = plant_peaks(q, k_cache, table, length, gen)
    result["ms"]["c_fused_stats_top32_peaked"] = graph_ms(runs["c_fused_stats_top32"], flush)
    result["ms"]["c_fused_stats_top32_reread_peaked"] = graph_ms(runs["c_fused_stats_top32_reread"], flush)
    result["pass_b_tiles_reread_fraction"]["peaked"] = float(
        runs["c_fused_stats_top32_reread"]()[2].recomputed_tiles.float().mean()) / num_tiles
    restore()
    result["ms"]["e_sdpa_contiguous"] = sdpa_ms(q, k_cache, v_cache, table, length, scale, flush)
    if AUTO_LAYERS * batch * length <= k_cache.shape[0] * BLOCK_SIZE:
        result["ms"].update(auto_layers_ms(q, k_cache, v_cache, length, flush, gen))
    result["eager_ms"] = {name: triton.testing.do_bench(runs[name], return_mode="median")
                          for name in ("a_plain", "b_fused_stats", "c_fused_stats_top32", "c_raw_fused_top32")}
    ms = result["ms"]
    auto = {f"auto_layers_{name}_over_plain": ms[f"g_auto_layers_{name}"] / ms["g_auto_layers_plain"]
            for name in ("fused_stats", "fused_top32", "raw_fused_top32") if "g_auto_layers_plain" in ms}
    result["ratios"] = {**auto,
        "fused_stats_over_plain": ms["b_fused_stats"] / ms["a_plain"],
        "fused_top32_over_plain": ms["c_fused_stats_top32"] / ms["a_plain"],
        "fused_top32_peaked_over_plain": ms["c_fused_stats_top32_peaked"] / ms["a_plain"],
        "fused_raw_top32_over_plain": ms["c_raw_fused_top32"] / ms["a_plain"],
        "fused_top32_reread_over_plain": ms["c_fused_stats_top32_reread"] / ms["a_plain"],
        "fused_top32_reread_peaked_over_plain": ms["c_fused_stats_top32_reread_peaked"] / ms["a_plain"],
        "logits_stored": topk_stores_logits,
        "fused_no_rows_over_plain": ms["a0_fused_no_rows"] / ms["a_plain"],
        "sdpa_throughput_fraction_fused_stats": ms["e_sdpa_contiguous"] / ms["b_fused_stats"],
        "sdpa_throughput_fraction_fused_top32": ms["e_sdpa_contiguous"] / ms["c_fused_stats_top32"],
        "sdpa_throughput_fraction_plain": ms["e_sdpa_contiguous"] / ms["a_plain"],
        "separate_pass_total_over_fused_top32": ms["d_plain_plus_separate_pass"] / ms["c_fused_stats_top32"],
        "separate_pass_total_over_fused_top32_peaked": ms["d_plain_plus_separate_pass"]
        / ms["c_fused_stats_top32_peaked"],
        "separate_pass_total_over_fused_raw_top32": ms["d_plain_plus_separate_pass"] / ms["c_raw_fused_top32"],
    }
    result["peak_extra_bytes"] = {name: peak_extra_bytes(runs[name])
                                  for name in ("a_plain", "c_fused_stats_top32", "c_raw_fused_top32")}
    torch.cuda.empty_cache()
    return result


def peak_extra_bytes(fn) -> int:
    """Peak bytes allocated by ``fn()`` above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def long_context_memory(k_cache: torch.Tensor, v_cache: torch.Tensor, gen: torch.Generator) -> dict:
    """Peak extra memory (and time) of each path at B=1, L=1M."""
    table = block_tables([LONG_CONTEXT], k_cache.shape[0], gen)
    context = torch.tensor([LONG_CONTEXT], dtype=torch.int32, device=DEVICE)
    q = torch.randn((1, HQ, HEAD_DIM), generator=gen, device=DEVICE, dtype=k_cache.dtype)
    scale = HEAD_DIM**-0.5
    rows = torch.arange(1, device=DEVICE)
    stats_req = capture_request(q, table, [LONG_CONTEXT - 1], 0, 0, None)
    args = (q, k_cache, v_cache, table, context, scale)
    runs = {
        "a_plain": lambda: paged_decode_attention(*args),
        "b_fused_stats": lambda: paged_decode_attention(*args, capture=stats_req, capture_rows=rows),
        "c_fused_stats_top32": lambda: paged_decode_attention(
            *args, capture=replace(stats_req, top_k=TOP_K), capture_rows=rows),
        "d_separate_pass_top32": lambda: separate_pass_topk(q, k_cache, table, LONG_CONTEXT, scale),
    }
    for fn in runs.values():
        fn()
    return {"B": 1, "L": LONG_CONTEXT, "peak_extra_bytes": {name: peak_extra_bytes(fn) for name, fn in runs.items()}}


def main() -> None:
    """Run the checks, the timings and the memory measurement; print and save one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small timing config")
    parser.add_argument("--cases", default="",
                        help="comma-separated BATCHxLENGTH timing configs instead of the whole table, e.g. "
                             "1x32768,1x131072 (no 1M-context memory run)")
    parser.add_argument("--seed", type=int, default=0, help="input seed")
    parser.add_argument("--json", default=None, help="also write the JSON object to this file")
    cli = parser.parse_args()
    cases = parse_cases(parser, "--cases", cli.cases)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    started = time.perf_counter()
    props = torch.cuda.get_device_properties(0)
    report = {
        "device": props.name, "torch": torch.__version__, "triton": triton.__version__,
        "shape": {"Hq": HQ, "Hkv": HKV, "D": HEAD_DIM, "block_size": BLOCK_SIZE, "dtype": "bfloat16"},
        "num_warps": {"fused": capture_kernels.FUSED_NUM_WARPS, "pass_a": capture_kernels.PASS_A_NUM_WARPS,
                      "pass_b": capture_kernels.PASS_B_NUM_WARPS, "merge": capture_kernels.MERGE_NUM_WARPS,
                      "finish": capture_kernels.SPLIT_COMBINE_NUM_WARPS},
        "pass_b_programs_per_sm": capture_kernels.PASS_B_PROGRAMS_PER_SM,
        "timing": "median ms per call over CUDA-graph replays, L2 flushed before each call",
    }
    report["correctness"] = check_correctness(cli.seed)
    report["correctness_ok"] = all(c["ok"] for c in report["correctness"].values())
    torch.cuda.empty_cache()

    gen = torch.Generator(device=DEVICE).manual_seed(cli.seed + 1)
    configs = cases or ([(1, 2048)] if cli.quick else [(b, n) for b in BATCHES for n in LENGTHS])
    configs = [(b, n) for b, n in configs if b * n * HKV * HEAD_DIM * 2 * 2 <= MAX_KV_BYTES]
    whole_table = not (cli.quick or cases)
    # a few configs: room for AUTO_LAYERS layers' caches each; the whole table: its largest config's (or 1M)
    max_tokens = max([b * n * (1 if whole_table else AUTO_LAYERS) for b, n in configs]
                     + [LONG_CONTEXT if whole_table else 0])
    k_cache, v_cache = paged_cache(math.ceil(max_tokens / BLOCK_SIZE) + 1, HKV, HEAD_DIM, torch.bfloat16, gen)
    flush = torch.empty(2 * props.L2_cache_size, dtype=torch.int8, device=DEVICE)
    report["configs"] = [bench_config(b, n, k_cache, v_cache, flush, gen) for b, n in configs]
    if whole_table:
        report["long_context"] = long_context_memory(k_cache, v_cache, gen)
    report["wall_s"] = time.perf_counter() - started

    emit(report, cli.json)


if __name__ == "__main__":
    main()
