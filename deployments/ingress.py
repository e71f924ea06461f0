"""The OpenAI-compatible HTTP ingress (FastAPI on Ray Serve) with attention capture and its guardrails.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streaming and not),
``GET /v1/models``, ``GET /v1/attention/capabilities``, ``GET /health``, and FastAPI's
``/openapi.json`` and ``/docs``. Every request is validated completely (body, model,
capture policy, the engine's own checks) before it runs; refusals are OpenAI-style
error bodies with the field to blame (400, 401, 404, 429 with ``Retry-After``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from ray import serve
from ray.exceptions import RayActorError, TaskCancelledError
from ray.serve.handle import DeploymentHandle
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from attnscope import __version__
from attnscope.capture import MAX_TOP_K
from attnscope.deployments.errors import ApiError, install_error_handlers
from attnscope.deployments.generation import Formatter, open_call, respond
from attnscope.deployments.guardrails import Guardrails
from attnscope.deployments.messages import EngineRequest, EngineStatsReport, ModelInfo
from attnscope.protocol import (
    Capabilities,
    CaptureDefaults,
    CaptureFeatures,
    CaptureGuardrails,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    now,
)

if TYPE_CHECKING:
    from attnscope.deployments.application import AppArgs

MAX_ONGOING_REQUESTS = 1024
ENGINE_ATTEMPTS = 2  # a request whose engine replica dies before anything was sent is retried once

logger = logging.getLogger("ray.serve")


@serve.deployment(max_ongoing_requests=MAX_ONGOING_REQUESTS, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class OpenAIIngress:
    """Validates, applies the guardrails, and relays requests to the engine deployment.

    No CPU is reserved: the ingress waits on I/O and leaves the cores to the engine.
    """

    def __init__(self, args: AppArgs, engine: DeploymentHandle, limiter: DeploymentHandle | None = None) -> None:
        self.args = args
        self.engine = engine
        self.model_name = args.model_name()
        self.created = now()
        self.guardrails = Guardrails(args, limiter)
        self._info: ModelInfo | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The FastAPI app, built per replica so CORS follows this application's settings."""
        return create_api(self)

    async def model_info(self) -> ModelInfo:
        """The served model's shape and limits (asked of the engine once)."""
        if self._info is None:
            self._info = await self.engine.model_info.remote()
        return self._info

    async def generate(self, body: ChatCompletionRequest | CompletionRequest, headers: Mapping[str, str]) -> Response:
        """Validate everything, take a capture slot if needed, queue in the engine, and answer."""
        if body.model is not None and body.model != self.model_name:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server serves {self.model_name!r}",
                           "model", "model_not_found")
        info = await self.model_info()
        params = body.sampling_params(default_max_tokens=info.max_model_len)
        capture = self.guardrails.capture_for(body, headers, info)
        chat = isinstance(body, ChatCompletionRequest)
        prompt = {"messages": body.engine_messages()} if chat else body.engine_prompt()
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        request = EngineRequest(request_id=rid, **prompt, params=params,
                                max_tokens_given=body.max_tokens_requested() is not None, capture=capture,
                                mask_system_prompt=self.args.attention_mask_system_prompt)
        fmt = Formatter("chat" if chat else "completion", rid, now(), self.model_name, params.n, body.wants_usage_chunk())
        attempts_left = ENGINE_ATTEMPTS
        while True:
            try:
                return await self._answer(request, fmt, bool(body.stream))
            except RayActorError:  # the engine replica died before anything reached the client
                attempts_left -= 1
                if not attempts_left:
                    raise
                logger.warning("engine replica lost before %s was answered; retrying on another replica", rid)

    async def _answer(self, request: EngineRequest, fmt: Formatter, stream: bool) -> Response:
        """Take a capture slot if needed, queue in the engine, and answer (the slot is released when it ends)."""
        rid = request.request_id
        release = (lambda: self.guardrails.release(rid)) if request.capture is not None else (lambda: None)
        try:  # a refusal or a disconnect before the call exists must not keep the capture slot
            if request.capture is not None:
                await self.guardrails.acquire(rid)
            call = await open_call(self.engine, request, release)
        except BaseException:
            release()
            raise
        return await respond(call, fmt, stream)

    async def capabilities(self) -> Capabilities:
        """What capture this server supports now, under which guardrails and defaults."""
        a = self.args
        info = await self.model_info()
        mode = "fingerprint" if a.attention_fingerprint_mode else "sketch" if a.attention_sketch_mode else "raw"
        return Capabilities(
            supported=not a.attention_disable_in_production,
            modes=["raw", "sketch", "fingerprint"],
            max_top_k=MAX_TOP_K,
            max_layers=info.num_layers,
            max_heads=info.num_heads,
            max_full_capture_tokens=info.max_full_capture_tokens,
            features=CaptureFeatures(include_prompt_attention=True, head_filtering=True, derotated_scores=True,
                                     think_segmentation=info.think_segmentation, full_matrix=True),
            guardrails=CaptureGuardrails(max_concurrent_capture=a.attention_max_concurrent_capture,
                                         requires_api_key=a.attention_api_key is not None,
                                         system_prompt_masked=a.attention_mask_system_prompt,
                                         disabled_in_production=a.attention_disable_in_production),
            defaults=CaptureDefaults(return_attention_tokens=a.return_attention_tokens,
                                     top_k_attention=a.attention_tokens_top_k,
                                     attention_capture_layers=a.attention_capture_layers, mode=mode),
        )

    async def models(self) -> ModelList:
        """The one served model."""
        info = await self.model_info()
        return ModelList(data=[ModelCard(id=self.model_name, created=self.created, max_model_len=info.max_model_len)])

    async def health(self) -> EngineStatsReport:
        """The engine's load; HTTP 503 when the engine does not answer."""
        try:
            return await self.engine.stats.remote()
        except Exception as exc:
            raise ApiError(503, "the engine is unavailable", type="server_error", code="engine_unavailable") from exc


