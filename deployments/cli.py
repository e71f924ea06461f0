"""The ``attnscope`` command line: ``serve`` the HTTP API, ``generate`` one completion, or ``chat`` interactively."""

from __future__ import annotations

import argparse
import os
import sys
import time

from pydantic import ValidationError

from attnscope.deployments.application import AppArgs
from attnscope.engine.engine_config import EngineConfig
from attnscope.engine.llm_engine import InvalidRequestError, LLMEngine
from attnscope.engine.weights import ModelLoadError


def _engine_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every subcommand that builds an engine."""
    parser.add_argument("--model", default=None,
                        help="HF checkpoint folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run (default: auto)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights/activations dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--max-model-len", type=int, default=None, help="context limit in tokens (default: the model's)")


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the sampling parameters."""
    parser.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default: 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (default: 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens, 0 = all (default: 0)")
    parser.add_argument("--seed", type=int, default=None, help="per-request seed for reproducible sampling")


_ENGINE_FLAGS = ("model", "device", "dtype", "max_model_len")
_CLI_DEFAULTS = {"engine_num_cpus": "the cluster's CPUs shared among the engine replicas"}


def _serve_args(parser: argparse.ArgumentParser) -> None:
    """Flags of ``serve``: the engine flags, then one per ``AppArgs`` field (help and defaults from its model)."""
    _engine_args(parser)
    for name, info in AppArgs.model_fields.items():
        if name in _ENGINE_FLAGS:
            continue
        flag = "--" + name.replace("_", "-")
        default = _CLI_DEFAULTS.get(name, info.get_default(call_default_factory=True))
        text = info.description or ""
        if "default" not in text and default not in (None, False):
            text += f" (default: {','.join(default) if isinstance(default, list) else default})"
        if info.annotation is bool:
            parser.add_argument(flag, action="store_true", default=None, help=text)
        else:
            parser.add_argument(flag, default=None, help=text)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(),
                        help="CPUs of the local Ray cluster (default: all of this machine's)")
    parser.add_argument("--no-dashboard", action="store_true", help="do not start the Ray dashboard")


def _app_args(args: argparse.Namespace) -> AppArgs:
    """``AppArgs`` from the flags given; by default the engine gets every CPU of the cluster."""
    values = {name: getattr(args, name) for name in AppArgs.model_fields if getattr(args, name) is not None}
    replicas = int(values.get("num_replicas", 1))
    values.setdefault("engine_num_cpus", max(1, args.num_cpus // max(1, replicas)))
    return AppArgs.model_validate(values)


def _serve(args: argparse.Namespace) -> int:
    """The ``serve`` subcommand."""
    from attnscope.deployments.launcher import serve_until_interrupted

    try:
        settings = _app_args(args)
    except ValidationError as exc:
        err = exc.errors()[0]
        print(f"attnscope: invalid --{'-'.join(str(p) for p in err['loc']).replace('_', '-')}: {err['msg']}",
              file=sys.stderr)
        return 2
    try:
        serve_until_interrupted(settings, args.num_cpus, dashboard=not args.no_dashboard)
    except KeyboardInterrupt:
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also documents every flag in ``--help``)."""
    parser = argparse.ArgumentParser(prog="attnscope", description="attnscope inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API with attention capture on Ray Serve")
    _serve_args(serve)
    gen = sub.add_parser("generate", help="generate one completion and print it as it streams")
    _engine_args(gen)
    _sampling_args(gen)
    gen.add_argument("--prompt", required=True, help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    chat = sub.add_parser("chat", help="interactive chat in the terminal")
    _engine_args(chat)
    _sampling_args(chat)
    return parser


def _sampling(args: argparse.Namespace) -> dict:
    """Sampling parameters from the parsed flags."""
    return {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "seed": args.seed}


def _stream(engine: LLMEngine, request_id: str) -> str:
    """Step the engine, print the request's text as it arrives, and return all of it."""
    parts: list[str] = []
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == request_id:
                for delta in out.deltas:
                    parts.append(delta.text)
                    sys.stdout.write(delta.text)
                    sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(parts)


def _generate(engine: LLMEngine, args: argparse.Namespace) -> None:
    """The ``generate`` subcommand."""
    if args.chat:
        rid = engine.add_request(messages=[{"role": "user", "content": args.prompt}], params=_sampling(args))
    else:
        rid = engine.add_request(args.prompt, params=_sampling(args))
    _stream(engine, rid)


def _chat(engine: LLMEngine, args: argparse.Namespace) -> None:
    """The ``chat`` subcommand: a read-eval-print loop keeping the conversation."""
    history: list[dict] = []
    print("attnscope chat — empty line or Ctrl-D to quit", flush=True)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        rid = engine.add_request(messages=history, params=_sampling(args))
        history.append({"role": "assistant", "content": _stream(engine, rid)})


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``attnscope`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    started = time.perf_counter()
    try:
        engine = LLMEngine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                                        max_model_len=args.max_model_len))
    except ModelLoadError as exc:
        print(f"attnscope: cannot load model: {exc}", file=sys.stderr)
        return 2
    print(f"[attnscope] loaded {args.model or 'embedded SmolLM2-135M-Instruct'} on {engine.device} "
          f"in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    try:
        (_generate if args.command == "generate" else _chat)(engine, args)
    except InvalidRequestError as exc:
        print(f"attnscope: invalid request ({exc.field}): {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
