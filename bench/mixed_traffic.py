"""Start-up and a mixed capture workload: prefills beside captured decode rows, from the first request on.

One run on one GPU, random bf16 weights (``load_format="dummy"``) of a model shape from
``gpu_throughput.SHAPES``, CUDA graphs and the capture warm-up on (the engine's defaults).
Reports the engine's start-up time, then runs ``--passes`` seeded workloads on the same engine
(seeds ``--seed``, ``--seed + 1``, ...: new prompts each pass, so no pass reuses another's
prefix cache): ``--requests`` requests, ``--in-flight`` at a time, prompts 16-3000 random
tokens, 8-256 new tokens, in turn without capture, with fingerprints (``auto`` layers), raw
top-32 (``auto``), sketches (``auto``), raw top-8 (``last``) and raw top-8 with prompt
attention (``auto``: every prompt token captured). The first pass meets every
shape first (graph records of new capture layouts, and Triton compiles of whatever start-up
did not warm); the later ones show the steady state. Per pass: wall
time, steps, tokens, how many steps ran eagerly (no decode graph: a prefill chunk in the
step) and how long those took, and how many kernel variants Triton compiled during the pass.
Run it with an empty ``TRITON_CACHE_DIR`` to see a first start.
Prints one JSON object (also written to ``--json``); progress lines go to stderr.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton

from attnscope.engine.engine_config import EngineConfig
from attnscope.engine.llm_engine import LLMEngine
from attnscope.kernels import capture, decode_matmul, layer_ops, paged_decode, paged_prefill
from gpu_throughput import SHAPES  # bench/, beside this script
from random_model import write_model_folder
from report import emit

CAPTURES = [None, {"mode": "fingerprint", "layers": "auto", "fingerprint_max_steps": None},
            {"mode": "raw", "top_k": 32, "layers": "auto"}, {"mode": "sketch", "layers": "auto"},
            {"mode": "raw", "top_k": 8, "layers": "last"},
            {"mode": "raw", "top_k": 8, "layers": "auto", "include_prompt": True}]
MAX_LEN = 6512


def compiled_variants() -> int:
    """Kernel variants Triton has compiled in this process for the engine's kernels so far."""
    return sum(len(caches[0]) for module in (capture, decode_matmul, layer_ops, paged_decode, paged_prefill)
               for fn in vars(module).values() if isinstance(fn, triton.runtime.JITFunction)
               for caches in fn.device_caches.values())


def run_pass(engine: LLMEngine, vocab_size: int, seed: int, requests: int, in_flight: int) -> dict:
    """Serve the seeded workload to the end; wall time, steps, tokens and the eager steps' share."""
    rng = random.Random(seed)
    todo = [([rng.randrange(3, vocab_size) for _ in range(rng.randint(16, 3000))], rng.randint(8, 256),
             CAPTURES[i % len(CAPTURES)]) for i in range(requests)]
    graphs = engine.runner.graphs
    live: set[str] = set()
    steps = tokens = eager_steps = 0
    eager_seconds = 0.0
    compiles = compiled_variants()
    started = time.perf_counter()
    while todo or live:
        while todo and len(live) < in_flight:
            ids, new_tokens, capture = todo.pop()
            live.add(engine.add_request(prompt_token_ids=ids, params={"max_tokens": new_tokens, "ignore_eos": True},
                                        capture=capture))
        replays, step_start = graphs.replays, time.perf_counter()
        for out in engine.step():
            tokens += sum(len(d.token_ids) for d in out.deltas)
            if out.finished:
                live.discard(out.request_id)
        steps += 1
        if graphs.replays == replays:
            eager_steps += 1
            eager_seconds += time.perf_counter() - step_start
    torch.cuda.synchronize()
    return {"seconds": round(time.perf_counter() - started, 2), "steps": steps, "tokens": tokens,
            "eager_steps": eager_steps, "eager_seconds": round(eager_seconds, 2),
            "compiles": compiled_variants() - compiles}


def main() -> None:
    """Parse the flags, start the engine, run the passes, emit the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES), help="model shape (default llama-1b)")
    parser.add_argument("--requests", type=int, default=60, help="requests per pass (default 60)")
    parser.add_argument("--in-flight", type=int, default=16, help="requests running at once (default 16)")
    parser.add_argument("--max-num-seqs", type=int, default=32, help="engine's max_num_seqs (default 32)")
    parser.add_argument("--passes", type=int, default=4, help="passes of the workload (default 4)")
    parser.add_argument("--seed", type=int, default=7, help="first pass's workload seed (default 7)")
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    shape = SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        write_model_folder(Path(tmp), shape, MAX_LEN)
        started = time.perf_counter()
        engine = LLMEngine(EngineConfig(model=tmp, load_format="dummy", dtype="bfloat16", max_model_len=MAX_LEN,
                                        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=8192,
                                        gpu_memory_utilization=0.85))
        start_up = time.perf_counter() - started
        start_up_compiles = compiled_variants()
        print(f"engine up in {start_up:.1f} s", file=sys.stderr, flush=True)
        passes = []
        for i in range(args.passes):
            passes.append(run_pass(engine, shape["vocab_size"], args.seed + i, args.requests, args.in_flight))
            print(f"pass {i + 1}: {passes[-1]}", file=sys.stderr, flush=True)
    emit({"device": torch.cuda.get_device_name(), "shape": args.shape, "max_num_seqs": args.max_num_seqs,
          "requests": args.requests, "in_flight": args.in_flight, "start_up_seconds": round(start_up, 1),
          "start_up_compiles": start_up_compiles,
          "passes": passes}, args.json)


if __name__ == "__main__":
    main()
