"""Serving load with and without attention capture: concurrent streaming chat clients over HTTP.

One run: a local Ray cluster (``--num-cpus``, a small object store), Serve on a free
loopback port with the attnscope app on the embedded model (CPU), then for each of three
configurations — capture off, fingerprint (``return_attention_tokens`` +
``attention_fingerprint_mode``), raw (``return_attention_tokens``, ``top_k_attention`` 10,
``attention_capture_layers`` "auto") — ``--clients`` threads each send
``--requests-per-client`` streaming chat completions one after another (``--rounds`` rounds
over the three configurations, the order reversed every other round; each configuration's
numbers pool its rounds) through the official
``openai`` SDK (fixed prompts, temperature 0, ``max_tokens`` 32, EOS ignored so every
request generates the same number of tokens in every configuration).

Per request: TTFT (request sent → first chunk with content) and the gaps between successive
content chunks (ITL). Per configuration: generated tokens/s over the wall time of the
configuration, TTFT and ITL p50/p90/p99, and their ratios to capture off. Before any
measurement, every configuration runs one unmeasured round (all clients at once, 8 tokens)
so that first-batch warm-up costs do not land on whichever configuration runs first.

Prints one JSON object (and writes it to ``--json PATH``); progress goes to stderr.
Serve and Ray are shut down at the end. About 1–2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import sys
import threading
import time
from typing import Any

import numpy as np

from report import emit  # bench/report.py, beside this script

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a neural network is in one paragraph.",
    "List three uses of copper.",
    "Why is the sky blue?",
    "Describe a cat to someone who has never seen one.",
    "What is 17 times 23? Show your steps.",
    "Give me a recipe idea with rice and beans.",
]

CONFIGS: dict[str, dict[str, Any]] = {
    "off": {},
    "fingerprint": {"return_attention_tokens": True, "attention_fingerprint_mode": True},
    "raw": {"return_attention_tokens": True, "top_k_attention": 10, "attention_capture_layers": "auto"},
}


def log(message: str) -> None:
    """A progress line on stderr."""
    print(f"[serve_load] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99 in milliseconds (None without samples)."""
    if not values:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None}
    arr = np.asarray(values) * 1e3
    return {f"p{q}_ms": float(np.percentile(arr, q)) for q in (50, 90, 99)}


def one_request(client, model: str, prompt: str, extra: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    """One streaming chat completion: TTFT, inter-chunk gaps, generated tokens, captured records."""
    start = time.perf_counter()
    first: float | None = None
    last: float | None = None
    gaps: list[float] = []
    chunks = records = 0
    tokens: int | None = None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0.0,
        stream=True, stream_options={"include_usage": True}, extra_body={**extra, "ignore_eos": True})
    with stream:
        for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                records += len((choice.delta.model_extra or {}).get("attention_tokens") or [])
                if not choice.delta.content:
                    continue
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
                chunks += 1
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "gaps": gaps, "tokens": tokens if tokens is not None else chunks,
            "content_chunks": chunks, "records": records, "latency": end - start}


