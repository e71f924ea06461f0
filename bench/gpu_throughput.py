"""The engine on one GPU against the memory-bandwidth roofline and HF transformers, with and without capture.

One run, random bf16 weights (``load_format="dummy"``) of three model shapes (SmolLM2-135M,
Llama-3.2-1B, Llama-3.1-8B) and a synthetic word-level tokenizer. For every shape and every
(batch, context) case that fits:

* prefill tokens/s (all prompts of the case submitted together, 8192-token steps);
* decode step time (median of ``--steps`` engine steps: with overlapped steps the time
  between launches, which covers the device's step plus the host's scheduling, sampling and
  detokenisation where they do not hide behind it; the settings run in
  ``--rounds`` rounds and each keeps its best round's median), the GPU kernel time
  of a step (CUDA profiler over a few more steps, with the longest kernels by name) and tokens/s for
  (a) no capture, (b) fingerprint capture on every request and every step (``auto``
  layers), (c) raw top-32 on ``auto`` layers for every request, all with overlapped steps,
  and (d) no capture one step at a time (``overlap_steps`` off: the host reads each step's
  tokens before launching the next); the prompts of (b), (c) and (d) come from the prefix
  cache, so only decoding differs;
* the roofline: bytes a decode step must read (every weight matrix except the embedding
  table, of which a step reads only its tokens' rows, plus the batch's KV cache) over the
  copy bandwidth measured in the same run;
* HF transformers ``generate`` (same shape, random weights, bf16, SDPA, greedy) on the
  ``--hf-cases``: prefill and decode step time from per-token timestamps.

``--soak-seconds`` then keeps a mixed workload (prompts 16-6000 tokens, 8-512 new tokens,
a third each without capture, fingerprint and raw top-32) running on the first shape and
reports completed requests, errors and peak memory. Prints one JSON object (also written
to ``--json``); progress lines go to stderr.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from attnscope.engine.engine_config import EngineConfig
from attnscope.engine.kv_cache import kv_bytes_per_token
from attnscope.engine.llm_engine import LLMEngine
from cases import parse_cases  # bench/, beside this script
from random_model import random_prompts, write_model_folder
from report import emit

SHAPES = {
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                     "tie_word_embeddings": True, "rope_theta": 100000.0},
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True, "rope_theta": 500000.0},
    "llama-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False, "rope_theta": 500000.0},
}
CAPTURES = {
    "none": None,
    "fingerprint": {"mode": "fingerprint", "layers": "auto", "fingerprint_max_steps": None},
    "raw_top32": {"mode": "raw", "top_k": 32, "layers": "auto"},
}
SETTINGS = {name: (capture, True) for name, capture in CAPTURES.items()}  # name -> (capture, overlap_steps)
SETTINGS["none_one_step"] = (None, False)
WARMUP_STEPS = 3
PROFILED_STEPS = 3
TOP_KERNELS = 12
DECODE_HEADROOM = 448
SOAK_MAX_PROMPT = 6000
SOAK_MAX_NEW_TOKENS = 512


def log(message: str) -> None:
    """A progress line on stderr."""
    print(f"[gpu_throughput] {message}", file=sys.stderr, flush=True)


def copy_bandwidth(device: torch.device) -> float:
    """Device copy bandwidth in bytes/s (read + write) of a 2 GiB buffer, best of 10."""
    src = torch.empty(2**30, dtype=torch.int16, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    del src, dst
    return 2 * 2**31 / best


def step_bytes(shape: dict, batch: int, context: float) -> float:
    """Bytes one decode step must read: weights (without the embedding table) and the batch's KV cache."""
    h, f, layers, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    head_dim = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * f + 2 * h
    weights = 2 * (layers * per_layer + v * h + h)
    cache = batch * context * kv_bytes_per_token(layers, shape["num_key_value_heads"], head_dim, torch.bfloat16)
    return weights + cache


def drain(engine: LLMEngine, rids: list[str]) -> None:
    """Abort the requests and step until the engine is idle."""
    for rid in rids:
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()


def run_case(engine: LLMEngine, ids: list[list[int]], steps: int, rounds: int) -> dict:
    """Prefill tokens/s (first setting, first round) and decode step ms of every capture setting.

    The settings run one after another, ``rounds`` times; a setting's step time is the
    lowest of its rounds' medians, so a burst of host noise in one round does not decide
    a ratio. Later rounds take their prompts from the prefix cache.
    """
    result: dict = {"decode_ms": {}, "kernel_ms": {}, "kernel_us_per_step": {}}
    engine_overlaps = engine.overlap_steps
    for round_index in range(rounds):
        for name, (capture, overlap) in SETTINGS.items():
            first = round_index == 0
            engine.overlap_steps = overlap and engine_overlaps
            median, kernels = run_setting(engine, ids, steps, capture, result if first and name == "none" else None,
                                          profile_kernels=first)
            result["decode_ms"][name] = min(median, result["decode_ms"].get(name, median))
            if first:
                result["kernel_ms"][name], result["kernel_us_per_step"][name] = kernels
    engine.overlap_steps = engine_overlaps
    return result


