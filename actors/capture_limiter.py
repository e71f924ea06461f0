"""The cluster-wide count of open attention-capture sessions, kept under leases.

A Serve deployment of one replica that reserves no CPU, bound into the application when
``attention_max_concurrent_capture`` is set: Serve restarts it if it dies and removes it
with the application, so it never shares the fate of one ingress replica. Every ingress
replica (an *owner*) acquires a slot before queuing a capture request and releases it
when the request completes, is aborted or its client disconnects, so the limit holds
across replicas and nodes.

An ingress replica that dies cannot release its sessions, so each owner renews a lease
(every ``lease_s / 3`` seconds while it runs); the sessions of an owner whose lease has
lapsed are dropped the next time anyone asks. A crashed ingress replica therefore holds
its slots for at most ``lease_s`` seconds. A restarted limiter starts from zero.
"""

from __future__ import annotations

import time

from ray import serve


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
class CaptureLimiter:
    """Open capture sessions by id, each held by the ingress replica that opened it."""

    def __init__(self, lease_s: float) -> None:
        self.lease_s = lease_s
        self._owner_of: dict[str, str] = {}
        self._renewed_at: dict[str, float] = {}

    def acquire(self, session_id: str, owner: str, limit: int) -> bool:
        """Open a session for ``owner`` unless ``limit`` are open; True when it is open (also when it was).

        Also renews the owner's lease.
        """
        self.renew(owner)
        if session_id in self._owner_of:
            return True
        self._expire()
        if len(self._owner_of) >= limit:
            return False
        self._owner_of[session_id] = owner
        return True

    def release(self, session_id: str) -> None:
        """Close a session; unknown ids are ignored."""
        self._owner_of.pop(session_id, None)

    def renew(self, owner: str) -> None:
        """Extend ``owner``'s lease by ``lease_s`` from now."""
        self._renewed_at[owner] = time.monotonic()

    def count(self) -> int:
        """How many sessions are open (lapsed leases dropped first)."""
        self._expire()
        return len(self._owner_of)

    def _expire(self) -> None:
        """Drop the sessions of owners that have not renewed within ``lease_s``."""
        now = time.monotonic()
        lapsed = {owner for owner, at in self._renewed_at.items() if now - at > self.lease_s}
        if lapsed:
            self._owner_of = {s: o for s, o in self._owner_of.items() if o not in lapsed}
            for owner in lapsed:
                del self._renewed_at[owner]
