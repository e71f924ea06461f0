"""Would the previous decode step's per-head ``lse`` let a group-summed store rank head-mean top-k exactly?

Head-mean top-k needs every head's final ``lse`` before any position's ``p̄`` is known, so the
fused kernel stores each head's logits (4 bytes per head and position) and ranks them after the
attention. A cheaper store would keep one number per KV group and position,
``G_g(j) = Σ_{h∈g} exp(s_hj − λ_h)``, with ``λ_h`` the same head's ``lse`` at the previous decode
step: with ``c_h = exp(λ_h − lse_h)`` known after the attention,
``Σ_g min_{h∈g} c_h · G_g(j) ≤ H · p̄(j) ≤ Σ_g max_{h∈g} c_h · G_g(j)``, and every position whose
upper bound reaches the ``k``-th largest lower bound would have its keys re-read for the exact
``p̄``. That pays only if few positions are candidates, i.e. if the heads' ``lse`` move together
from step to step.

This measures it on a real model (the embedded SmolLM2 unless ``--model`` says otherwise, HF
transformers on the CPU, float32): greedy decoding after a prompt of real text, every layer's
per-head logits of every decode step, and per layer the spread ``ln(max_h c_h / min_h c_h)`` and
the number of candidate positions of that bound (checked to contain the exact top-k). Prints one
JSON object.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from report import emit  # bench/report.py, beside this script

ROOT = Path(__file__).resolve().parent.parent


def record_decode_logits(model, input_ids: torch.Tensor, max_new_tokens: int) -> dict[int, list[np.ndarray]]:
    """Greedy-decode ``max_new_tokens`` and return, per layer, each decode step's logits ``[heads, positions]``."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    logits: dict[int, list[np.ndarray]] = {}

    def recording_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if query.shape[2] == 1:
            keys = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
            scores = torch.einsum("hd,hld->hl", query[0, :, 0, :], keys[0]) * scaling
            logits.setdefault(module.layer_idx, []).append(scores.double().numpy())
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)

    AttentionInterface.register("attnscope_recording", recording_attention)
    model.set_attn_implementation("attnscope_recording")
    with torch.no_grad():
        model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False)
    return logits


def candidate_count(scores: np.ndarray, previous: np.ndarray, group_size: int, k: int) -> tuple[int, float]:
    """Positions a group-summed store bounded by the previous step's ``lse`` must re-read, and the heads' spread.

    Asserts that the candidates contain the exact head-mean top-``k`` (the bound is sound)."""
    lse = np.logaddexp.reduce(scores, axis=1)
    previous_lse = np.logaddexp.reduce(previous, axis=1)
    correction = np.exp(previous_lse - lse)
    scaled = np.exp(scores - previous_lse[:, None])
    groups = scaled.reshape(-1, group_size, scores.shape[1]).sum(axis=1)
    per_group = correction.reshape(-1, group_size)
    lower = (per_group.min(axis=1)[:, None] * groups).sum(axis=0)
    upper = (per_group.max(axis=1)[:, None] * groups).sum(axis=0)
    k = min(k, scores.shape[1])
    candidates = upper >= np.sort(lower)[-k]
    mean_probs = (correction[:, None] * scaled).sum(axis=0)
    assert candidates[np.argsort(-mean_probs, kind="stable")[:k]].all()
    return int(candidates.sum()), float(np.log(correction.max() / correction.min()))


def summarise_layer(steps: list[np.ndarray], group_size: int, k: int) -> dict:
    """Candidate counts and head spreads of one layer over its decode steps (each against the step before)."""
    counts, spreads = zip(*(candidate_count(steps[t], steps[t - 1], group_size, k)
                            for t in range(1, len(steps))))
    positions = steps[-1].shape[1]
    return {
        "positions_last_step": positions,
        "lse_spread_nats": {"median": float(np.median(spreads)), "p90": float(np.percentile(spreads, 90))},
        "candidates": {"median": float(np.median(counts)), "p90": float(np.percentile(counts, 90)),
                       "max": int(max(counts))},
        "candidate_fraction_p90": float(np.percentile(counts, 90)) / positions,
    }


def main() -> None:
    """Parse flags, decode, and print the per-layer candidate counts as one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--text", default=str(ROOT / "docs" / "capture.md"),
                        help="file whose opening is the prompt (default: docs/capture.md)")
    parser.add_argument("--prompt-chars", type=int, default=6000, help="characters of --text in the prompt")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="decode steps (default 100)")
    parser.add_argument("--top-k", type=int, default=32, help="head-mean top-k ranked (default 32, the sketch's hubs)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    if args.max_new_tokens < 2:
        parser.error("--max-new-tokens must be at least 2 (each step is bounded by the one before)")

    import transformers

    from attnscope.engine.weights import default_model_path

    path = Path(args.model) if args.model else default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = Path(args.text).read_text()[: args.prompt_chars]
    messages = [{"role": "user", "content": text + "\n\nSummarise the text above in detail."}]
    input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                              return_dict=True)["input_ids"]
    print(f"[bench] {input_ids.shape[1]} prompt tokens, {args.max_new_tokens} decode steps", file=sys.stderr)
    logits = record_decode_logits(model, input_ids, args.max_new_tokens)
    config = model.config
    group_size = config.num_attention_heads // config.num_key_value_heads
    layers = {str(layer): summarise_layer(steps, group_size, args.top_k) for layer, steps in sorted(logits.items())}
    fractions = [entry["candidate_fraction_p90"] for entry in layers.values()]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    emit({
        "benchmark": "head_lse_drift",
        "machine": f"{platform.machine()} CPU",
        "model": path.name,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "prompt": f"{Path(args.text).name} (first {args.prompt_chars} characters) at {commit.stdout.strip()}",
        "prompt_tokens": int(input_ids.shape[1]),
        "decode_steps": len(next(iter(logits.values()))),
        "top_k": args.top_k,
        "candidate_fraction_p90": {"min_over_layers": min(fractions), "median_over_layers": float(np.median(fractions)),
                                   "max_over_layers": max(fractions)},
        "layers": layers,
    }, args.out)


if __name__ == "__main__":
    main()
