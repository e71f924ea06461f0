"""Split counts of the paged decode attention: the default (two programs per SM) against more programs per SM.

``default_num_splits`` aims at two programs per SM; the plain and the fused kernel run four per SM,
and on an H200 launches that filled whole waves of four ran small batches at long contexts up to a
fifth faster (docs/engine.md). This measures, in one run, every (batch, length) case at the split
counts that aim at ``--programs-per-sm`` programs per SM, rounded up and down (the 128-key minimum,
the 64-split cap and the trim of empty splits applied as they are to the default): the plain kernel
with its split merge and the fused kernel with fingerprint statistics for every row, as CUDA-graph
replays with the L2 flushed before each call (``capture_overhead.graph_ms``), Llama-8B attention (32
query / 8 KV heads of 128, bf16, flat keys).

Prints one JSON object: per case the times at each split count, the launch's programs and waves at
the kernels' four programs per SM, the fastest split count, and the default's time over the
fastest (plain and with statistics).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import triton

from attnscope.kernels.capture import paged_decode_attention_capture
from attnscope.kernels.paged_decode import (
    MAX_SPLITS, MIN_TOKENS_PER_SPLIT, _num_sms, _tile_tokens, default_num_splits, paged_decode_attention,
    splits_with_tiles,
)
from capture_overhead import (  # bench/capture_overhead.py, beside this script
    BLOCK_SIZE, DEVICE, HEAD_DIM, HKV, HQ, MAX_KV_BYTES, block_tables, capture_request, graph_ms, paged_cache,
)
from cases import parse_cases  # bench/cases.py, beside this script
from report import emit  # bench/report.py, beside this script

KERNEL_PROGRAMS_PER_SM = 4  # plain and fused kernel: 4 warps, at most 128 registers


def split_counts(batch: int, length: int, num_sms: int, programs_per_sm: list[int]) -> list[int]:
    """The distinct split counts that aim at each of ``programs_per_sm`` programs per SM: rounded up (as the
    default rounds its two) and down (a launch just over a whole wave of the kernels' four programs per SM
    runs a second, nearly empty wave), each within the 128-key minimum and the 64-split cap, trimmed of
    splits left without a key tile."""
    base = batch * HKV
    useful = triton.cdiv(length, MIN_TOKENS_PER_SPLIT)
    counts = set()
    for per_sm in programs_per_sm:
        for aimed in (triton.cdiv(per_sm * num_sms, base), per_sm * num_sms // base):
            counts.add(splits_with_tiles(max(1, min(aimed, useful, MAX_SPLITS)), length, _tile_tokens(HEAD_DIM)))
    return sorted(counts)


def time_case(batch: int, length: int, counts: list[int], flush: torch.Tensor, gen: torch.Generator,
              num_sms: int) -> dict:
    """Plain and statistics times (µs) of one (batch, length) at each split count, with the fastest."""
    num_blocks = batch * math.ceil(length / BLOCK_SIZE) + 4
    k_cache, v_cache = paged_cache(num_blocks, HKV, HEAD_DIM, torch.bfloat16, gen)
    table = block_tables([length] * batch, num_blocks, gen)
    q = torch.randn((batch, HQ, HEAD_DIM), generator=gen, device=DEVICE, dtype=torch.bfloat16)
    context = torch.full((batch,), length, dtype=torch.int32, device=DEVICE)
    scale = HEAD_DIM**-0.5
    rows = torch.arange(batch, device=DEVICE)
    stats = capture_request(q, table, [length - 1] * batch, 0, 0, None)
    wave = KERNEL_PROGRAMS_PER_SM * num_sms
    splits = {}
    for count in counts:
        def plain(count: int = count) -> None:
            paged_decode_attention(q, k_cache, v_cache, table, context, scale, num_splits=count)

        def with_statistics(count: int = count) -> None:
            paged_decode_attention_capture(q, k_cache, v_cache, table, context, scale, stats, rows,
                                           num_splits=count)

        programs = batch * HKV * count
        splits[str(count)] = {"programs": programs, "waves": round(programs / wave, 3),
                              "plain_us": 1e3 * graph_ms(plain, flush),
                              "statistics_us": 1e3 * graph_ms(with_statistics, flush)}
        print(f"[bench] {batch} x {length}: {count} splits {splits[str(count)]}", file=sys.stderr)
    default = str(default_num_splits(batch, HKV, length, num_sms, HEAD_DIM))
    best_plain = min(splits, key=lambda c: splits[c]["plain_us"])
    best_statistics = min(splits, key=lambda c: splits[c]["statistics_us"])
    return {
        "B": batch, "L": length, "default_splits": int(default), "splits": splits,
        "fastest_plain_splits": int(best_plain), "fastest_statistics_splits": int(best_statistics),
        "default_over_fastest": {
            "plain": splits[default]["plain_us"] / splits[best_plain]["plain_us"],
            "statistics": splits[default]["statistics_us"] / splits[best_statistics]["statistics_us"],
        },
        "statistics_over_plain": {count: entry["statistics_us"] / entry["plain_us"] for count, entry in splits.items()},
    }


def main() -> None:
    """Parse flags, time every case at every split count, print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="1x8192,1x32768,1x131072,2x32768,4x32768,4x131072,8x32768,8x131072,"
                                           "16x32768,32x8192",
                        help="comma-separated BATCHxLENGTH cases (default: batch 1-32 at 8K-128K)")
    parser.add_argument("--programs-per-sm", default="2,4,8,16",
                        help="comma-separated programs-per-SM aims whose split counts are timed (2: the default's)")
    parser.add_argument("--seed", type=int, default=0, help="input seed")
    parser.add_argument("--json", default=None, help="also write the JSON object to this file")
    cli = parser.parse_args()
    cases = parse_cases(parser, "--cases", cli.cases)
    items = cli.programs_per_sm.split(",")
    if not all(item.isdigit() and int(item) > 0 for item in items):
        parser.error(f"--programs-per-sm takes positive integers such as 2,4,8, got {cli.programs_per_sm!r}")
    programs_per_sm = sorted({int(item) for item in items} | {2})
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    started = time.perf_counter()
    props = torch.cuda.get_device_properties(0)
    num_sms = _num_sms(torch.device(DEVICE))
    gen = torch.Generator(device=DEVICE).manual_seed(cli.seed)
    flush = torch.empty(2 * props.L2_cache_size, dtype=torch.int8, device=DEVICE)
    results = []
    for batch, length in cases:
        if batch * length * HKV * HEAD_DIM * 2 * 2 > MAX_KV_BYTES:
            print(f"[bench] {batch} x {length}: skipped, its K and V exceed {MAX_KV_BYTES / 1e9:.0f} GB",
                  file=sys.stderr)
            continue
        results.append(time_case(batch, length, split_counts(batch, length, num_sms, programs_per_sm), flush, gen,
                                 num_sms))
        torch.cuda.empty_cache()
    emit({
        "benchmark": "decode_splits", "device": props.name, "sms": num_sms, "torch": torch.__version__,
        "triton": triton.__version__,
        "shape": {"Hq": HQ, "Hkv": HKV, "D": HEAD_DIM, "block_size": BLOCK_SIZE, "dtype": "bfloat16"},
        "timing": "median µs per call over CUDA-graph replays, L2 flushed before each call",
        "kernel_programs_per_sm": KERNEL_PROGRAMS_PER_SM, "programs_per_sm_aims": programs_per_sm,
        "cases": results, "wall_s": time.perf_counter() - started,
    }, cli.json)


if __name__ == "__main__":
    main()
