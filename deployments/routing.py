"""Replica routing for the engine deployment: prefer the replica that holds a request's prompt prefix.

A Serve ``RequestRouter`` (alpha API) running inside each ingress replica's deployment
handle. For a generation request it tries, longest first, the request's prompt prefixes
of ``PREFIX_CHARS`` characters (rendered chat messages, the prompt text, or the token ids);
if a live replica served one of them recently and its queue is at most ``max_imbalance``
requests longer than the shortest, that replica is ranked first, so its prefix cache is
reused. Every other replica follows, and Serve's probing then picks the one with the
shortest queue: the least loaded. Other calls (stats, abort, model info) have no prefix
and go to the least loaded replica. The prefix table remembers the last
``max_prefixes`` prefixes (least recently used dropped).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

from attnscope.deployments.messages import EngineRequest

PREFIX_CHARS = (4096, 1024, 256)


def prefix_keys(request: EngineRequest) -> list[str]:
    """Digests of the request's prompt prefixes, longest first (only lengths the prompt reaches)."""
    if request.messages is not None:
        text = json.dumps(request.messages, separators=(",", ":"))
    elif request.prompt is not None:
        text = request.prompt
    else:
        text = ",".join(map(str, request.prompt_token_ids or []))
    return [hashlib.blake2b(text[:n].encode(), digest_size=12).hexdigest() for n in PREFIX_CHARS if len(text) >= n]


class PrefixAffinityRouter(RequestRouter):
    """Prefix-cache affinity first, least loaded otherwise."""

    def initialize_state(self, max_prefixes: int = 100_000, max_imbalance: int = 8) -> None:
        """Settings from ``request_router_kwargs``."""
        self._owners: OrderedDict[str, ReplicaID] = OrderedDict()
        self._max_prefixes = max_prefixes
        self._max_imbalance = max_imbalance

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """The prefix owner first (when not overloaded), then every candidate; Serve takes the shortest queue."""
        owner = self._owner(candidate_replicas, pending_request)
        if owner is None:
            return [candidate_replicas]
        return [[owner], [r for r in candidate_replicas if r.replica_id != owner.replica_id]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        """Remember which replica now holds the request's prefixes."""
        for key in _keys(pending_request):
            self._owners[key] = replica_id
            self._owners.move_to_end(key)
        while len(self._owners) > self._max_prefixes:
            self._owners.popitem(last=False)

    def _owner(self, candidates: list[RunningReplica], pending_request: PendingRequest | None) -> RunningReplica | None:
        """The live, not overloaded candidate that served the longest of the request's prefixes."""
        by_id = {r.replica_id: r for r in candidates}
        for key in _keys(pending_request):
            replica = by_id.get(self._owners.get(key))
            if replica is None:
                continue
            lengths = [self._queue_len(r) for r in candidates]
            if self._queue_len(replica) - min(lengths) <= self._max_imbalance:
                return replica
            return None
        return None

    def _queue_len(self, replica: RunningReplica) -> int:
        """The replica's last known queue length (0 when not probed yet)."""
        return self._replica_queue_len_cache.get(replica.replica_id) or 0


def _keys(pending_request: PendingRequest | None) -> list[str]:
    """Prefix digests of a generation request; none for other calls."""
    if pending_request is None or not pending_request.args or not isinstance(pending_request.args[0], EngineRequest):
        return []
    return prefix_keys(pending_request.args[0])
