"""Decode-sized matmuls on the GPU: our Triton kernel (``attnscope.kernels.decode_matmul``) against cuBLAS.

For each model shape (Llama-8B, Llama-1B; bf16) and decode batch, every projection of a decoder
step — QKV, output, gate+up (ours with SwiGLU fused; cuBLAS followed by our ``silu_and_mul``),
down, and the LM head — is timed the way a step runs it: one CUDA graph applies the projection
to every layer's own weights in turn (distinct weights, so nothing is served from L2), replayed
many times; time per layer is the graph's median / layers. Bandwidth = weight bytes / time.
``matmuls_per_step`` sums a step's matmuls with cuBLAS only, ours only, and the engine's choice
(ours for SwiGLU and projections of at least ``MIN_COLUMNS`` outputs, cuBLAS for the rest).
A correctness check against the float32 twin runs first for every shape.

``--sweep`` also tries a grid of launch shapes per projection and batch and reports the best
(the data behind ``tile_config``). Prints one JSON object (also to ``--json PATH``). Needs a
CUDA GPU.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from attnscope.kernels.decode_matmul import (MIN_COLUMNS, TileConfig, decode_matmul, decode_matmul_ref, decode_matmul_silu,
                                             decode_matmul_silu_ref, tile_config)
from attnscope.kernels.layer_ops import silu_and_mul
from report import emit  # bench/report.py, beside this script

SHAPES = {  # name: (hidden, intermediate, layers, q heads, kv heads, head_dim, vocab)
    "llama-8b": (4096, 14336, 32, 32, 8, 128, 128256),
    "llama-1b": (2048, 8192, 16, 32, 8, 64, 128256),
}
SWEEP = {
    "block_n": (16, 32, 64, 128),
    "block_k": (64, 128, 256),
    "stages": (3, 5),
    "warps": (4, 8),
}
LM_HEAD_COPIES = 2


def log(message: str) -> None:
    """Progress on stderr (stdout carries the JSON)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def projections(shape: tuple) -> list[tuple[str, int, int, bool, int]]:
    """``(name, out_features, in_features, fused SwiGLU, copies)`` of one decoder step's matmuls."""
    hidden, inter, layers, heads, kv_heads, head_dim, vocab = shape
    return [
        ("qkv", (heads + 2 * kv_heads) * head_dim, hidden, False, layers),
        ("o", hidden, heads * head_dim, False, layers),
        ("gate_up", 2 * inter, hidden, True, layers),
        ("down", hidden, inter, False, layers),
        ("lm_head", vocab, hidden, False, LM_HEAD_COPIES),
    ]


def graph_ms(calls, replays: int = 20) -> float:
    """Median time of one replay of a CUDA graph recording ``calls()`` (warmed up first)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        calls()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        calls()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def per_copy_ms(weights: list[torch.Tensor], x: torch.Tensor, fn) -> float:
    """Time of ``fn(x, w)`` per weight copy, all copies in one graph."""
    return graph_ms(lambda: [fn(x, w) for w in weights]) / len(weights)


def ours(silu: bool, config: TileConfig | None = None):
    """Our kernel (forced, whatever the batch) as ``fn(x, w)``."""
    if silu:
        return lambda x, w: decode_matmul_silu(x, w, force_triton=True, config=config)
    return lambda x, w: decode_matmul(x, w, force_triton=True, config=config)


def cublas(silu: bool):
    """cuBLAS (``F.linear``), followed by the SwiGLU kernel for the gate+up projection."""
    if silu:
        return lambda x, w: silu_and_mul(F.linear(x, w))
    return lambda x, w: F.linear(x, w)


def check(shape: tuple, batches: list[int], gen: torch.Generator) -> float:
    """Largest error against the float32 twin, relative to the output's scale, over projections and batches."""
    worst = 0.0
    for (name, n, k, silu, _), rows in itertools.product(projections(shape), batches):
        x = torch.randn(rows, k, generator=gen, device="cuda").bfloat16()
        w = (torch.randn(n, k, generator=gen, device="cuda") / k ** 0.5).bfloat16()
        got = ours(silu)(x, w).float()
        want = (decode_matmul_silu_ref(x, w) if silu else decode_matmul_ref(x, w)).float()
        worst = max(worst, ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item())
    return worst