def run_setting(engine: LLMEngine, ids: list[list[int]], steps: int, capture: dict | None, prefill: dict | None,
                profile_kernels: bool) -> tuple[float, tuple[float, dict[str, float]] | None]:
    """Median decode step ms of the prompts under one capture setting (and ``kernel_ms`` when
    ``profile_kernels``); records prefill tokens/s and the mean context into ``prefill`` when given."""
    # Requests prefilled first decode while the others prefill: room for that, aborted after timing.
    params = {"temperature": 0.0, "max_tokens": DECODE_HEADROOM, "ignore_eos": True}
    torch.cuda.synchronize()
    started = time.perf_counter()
    rids = [engine.add_request(prompt_token_ids=p, params=params, capture=capture) for p in ids]
    prefilled: set[str] = set()
    while len(prefilled) < len(rids):
        prefilled.update(out.request_id for out in engine.step())
    if prefill is not None:
        prefill["prefill_tokens_per_s"] = sum(map(len, ids)) / (time.perf_counter() - started)
        prefill["mean_context_at_decode"] = statistics.mean(seq.num_tokens for seq in engine.scheduler.running)
    running = engine.stats().num_running
    if running != len(ids):
        raise RuntimeError(f"{running} of {len(ids)} sequences decoding: the case does not fit")
    samples = []
    for i in range(steps + WARMUP_STEPS):
        begun = time.perf_counter()
        engine.step()
        if i >= WARMUP_STEPS:
            samples.append(1000 * (time.perf_counter() - begun))
    kernels = kernel_ms(engine, PROFILED_STEPS) if profile_kernels else None
    drain(engine, rids)
    return statistics.median(samples), kernels


def kernel_ms(engine: LLMEngine, steps: int) -> tuple[float, dict[str, float]]:
    """GPU kernel time per engine step (CUDA profiler, kernels inside graphs included): the step's
    device work, so ``decode_ms - kernel_ms`` is host time the GPU waits for; and microseconds per
    step of the ``TOP_KERNELS`` kernels that took longest, by name (where capture's time goes)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.self_device_time_total, reverse=True)
    by_name = {e.key[:80]: e.self_device_time_total / steps for e in events[:TOP_KERNELS]}
    return sum(e.self_device_time_total for e in events) / 1000 / steps, by_name


def hf_case(model, ids: list[list[int]], new_tokens: int) -> dict:
    """HF ``generate`` on the prompts: prefill ms and median decode step ms from per-token timestamps."""
    import transformers

    stamps: list[float] = []

    class Stamp(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            return scores

    batch = torch.tensor(ids, device="cuda")
    torch.cuda.synchronize()
    started = time.perf_counter()
    model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, logits_processor=[Stamp()], pad_token_id=0)
    gaps = [1000 * (b - a) for a, b in zip(stamps[1:], stamps[2:])]
    return {"prefill_ms": 1000 * (stamps[0] - started), "decode_ms": statistics.median(gaps)}


def hf_model(folder: Path):
    """HF ``LlamaForCausalLM`` of the folder's config with random bf16 weights on the GPU."""
    import transformers

    config = transformers.LlamaConfig.from_pretrained(folder)
    config._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    return model.eval()


def soak(engine: LLMEngine, seconds: float, vocab: int, seed: int) -> dict:
    """A mixed workload for ``seconds``: completed requests, tokens, errors and peak memory."""
    rng = random.Random(seed)
    kinds = list(CAPTURES.values())
    live: set[str] = set()
    done = tokens = errors = 0
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        while len(live) < 64:
            ids = [rng.randrange(3, vocab) for _ in range(rng.randint(16, SOAK_MAX_PROMPT))]
            params = {"temperature": rng.choice([0.0, 0.8]), "max_tokens": rng.randint(8, SOAK_MAX_NEW_TOKENS),
                      "ignore_eos": True}
            live.add(engine.add_request(prompt_token_ids=ids, params=params, capture=rng.choice(kinds)))
        for out in engine.step():
            tokens += sum(len(d.token_ids) for d in out.deltas)
            if out.finished:
                live.discard(out.request_id)
                done += 1
                errors += sum(d.finish_reason not in ("length", "stop") for d in out.deltas)
    drain(engine, list(live))
    free, total = torch.cuda.mem_get_info()
    return {"seconds": seconds, "completed_requests": done, "generated_tokens": tokens, "errors": errors,
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30, "device_total_gib": total / 2**30,
            "kv_usage_at_end": engine.kv_usage()}


