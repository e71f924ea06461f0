"""The Serve deployment that owns one ``LLMEngine`` and streams its outputs to the ingress.

Each replica loads the model once and runs the engine's step loop on a background
thread; ``generate`` is called through ``handle.options(stream=True)``. When the caller
goes away (the ingress cancels the call because its client disconnected), the request
is aborted in the engine and its KV blocks are freed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve

from attnscope.deployments.guardrails import system_prompt_length
from attnscope.deployments.messages import (
    EngineAccepted,
    EngineOutput,
    EngineRejected,
    EngineRequest,
    EngineStatsReport,
    ModelInfo,
)
from attnscope.engine.engine_config import EngineConfig
from attnscope.engine.llm_engine import InvalidRequestError, LLMEngine

MAX_ONGOING_REQUESTS = 1024


@serve.deployment(max_ongoing_requests=MAX_ONGOING_REQUESTS, health_check_period_s=10)
class EngineDeployment:
    """One inference engine per replica."""

    def __init__(self, config: EngineConfig) -> None:
        self.engine = LLMEngine(config)
        self.engine.start()

    def model_info(self) -> ModelInfo:
        """Shape and limits of the served model (for validation and the capabilities endpoint)."""
        c = self.engine.model_config
        return ModelInfo(num_layers=c.num_layers, num_heads=c.num_heads, max_model_len=self.engine.max_model_len,
                         max_full_capture_tokens=self.engine.config.max_full_capture_tokens,
                         think_segmentation=bool(self.engine.think_tags.start))

    async def generate(self, request: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        """Queue a request and yield its events: accepted (or rejected, nothing queued), then outputs."""
        try:
            self._add(request)
        except InvalidRequestError as exc:
            yield EngineRejected(message=str(exc), field=exc.field).model_dump()
            return
        finished = False
        try:
            yield EngineAccepted().model_dump()
            async for out in self.engine.stream(request.request_id):
                finished = out.finished
                yield EngineOutput.model_validate(out, from_attributes=True).model_dump()
        finally:
            if not finished:
                self.engine.abort(request.request_id)

    def _add(self, request: EngineRequest) -> None:
        """Tokenise, apply the system-prompt mask and the full-capture length fit, and queue."""
        ids = self.engine.tokenize_prompt(request.prompt, request.prompt_token_ids, request.messages)
        params, capture = request.params, request.capture
        if capture is not None and request.mask_system_prompt and request.messages:
            masked = system_prompt_length(self.engine.tokenizer, request.messages, len(ids))
            if masked > capture.mask_prefix:
                capture = capture.model_copy(update={"mask_prefix": masked})
        if capture is not None and capture.mode == "full" and not request.max_tokens_given:
            room = self.engine.config.max_full_capture_tokens - len(ids)
            params = params.model_copy(update={"max_tokens": max(1, min(params.max_tokens, room))})
        self.engine.add_request(prompt_token_ids=ids, params=params, capture=capture, request_id=request.request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks (unknown or finished ids are ignored)."""
        self.engine.abort(request_id)

    def stats(self) -> EngineStatsReport:
        """This replica's load: KV usage, running and waiting sequences, open capture sessions."""
        s = self.engine.stats()
        return EngineStatsReport(kv_usage=s.kv_usage, num_running=s.num_running, num_waiting=s.num_waiting,
                                 num_requests=s.num_requests, capture_sessions=s.capture_sessions,
                                 replica=serve.get_replica_context().replica_id.unique_id,
                                 node_id=ray.get_runtime_context().get_node_id())

    def check_health(self) -> None:
        """Serve's health check: unhealthy once the engine loop has failed or a rank worker is gone."""
        self.engine.check_health()
