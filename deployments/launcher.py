"""``attnscope serve``: a local Ray cluster, Serve on the given port, the app, until Ctrl-C."""

from __future__ import annotations

import signal
import sys

import ray
from ray import serve

from attnscope.deployments.application import AppArgs, build_app

APP_NAME = "attnscope"


def serve_until_interrupted(args: AppArgs, num_cpus: int, dashboard: bool) -> None:
    """Start Ray (``num_cpus`` CPUs) and Serve, deploy the app, print where it is, block until Ctrl-C or SIGTERM.

    ``dashboard``: start the Ray dashboard when its dependencies are installed.
    """
    context = ray.init(num_cpus=num_cpus, include_dashboard=None if dashboard else False, dashboard_host="127.0.0.1")
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(args.model_dump()), name=APP_NAME, route_prefix="/")
        _print_urls(args, context.dashboard_url)
        stop = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        signal.sigwait(stop)
    finally:
        serve.shutdown()
        ray.shutdown()


def _print_urls(args: AppArgs, dashboard_url: str | None) -> None:
    """Where the server answers."""
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    base = f"http://{host}:{args.port}"
    lines = [
        f"[attnscope] serving {args.model_name()}",
        f"  OpenAI API base   {base}/v1",
        f"  API docs          {base}/docs",
        f"  capabilities      {base}/v1/attention/capabilities",
    ]
    if dashboard_url:
        lines.append(f"  Ray dashboard     http://{dashboard_url}")
    lines.append("  Ctrl-C to stop")
    print("\n".join(lines), file=sys.stderr, flush=True)
