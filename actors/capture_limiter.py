"""The cluster-wide count of open attention-capture sessions.

One named actor per Serve application (no CPU, not detached: it lives as long as the
ingress replica that created it; the others find it by name). Every ingress replica
acquires a slot before queuing a capture request and releases it when the request
completes, is aborted or its client disconnects, so ``--attention-max-concurrent-capture``
holds across replicas and nodes.
"""

from __future__ import annotations

import ray

NAMESPACE = "attnscope"


@ray.remote(num_cpus=0)
class CaptureLimiter:
    """Open capture sessions by id."""

    def __init__(self) -> None:
        self._sessions: set[str] = set()

    def acquire(self, session_id: str, limit: int) -> bool:
        """Open a session unless ``limit`` are open already; True when it is open (also when it was)."""
        if session_id in self._sessions:
            return True
        if len(self._sessions) >= limit:
            return False
        self._sessions.add(session_id)
        return True

    def release(self, session_id: str) -> None:
        """Close a session; unknown ids are ignored."""
        self._sessions.discard(session_id)

    def count(self) -> int:
        """How many sessions are open."""
        return len(self._sessions)


def limiter_handle(name: str) -> ray.actor.ActorHandle:
    """The limiter called ``name``, created here when it does not exist yet."""
    return CaptureLimiter.options(name=name, namespace=NAMESPACE, get_if_exists=True).remote()
