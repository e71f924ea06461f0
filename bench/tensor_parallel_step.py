"""Tensor parallelism on two GPUs over NCCL: TP=2 against TP=1 on a random-weight Llama-shaped model.

One run loads a random-weight model (``load_format="dummy"``; Llama-1B shape by default: hidden
2048, 16 layers, 32 query / 8 KV heads, MLP 8192, vocab 32000, bf16, a synthetic word-level
tokenizer; every rank draws the same weights) and then, for TP=1 (one GPU) and TP=2 (rank processes, NCCL, ``tensor_parallel_backend
"processes"``), the same workload:

* agreement: ``--check-prompts`` random prompts, greedy, 6 new tokens, capture raw top-32 on
  ``auto`` layers plus fingerprints on the same layers: greedy tokens, and at every captured
  step whose context both runs share the fingerprint (max |Δ|) and top-32 (share of positions
  in common, max |Δ p| on them), for TP=2 against both TP=1 runs and TP=1 eager against TP=1
  with graphs (the bf16 noise floor between two single-GPU runs);
* decode step time: ``--batch`` sequences of ``--context`` random prompt tokens, median of
  ``--steps`` decode steps (each step ends in sampling, so it is synchronised), without
  capture, with fingerprint capture on every request (``auto`` layers) and with raw top-32 on
  ``auto`` layers.

On TP=2 each rank computes its heads' capture partials with the Triton kernels and the
ranks sum them onto rank 0 in one reduce per step. Each size runs twice: as configured by
default (CUDA graphs, on the ranks too, capture steps included; on TP=1 also overlapped
steps) and eagerly (``_eager``: no graphs, one step at a time), which separates the rank
hand-off and the capture work from the graph speed-up.
Prints one JSON object (also written to ``--json PATH``). Needs two CUDA GPUs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from attnscope.engine.engine_config import EngineConfig
from attnscope.engine.llm_engine import LLMEngine
from random_model import random_prompts, write_model_folder  # bench/, beside this script
from report import emit

SHAPES = {
    "llama-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "vocab_size": 128256},
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "vocab_size": 32000},
    "tiny": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 8,
             "num_key_value_heads": 4, "vocab_size": 1000},
}
SHAPE = dict(SHAPES["llama-1b"])
EAGER = {"cuda_graphs": False, "overlap_steps": False}
RUNS = [("tp1", 1, {}), ("tp1_eager", 1, EAGER), ("tp2", 2, {}), ("tp2_eager", 2, EAGER)]
CAPTURES = {
    "none": None,
    "fingerprint": {"mode": "fingerprint", "layers": "auto"},
    "raw_top32": {"mode": "raw", "top_k": 32, "layers": "auto"},
}


def log(message: str) -> None:
    """A progress line on stderr."""
    print(f"[tp_step] {message}", file=sys.stderr, flush=True)


def agreement_run(engine: LLMEngine, ids: list[list[int]]) -> list[dict]:
    """Greedy tokens and capture records of every prompt (raw top-32 and fingerprint on auto layers)."""
    params = {"temperature": 0.0, "max_tokens": 6, "ignore_eos": True}
    out = []
    for name in ("raw_top32", "fingerprint"):
        results = engine.generate(prompt_token_ids=ids, params=params, capture=CAPTURES[name])
        out.append({"capture": name, "tokens": [r.completions[0].token_ids for r in results],
                    "records": [r.completions[0].attention_tokens for r in results]})
    return out


def step_times(engine: LLMEngine, ids: list[list[int]], steps: int) -> dict[str, float]:
    """Median decode step milliseconds per capture setting."""
    times = {}
    for name, capture in CAPTURES.items():
        params = {"temperature": 0.0, "max_tokens": steps + 4, "ignore_eos": True}
        rids = [engine.add_request(prompt_token_ids=p, params=params, capture=capture) for p in ids]
        prefilled: set[str] = set()
        while len(prefilled) < len(rids):  # every prompt prefilled and decoding
            prefilled.update(out.request_id for out in engine.step())
        samples = []
        for _ in range(steps):
            started = time.perf_counter()
            engine.step()
            samples.append(1000 * (time.perf_counter() - started))
        for rid in rids:
            engine.abort(rid)
        while engine.has_unfinished():
            engine.step()
        times[name] = statistics.median(samples)
        log(f"  {name}: {times[name]:.2f} ms/step")
    return times


def compare(one: list[dict], two: list[dict]) -> dict:
    """How far one run's tokens and captures are from another's.

    Captures are compared only at steps whose context is the same in both runs (up to and
    including each sequence's first differing token): random weights give near-tied logits,
    so a greedy token can flip with the summation order and the sequences then part. Their
    attention is near-uniform too, so top-32 positions can swap among near-equal
    probabilities; the k-th largest probabilities (``ranked``) must agree regardless.
    """
    report = {"token_match_fraction": 0.0, "steps_compared": 0, "fingerprint_max_abs_diff": 0.0,
              "top32_position_overlap_min": 1.0, "top32_prob_max_abs_diff_on_common": 0.0,
              "top32_ranked_prob_max_abs_diff": 0.0}
    same = total = 0
    for a, b in zip(one, two):
        for ta, tb, ra, rb in zip(a["tokens"], b["tokens"], a["records"], b["records"]):
            same += sum(x == y for x, y in zip(ta, tb))
            total += len(ta)
            shared = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), len(ta))
            for ea, eb in list(zip(ra, rb))[: shared + 1]:
                report["steps_compared"] += 1
                if "fingerprint" in ea:
                    diff = max(abs(x - y) for x, y in zip(ea["fingerprint"], eb["fingerprint"]))
                    report["fingerprint_max_abs_diff"] = max(report["fingerprint_max_abs_diff"], diff)
                    continue
                for layer, da in ea["layers"].items():
                    db = eb["layers"][layer]
                    pa = dict(zip(da["token_positions"], da["true_probs"]))
                    pb = dict(zip(db["token_positions"], db["true_probs"]))
                    common = set(pa) & set(pb)
                    ranked = max((abs(x - y) for x, y in zip(da["true_probs"], db["true_probs"])), default=0.0)
                    report["top32_ranked_prob_max_abs_diff"] = max(report["top32_ranked_prob_max_abs_diff"], ranked)
                    report["top32_position_overlap_min"] = min(report["top32_position_overlap_min"],
                                                               len(common) / max(len(pa), 1))
                    if common:
                        report["top32_prob_max_abs_diff_on_common"] = max(
                            report["top32_prob_max_abs_diff_on_common"], max(abs(pa[j] - pb[j]) for j in common))
    report["token_match_fraction"] = same / max(total, 1)
    return report


def main() -> None:
    """Write the model, run TP=1 then TP=2, print the comparison and timings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="sequences decoding together")
    parser.add_argument("--context", type=int, default=2048, help="prompt tokens per sequence")
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per setting")
    parser.add_argument("--check-prompts", type=int, default=4, help="prompts of the agreement run")
    parser.add_argument("--seed", type=int, default=0, help="prompts seed")
    parser.add_argument("--json", default=None, help="also write the JSON object here")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b", help="model shape")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: a functional check over gloo (timings meaningless)")
    args = parser.parse_args()
    SHAPE.clear()
    SHAPE.update(SHAPES[args.shape])
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        sys.exit("needs two CUDA GPUs")
    report = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "shape": SHAPE, "batch": args.batch, "context": args.context,
              "dtype": "bfloat16", "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_model_folder(folder, {**SHAPE, "tie_word_embeddings": False, "rope_theta": 500000.0}, 8192)
        blocks = args.batch * (args.context + args.steps + 32) // 16 + 64
        check = random_prompts(args.check_prompts, 300, SHAPE["vocab_size"], args.seed + 1)
        work = random_prompts(args.batch, args.context, SHAPE["vocab_size"], args.seed + 2)
        agreement = {}
        for run, size, options in RUNS:
            log(f"{run}: loading")
            engine = LLMEngine(EngineConfig(model=str(folder), load_format="dummy", device=args.device,
                                            dtype="bfloat16", num_kv_blocks=blocks,
                                            max_num_seqs=max(args.batch, args.check_prompts),
                                            max_num_batched_tokens=8192, tensor_parallel_size=size,
                                            tensor_parallel_backend="processes", **options))
            try:
                agreement[run] = agreement_run(engine, check)
                log(f"{run}: timing")
                report["runs"][run] = {"decode_step_ms": step_times(engine, work, args.steps)}
            finally:
                engine.close()
    report["agreement"] = {f"{a}_vs_{b}": compare(agreement[b], agreement[a])
                           for a, b in (("tp2", "tp1_eager"), ("tp2", "tp1"), ("tp2_eager", "tp1_eager"),
                                        ("tp1_eager", "tp1"))}
    for run in report["runs"].values():
        ms = run["decode_step_ms"]
        run["capture_over_none"] = {k: ms[k] / ms["none"] for k in ms if k != "none"}
    emit(report, args.json)


if __name__ == "__main__":
    main()