def time_shape(shape: tuple, batches: list[int], sweep: bool, gen: torch.Generator) -> dict:
    """Per projection and batch: cuBLAS and our times (ms per layer) and bandwidths; with ``sweep`` the best
    launch shape of the grid too."""
    report = {}
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name, n, k, silu, copies in projections(shape):
        weights = [(torch.randn(n, k, generator=gen, device="cuda") / k ** 0.5).bfloat16() for _ in range(copies)]
        gbytes = n * k * 2 / 1e9
        rows_report = {}
        for rows in batches:
            x = torch.randn(rows, k, generator=gen, device="cuda").bfloat16()
            config = tile_config(rows, n // 2 if silu else n, silu, num_sms)
            entry = {"cublas_ms": per_copy_ms(weights, x, cublas(silu)),
                     "ours_ms": per_copy_ms(weights, x, ours(silu, config)),
                     "config": config.__dict__}
            entry["cublas_tb_s"] = gbytes / entry["cublas_ms"]
            entry["ours_tb_s"] = gbytes / entry["ours_ms"]
            if sweep:
                tried = {}
                for values in itertools.product(*SWEEP.values()):
                    trial = TileConfig(*values)
                    try:
                        tried[values] = per_copy_ms(weights, x, ours(silu, trial))
                    except Exception as error:  # launch shapes the GPU cannot hold (shared memory)
                        log(f"  {name} M={rows} {trial}: {type(error).__name__}")
                best = min(tried, key=tried.get)
                entry["best_config"] = dict(zip(SWEEP, best))
                entry["best_ms"] = tried[best]
                entry["best_tb_s"] = gbytes / tried[best]
            log(f"{name} N={n} K={k} M={rows}: cuBLAS {entry['cublas_tb_s']:.2f} TB/s, ours "
                f"{entry['ours_tb_s']:.2f}" + (f", best {entry['best_tb_s']:.2f} {entry['best_config']}" if sweep else ""))
            rows_report[str(rows)] = entry
        report[name] = {"out_features": n, "in_features": k, "fused_silu": silu, "weight_gb": gbytes,
                        "engine_uses": "ours" if silu or n >= MIN_COLUMNS else "cublas", "by_batch": rows_report}
        del weights
        torch.cuda.empty_cache()
    hidden, inter, layers = shape[:3]
    step = {}
    for rows in map(str, batches):
        for who in ("cublas", "ours"):
            step.setdefault(rows, {})[f"{who}_step_ms"] = sum(
                p["by_batch"][rows][f"{who}_ms"] * (1 if name == "lm_head" else layers) for name, p in report.items())
        step[rows]["engine_step_ms"] = sum(
            p["by_batch"][rows][f"{p['engine_uses']}_ms"] * (1 if name == "lm_head" else layers) for name, p in report.items())
        step[rows]["engine_speedup"] = step[rows]["cublas_step_ms"] / step[rows]["engine_step_ms"]
    return {"projections": report, "matmuls_per_step": step}


def main() -> None:
    """Parse flags, check, time, print the JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="llama-8b,llama-1b", help="comma-separated shape names")
    parser.add_argument("--batches", default="1,2,8,16,32,64", help="rows per matmul (decode batch sizes)")
    parser.add_argument("--sweep", action="store_true", help="also search a grid of launch shapes")
    parser.add_argument("--json", default=None, help="also write the JSON object here")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    gen = torch.Generator(device="cuda").manual_seed(0)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16", "shapes": {}}
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        log(f"{name}: checking against the float32 twin")
        error = check(shape, batches, gen)
        if error > 2e-2:
            raise SystemExit(f"{name}: relative error {error:.3g} against the float32 twin")
        result["shapes"][name] = {"max_relative_error": error, **time_shape(shape, batches, args.sweep, gen)}
    emit(result, args.json)


if __name__ == "__main__":
    main()