def main() -> None:
    """Measure every shape and case, then HF, then the soak run; print the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="smollm2-135m,llama-1b,llama-8b", help="comma-separated shape names")
    parser.add_argument("--batches", default="1,8,32,128", help="decode batch sizes")
    parser.add_argument("--contexts", default="512,2048,8192", help="prompt lengths")
    parser.add_argument("--steps", type=int, default=12, help="timed decode steps per setting and round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the settings (each takes its best round)")
    parser.add_argument("--hf-cases", default="1x512,1x8192,32x512,32x2048",
                        help="BATCHxCONTEXT cases for HF transformers ('' = none)")
    parser.add_argument("--hf-new-tokens", type=int, default=16, help="tokens HF generates per case")
    parser.add_argument("--soak-seconds", type=float, default=0.0,
                        help="mixed-workload run on the first shape (engines then take prompts of up to "
                             f"{SOAK_MAX_PROMPT} + {SOAK_MAX_NEW_TOKENS} tokens)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="KV cache share of free memory")
    parser.add_argument("--num-threads", type=int, default=None, help="torch intra-op threads (default: the engine's, 1 on CUDA)")
    parser.add_argument("--json", default=None, help="also write the JSON object here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    device = torch.device("cuda")
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    hf_cases = parse_cases(parser, "--hf-cases", args.hf_cases)
    bandwidth = copy_bandwidth(device)
    log(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    report = {"device": torch.cuda.get_device_name(0), "dtype": "bfloat16", "torch": torch.__version__,
              "copy_bandwidth_tb_s": bandwidth / 1e12, "torch_threads": args.num_threads or 1,
              "shapes": {}}
    max_len = max(contexts) + DECODE_HEADROOM + 64
    if args.soak_seconds:  # the engines take the soak's longest requests too
        max_len = max(max_len, SOAK_MAX_PROMPT + SOAK_MAX_NEW_TOKENS)
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        entry = report["shapes"][shape_name] = {"shape": shape, "cases": []}
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            write_model_folder(folder, shape, max_len)
            log(f"{shape_name}: loading")
            loaded = time.perf_counter()
            engine = LLMEngine(EngineConfig(model=str(folder), load_format="dummy", dtype="bfloat16",
                                            max_model_len=max_len, max_num_seqs=max(batches),
                                            max_num_batched_tokens=8192,
                                            gpu_memory_utilization=args.gpu_memory_utilization,
                                            num_threads=args.num_threads))
            entry["load_and_graphs_s"] = time.perf_counter() - loaded
            capacity = engine.blocks.num_blocks * engine.config.block_size
            seed = 0
            for batch in batches:
                for context in contexts:
                    if batch * (context + max_len - max(contexts)) > capacity * 0.9:
                        log(f"{shape_name}: skip B={batch} L={context} (KV cache holds {capacity} tokens)")
                        continue
                    seed += 1
                    case = {"batch": batch, "context": context,
                            **run_case(engine, random_prompts(batch, context, shape["vocab_size"], seed), args.steps, args.rounds)}
                    ms = case["decode_ms"]
                    roofline_ms = 1000 * step_bytes(shape, batch, case["mean_context_at_decode"]) / bandwidth
                    case.update({
                        "decode_tokens_per_s": {k: 1000 * batch / v for k, v in ms.items()},
                        "roofline_ms": roofline_ms,
                        "roofline_fraction": roofline_ms / ms["none"],
                        "capture_overhead": {k: ms[k] / ms["none"] - 1 for k in CAPTURES if k != "none"},
                        "overlap_speedup": ms["none_one_step"] / ms["none"],
                    })
                    entry["cases"].append(case)
                    log(f"{shape_name}: B={batch} L={context}: " + ", ".join(
                        f"{k} {v:.2f} ms (kernels {case['kernel_ms'][k]:.2f})" for k, v in ms.items())
                        + f"; roofline {roofline_ms:.2f} ms ({case['roofline_fraction']:.0%})")
            entry["graph_steps"] = engine.runner.graphs.replays if engine.runner.graphs is not None else 0
            if args.soak_seconds and shape_name == args.shapes.split(",")[0]:
                log(f"{shape_name}: soak for {args.soak_seconds:.0f} s")
                entry["soak"] = soak(engine, args.soak_seconds, shape["vocab_size"], 99)
                log(f"{shape_name}: soak {entry['soak']}")
            engine.close()
            del engine
            gc.collect()
            torch.cuda.empty_cache()
            if hf_cases:
                model = hf_model(folder)
                entry["hf"] = []
                for batch, context in hf_cases:
                    ids = random_prompts(batch, context, shape["vocab_size"], 1000 + batch + context)
                    hf = {"batch": batch, "context": context, **hf_case(model, ids, args.hf_new_tokens)}
                    ours = next((c for c in entry["cases"] if (c["batch"], c["context"]) == (batch, context)), None)
                    if ours is not None:
                        hf["ours_speedup_decode"] = hf["decode_ms"] / ours["decode_ms"]["none"]
                    entry["hf"].append(hf)
                    log(f"{shape_name}: HF B={batch} L={context}: decode {hf['decode_ms']:.2f} ms")
                del model
                gc.collect()
                torch.cuda.empty_cache()
    emit(report, args.json)


if __name__ == "__main__":
    main()
