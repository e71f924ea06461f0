"""attnscope.deployments: the Ray Serve application (OpenAI ingress + engine) and the CLI.

``app`` is the application built from the defaults and ``ATTNSCOPE_<FIELD>`` environment
variables (``serve run attnscope.deployments:app``), built on first access so importing
the package (the CLI does) costs nothing; ``build_app`` is the builder for Serve configs
and ``key=value`` arguments.
"""

from typing import Any

from attnscope.deployments.application import AppArgs, build_app

__all__ = ["AppArgs", "app", "build_app"]


def __getattr__(name: str) -> Any:
    """Build ``app`` from the environment when Serve (or anyone) first asks for it."""
    if name == "app":
        return build_app(AppArgs.from_env().model_dump())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
