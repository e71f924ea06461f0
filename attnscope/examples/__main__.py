"""``python -m attnscope.examples needle|codename [--layers 0,9,18] [--base-url URL] [--model NAME]``.

Runs a retrieval demo with full attention capture and prints, per captured layer, where
the query that produced the answer looked. With ``--base-url`` it calls a running
attnscope server through the ``openai`` SDK; without, it runs the embedded engine here.
"""

from __future__ import annotations

import argparse
import sys

from openai import APIError

from attnscope.client import AttentionAnalyzer
from attnscope.engine.llm_engine import InvalidRequestError
from attnscope.examples.backends import DemoRun, run_embedded, run_remote
from attnscope.examples.demos import DEMO_NAMES, Demo, build
from attnscope.examples.render import MARK, layer_block, token_label, word_positions


def build_parser() -> argparse.ArgumentParser:
    """The demo command line."""
    parser = argparse.ArgumentParser(
        prog="python -m attnscope.examples",
        description="Retrieval demos with full attention capture: the answer, then where the answering "
                    "query looked in each captured layer.")
    parser.add_argument("demo", choices=DEMO_NAMES, help="needle: secret word in a haystack; codename: agent log")
    parser.add_argument("--layers", default=None,
                        help="comma-separated layer ids (default: 17,18 and the last layer)")
    parser.add_argument("--base-url", default=None, help="an attnscope server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default=None,
                        help="server: the model name (default: the first listed); embedded: checkpoint path")
    parser.add_argument("--tokenizer", default=None,
                        help="server: local checkpoint whose tokenizer labels prompt tokens (default: embedded model)")
    parser.add_argument("--max-tokens", type=int, default=24, help="most tokens to generate (default: 24)")
    parser.add_argument("--seed", type=int, default=0, help="places the needle (default: 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one demo and print the answer, then the per-layer attention."""
    args = build_parser().parse_args(argv)
    try:
        layers = [int(x) for x in args.layers.split(",") if x.strip()] if args.layers else None
    except ValueError:
        print(f"--layers must be comma-separated integers, got {args.layers!r}", file=sys.stderr)
        return 2
    demo = build(args.demo, args.seed)
    try:
        if args.base_url:
            run = run_remote(demo, args.base_url, args.model, layers, args.max_tokens, args.tokenizer)
        else:
            run = run_embedded(demo, layers, args.max_tokens, args.model)
    except (InvalidRequestError, APIError) as exc:
        print(f"request failed: {exc}", file=sys.stderr)
        return 1
    print("\n".join(report(demo, run)))
    return 0


def report(demo: Demo, run: DemoRun) -> list[str]:
    """The answer, the query row shown and every captured layer's compact block."""
    ok = "✓" if demo.expected.lower() in run.answer.lower() else "✗"
    lines = ["=" * 60, f"{demo.title}  |  model={run.model}  layers={','.join(map(str, sorted(run.attention)))}",
             f"Answer: {run.answer.strip()!r}  {ok} (expected {demo.expected!r})"]
    if not run.attention:
        return [*lines, "No attention data in the response (does the server support attn_capture?)"]
    first = next(iter(run.attention.values()))
    rows, prompt_len = first["shape"][0], first["token_meta"]["prompt_len"]
    marked = set(word_positions(run.tokens, 0, prompt_len, demo.target))
    answer_at = word_positions(run.tokens, prompt_len, rows + 1, demo.target)
    query = answer_at[0] - 1 if answer_at else prompt_len - 1
    produced = token_label(run.tokens, query + 1)
    where = ",".join(map(str, sorted(marked))) or "not found"
    lines.append(f"Query: row {query} {token_label(run.tokens, query)} → produced {produced}   "
                 f"{MARK} = {demo.target!r} at {where}")
    for layer, data in sorted(run.attention.items()):
        lines += ["", *layer_block(layer, AttentionAnalyzer(data["scores"], data["token_meta"]), run.tokens, query, marked)]
    return lines


if __name__ == "__main__":
    sys.exit(main())
