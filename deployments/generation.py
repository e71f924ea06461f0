"""One request's trip through the engine deployment, answered as an OpenAI response or SSE stream.

``open_call`` starts the engine's streaming call and waits for its verdict, so a request
the engine refuses gets HTTP 400 before any response starts. ``EngineCall.close`` cancels
the call (the engine then aborts the request and frees its KV blocks) and runs the
release hook (the capture slot); it runs when the request completes, fails or its client
disconnects. ``Formatter`` turns engine outputs into chat or text-completion shapes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.responses import Response, StreamingResponse

from attnscope.deployments.errors import ENGINE_LOST, ApiError
from attnscope.deployments.messages import EngineOutput, EngineRejected, EngineRequest, parse_event
from attnscope.protocol import (
    ChoiceDelta,
    ErrorDetail,
    ErrorResponse,
    UsageCounts,
    chat_chunk,
    chat_response,
    chat_role_chunk,
    chat_usage_chunk,
    completion_chunk,
    completion_response,
    completion_usage_chunk,
    merge_deltas,
)

logger = logging.getLogger("ray.serve")

# The engine names some fields by its own parameters; clients know them by their wire names.
_ENGINE_FIELDS = {"prompt_token_ids": "prompt", "capture.mode": "attn_capture"}


@dataclass
class EngineCall:
    """A request queued in the engine deployment: its event stream and what to release when it ends."""

    events: DeploymentResponseGenerator
    on_close: Callable[[], None]
    closed: bool = False

    async def outputs(self) -> AsyncIterator[EngineOutput]:
        """The request's outputs until it finishes."""
        async for data in self.events:
            event = parse_event(data)
            if isinstance(event, EngineOutput):
                yield event

    def close(self) -> None:
        """Cancel the engine call (a no-op once it finished) and release; idempotent."""
        if not self.closed:
            self.closed = True
            self.events.cancel()
            self.on_close()


async def open_call(engine: DeploymentHandle, request: EngineRequest, on_close: Callable[[], None]) -> EngineCall:
    """Queue ``request`` in the engine; ``ApiError`` 400 (nothing queued, released) when the engine refuses it."""
    call = EngineCall(engine.options(stream=True).generate.remote(request), on_close)
    try:
        event = parse_event(await call.events.__anext__())
    except BaseException:
        call.close()
        raise
    if isinstance(event, EngineRejected):
        call.close()
        param = _ENGINE_FIELDS.get(event.field or "", event.field)
        raise ApiError(400, event.message, param, "invalid_value")
    return call


@dataclass
class Formatter:
    """Builds one request's responses in the chat or text-completion shape."""

    kind: Literal["chat", "completion"]
    rid: str
    created: int
    model: str
    n: int
    include_usage: bool
    _offsets: dict[int, int] = field(default_factory=dict)

    def whole(self, outputs: list[EngineOutput]) -> BaseModel:
        """The non-streaming response from all of a request's outputs."""
        choices = merge_deltas([d for out in outputs for d in out.deltas], self.n)
        build = chat_response if self.kind == "chat" else completion_response
        return build(self.rid, self.created, self.model, choices, outputs[-1].usage)

    def opening(self) -> list[BaseModel]:
        """Chunks sent before any token: the assistant role per chat choice."""
        if self.kind != "chat":
            return []
        return [chat_role_chunk(self.rid, self.created, self.model, i) for i in range(self.n)]

    def chunk(self, delta: ChoiceDelta) -> BaseModel:
        """One streamed delta."""
        if self.kind == "chat":
            return chat_chunk(self.rid, self.created, self.model, delta)
        offset = self._offsets.get(delta.index, 0)
        self._offsets[delta.index] = offset + len(delta.text)
        return completion_chunk(self.rid, self.created, self.model, delta, offset)

    def usage_chunk(self, counts: UsageCounts) -> BaseModel:
        """The closing usage chunk."""
        build = chat_usage_chunk if self.kind == "chat" else completion_usage_chunk
        return build(self.rid, self.created, self.model, counts)


async def respond(call: EngineCall, fmt: Formatter, stream: bool) -> Response:
    """The HTTP response for an accepted request; the call is closed whatever happens."""
    if stream:
        events = _sse(call, fmt)
        first = await events.__anext__()  # started, so its cleanup runs even if the body is never sent
        return StreamingResponse(_prepend(first, events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        outputs = [out async for out in call.outputs()]
    finally:
        call.close()
    return Response(fmt.whole(outputs).model_dump_json(), media_type="application/json")


def _event(chunk: BaseModel) -> str:
    """One server-sent event."""
    return f"data: {chunk.model_dump_json()}\n\n"


async def _sse(call: EngineCall, fmt: Formatter) -> AsyncIterator[str]:
    """The SSE body: opening chunks, a chunk per delta, the usage chunk, ``[DONE]``; errors as an error event."""
    try:
        for chunk in fmt.opening():
            yield _event(chunk)
        counts: UsageCounts | None = None
        async for out in call.outputs():
            for delta in out.deltas:
                yield _event(fmt.chunk(delta))
            counts = out.usage
        if fmt.include_usage and counts is not None:
            yield _event(fmt.usage_chunk(counts))
        yield "data: [DONE]\n\n"
    except RayActorError:
        logger.warning("stream %s lost its engine replica", fmt.rid)
        yield _event(ErrorResponse(error=ErrorDetail(message=ENGINE_LOST, type="server_error",
                                                     code="engine_unavailable")))
        yield "data: [DONE]\n\n"
    except Exception:
        logger.exception("stream %s failed", fmt.rid)
        yield _event(ErrorResponse(error=ErrorDetail(message="generation failed", type="internal_error")))
        yield "data: [DONE]\n\n"
    finally:
        call.close()


async def _prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """``first`` then the rest."""
    yield first
    async for item in rest:
        yield item
