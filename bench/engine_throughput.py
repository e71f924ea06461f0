"""Generation throughput on a mixed workload: attnscope's engine beside HF transformers ``generate``.

One run, same machine, same prompts (token ids), same weights (the embedded SmolLM2 GGUF
unless ``--model`` says otherwise). Every request generates exactly its ``max_tokens``
(EOS ignored) so both sides do the same useful work:

* batch 1: requests one after another (ours: one request at a time; HF: one ``generate`` each);
* concurrent: all requests submitted at once to our continuous-batching engine, against HF
  ``generate`` over left-padded batches of ``--batch`` requests (each batch runs to its
  longest ``max_tokens``; only the requested tokens count as useful).

Prints one JSON object: tokens/s of each side and the ratios.
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time

import torch

from report import emit  # bench/report.py, beside this script


def build_workload(tokenizer, num: int, seed: int) -> list[tuple[list[int], int]]:
    """``num`` (prompt ids, max_tokens) pairs: prompt lengths 20–800 tokens, max_tokens 8–128."""
    rng = random.Random(seed)
    words = ("the river city light model token garden quiet number paper music window north story "
             "silver engine forest market table winter signal").split()
    work = []
    for _ in range(num):
        target = rng.randint(20, 800)
        text = " ".join(rng.choice(words) for _ in range(target * 2))
        ids = tokenizer.encode(text, add_special_tokens=False)[:target]
        work.append((ids, rng.randint(8, 128)))
    return work


def run_ours_one_at_a_time(engine, work) -> float:
    """Seconds our engine takes serving the requests one after another."""
    started = time.perf_counter()
    for ids, max_tokens in work:
        engine.generate(prompt_token_ids=[ids], params={"temperature": 0.0, "max_tokens": max_tokens,
                                                        "ignore_eos": True})
    return time.perf_counter() - started


def run_ours_concurrent(engine, work) -> float:
    """All requests at once, each with its own max_tokens (continuous batching)."""
    started = time.perf_counter()
    for ids, max_tokens in work:
        engine.add_request(prompt_token_ids=ids, params={"temperature": 0.0, "max_tokens": max_tokens,
                                                         "ignore_eos": True})
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - started


def run_hf(model, work, batch: int, pad_id: int) -> float:
    """Seconds HF ``generate`` takes over left-padded batches of ``batch`` requests."""
    started = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(work), batch):
            group = work[i : i + batch]
            width = max(len(ids) for ids, _ in group)
            input_ids = torch.full((len(group), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for row, (ids, _) in enumerate(group):
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                mask[row, width - len(ids):] = 1
            new = max(m for _, m in group)
            model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=pad_id)
    return time.perf_counter() - started


def main() -> None:
    """Parse flags, run both engines on the same workload, print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--requests", type=int, default=16, help="requests in the workload (default 16)")
    parser.add_argument("--batch", type=int, default=16, help="HF padded batch size for the concurrent run")
    parser.add_argument("--seed", type=int, default=0, help="workload seed")
    args = parser.parse_args()

    import transformers

    from attnscope.engine.engine_config import EngineConfig
    from attnscope.engine.llm_engine import LLMEngine
    from attnscope.engine.weights import default_model_path

    path = default_model_path() if args.model is None else __import__("pathlib").Path(args.model)
    engine = LLMEngine(EngineConfig(model=str(path), device="cpu", kv_cache_memory_gib=1.0))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    work = build_workload(engine.tokenizer, args.requests, args.seed)
    useful = sum(m for _, m in work)
    pad_id = engine.tokenizer.eos_token_id or 0
    print(f"[bench] {len(work)} requests, {useful} generated tokens each side", file=sys.stderr)

    run_ours_one_at_a_time(engine, work[:2])
    ours_b1 = run_ours_one_at_a_time(engine, work)
    print(f"[bench] ours batch 1: {ours_b1:.1f}s", file=sys.stderr)
    hf_b1 = run_hf(hf, work, 1, pad_id)
    print(f"[bench] HF batch 1: {hf_b1:.1f}s", file=sys.stderr)
    ours_cc = run_ours_concurrent(engine, work)
    print(f"[bench] ours concurrent: {ours_cc:.1f}s", file=sys.stderr)
    hf_cc = run_hf(hf, work, args.batch, pad_id)
    print(f"[bench] HF padded batch {args.batch}: {hf_cc:.1f}s", file=sys.stderr)

    result = {
        "benchmark": "engine_throughput",
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "model": path.name,
        "requests": len(work),
        "generated_tokens": useful,
        "prompt_tokens": sum(len(ids) for ids, _ in work),
        "batch1": {"ours_tok_s": useful / ours_b1, "hf_tok_s": useful / hf_b1, "ratio": hf_b1 / ours_b1},
        "concurrent": {"ours_tok_s": useful / ours_cc, "hf_tok_s": useful / hf_cc, "ratio": hf_cc / ours_cc,
                       "hf_batch": args.batch, "ours_preemptions": engine.scheduler.num_preemptions},
    }
    emit(result, None)


if __name__ == "__main__":
    main()