_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 429)}


class DisconnectAsMessage:
    """ASGI adapter: Serve's ``receive()`` raises ``TaskCancelledError`` once the client is gone;
    Starlette expects an ``http.disconnect`` message (and then cancels the streaming body)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app with a ``receive`` that reports cancellation as a disconnect."""
        async def receive_or_disconnect() -> Message:
            try:
                return await receive()
            except TaskCancelledError:
                return {"type": "http.disconnect"}

        await self.app(scope, receive_or_disconnect, send)


def create_api(service: OpenAIIngress) -> FastAPI:
    """The FastAPI app of one ingress replica: routes, CORS, OpenAI-style errors."""
    app = FastAPI(title="attnscope", version=__version__,
                  description="OpenAI-compatible LLM serving with exact per-request attention capture.")
    app.add_middleware(CORSMiddleware, allow_origins=service.args.attention_cors_origins, allow_methods=["*"],
                       allow_headers=["*"], expose_headers=["Retry-After"])
    app.add_middleware(DisconnectAsMessage)
    install_error_handlers(app)

    @app.post("/v1/chat/completions", responses={
        200: {"model": ChatCompletionResponse,
              "description": f"JSON, or with stream: true server-sent {ChatCompletionChunk.__name__} events."},
        **_ERRORS})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """Chat completion, optionally streamed, with attention capture."""
        return await service.generate(body, request.headers)

    @app.post("/v1/completions", responses={200: {"model": CompletionResponse}, **_ERRORS})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Text completion, optionally streamed, with attention capture."""
        return await service.generate(body, request.headers)

    @app.get("/v1/models")
    async def models() -> ModelList:
        """The served model."""
        return await service.models()

    @app.get("/v1/attention/capabilities")
    async def capabilities() -> Capabilities:
        """Capture modes, limits, features and guardrails of this server."""
        return await service.capabilities()

    @app.get("/health")
    async def health() -> EngineStatsReport:
        """Liveness: the engine answers, with its load."""
        return await service.health()

    return app