def run_config(base_url: str, model: str, extra: dict[str, Any], clients: int, per_client: int,
               max_tokens: int) -> dict[str, Any]:
    """``clients`` threads × ``per_client`` sequential streaming requests; the summary of one configuration."""
    import openai

    sdk_clients = [openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=300) for _ in range(clients)]
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def worker(index: int) -> None:
        barrier.wait()
        for r in range(per_client):
            prompt = PROMPTS[(index + r * clients) % len(PROMPTS)]
            try:
                out = one_request(sdk_clients[index], model, prompt, extra, max_tokens)
            except Exception as exc:  # noqa: BLE001 - reported in the JSON
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                results.append(out)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for c in sdk_clients:
        c.close()
    return {"results": results, "errors": errors, "wall": wall}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration over all its rounds: throughput = all tokens / all wall time; pooled percentiles."""
    results = [r for run in runs for r in run["results"]]
    errors = [e for run in runs for e in run["errors"]]
    wall = sum(run["wall"] for run in runs)
    tokens = sum(r["tokens"] for r in results)
    chunks = sum(r["content_chunks"] for r in results)
    return {
        "rounds": len(runs),
        "requests": len(results),
        "errors": errors,
        "generated_tokens": tokens,
        "wall_s": wall,
        "throughput_tok_s": tokens / wall if wall > 0 else None,
        "ttft": percentiles([r["ttft"] for r in results]),
        "itl": percentiles([g for r in results for g in r["gaps"]]),
        "tokens_per_content_chunk": tokens / chunks if chunks else None,
        "attention_records": sum(r["records"] for r in results),
        "mean_request_latency_s": float(np.mean([r["latency"] for r in results])) if results else None,
    }


def ratios(config: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float | None]:
    """This configuration's numbers divided by capture off's."""
    def div(a, b):
        return a / b if a is not None and b else None

    out = {"throughput": div(config["throughput_tok_s"], baseline["throughput_tok_s"])}
    for metric in ("ttft", "itl"):
        for q in ("p50_ms", "p90_ms", "p99_ms"):
            out[f"{metric}_{q.removesuffix('_ms')}"] = div(config[metric][q], baseline[metric][q])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent streaming clients (default 8)")
    parser.add_argument("--requests-per-client", type=int, default=2, help="sequential requests per client (default 2)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (default 32)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster (default 2)")
    parser.add_argument("--engine-threads", type=int, default=2, help="torch threads of the engine (default 2)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="measured rounds over the configurations, order reversed every other round (default 2)")
    parser.add_argument("--json", default=None, help="also write the JSON result to this path")
    args = parser.parse_args()

    import openai
    import ray
    import torch
    from ray import serve

    from attnscope.deployments.application import build_app

    # Ray prints some of its own messages on stdout: send fd 1 to stderr while Ray runs, keep stdout for the JSON.
    sys.stdout.flush()
    saved_stdout = os.dup(1)
    os.dup2(2, 1)
    log(f"ray.init(num_cpus={args.num_cpus})")
    ray.init(num_cpus=args.num_cpus, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        base_url = f"http://127.0.0.1:{port}/v1"
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        engine = {"device": "cpu", "engine_num_cpus": 1.0, "num_threads": args.engine_threads, "num_kv_blocks": 256}
        t0 = time.perf_counter()
        serve.run(build_app(engine), name="serve_load", route_prefix="/")
        log(f"app up at {base_url} in {time.perf_counter() - t0:.1f}s")
        probe = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=300)
        model = probe.models.list().data[0].id

        for name, extra in CONFIGS.items():  # warm-up, not measured: every config at full concurrency
            log(f"warm-up {name}")
            run_config(base_url, model, extra, args.clients, 1, 8)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
        for round_index in range(args.rounds):
            order = list(CONFIGS) if round_index % 2 == 0 else list(reversed(CONFIGS))
            for name in order:
                log(f"round {round_index + 1}/{args.rounds} {name}: {args.clients} clients × "
                    f"{args.requests_per_client} requests × {args.max_tokens} tokens")
                run = run_config(base_url, model, CONFIGS[name], args.clients, args.requests_per_client, args.max_tokens)
                runs[name].append(run)
                c = summarize([run])
                log(f"  {c['throughput_tok_s']:.1f} tok/s, TTFT p50 {c['ttft']['p50_ms']:.0f} ms, "
                    f"ITL p50 {c['itl']['p50_ms']:.0f} ms, {len(c['errors'])} errors")
        configs = {name: summarize(r) for name, r in runs.items()}
        probe.close()
    finally:
        serve.shutdown()
        ray.shutdown()
        log("serve and ray shut down")
        sys.stdout.flush()
        os.dup2(saved_stdout, 1)
        os.close(saved_stdout)

    result = {
        "benchmark": "serve_load",
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "model": model,
        "transport": "HTTP loopback, Ray Serve proxy → OpenAIIngress → EngineDeployment, openai SDK streaming",
        "clients": args.clients,
        "requests_per_client": args.requests_per_client,
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "ignore_eos": True,
        "ray_num_cpus": args.num_cpus,
        "engine_threads": args.engine_threads,
        "capture_fields": CONFIGS,
        "configs": configs,
        "ratios_vs_off": {name: ratios(c, configs["off"]) for name, c in configs.items() if name != "off"},
    }
    emit(result, args.json)


if __name__ == "__main__":
    main()
