"""Capture guardrails: who may capture, with which defaults, how many at once, and what stays hidden.

- API key: with ``attention_api_key`` set, a request that asks for capture must carry it
  (``Authorization: Bearer KEY`` or ``X-Attention-Api-Key: KEY``), else HTTP 401; plain
  generation is unaffected, and server-default capture is skipped for it.
- ``attention_disable_in_production``: capture requests get HTTP 400 naming the field.
- Server defaults (``return_attention_tokens``, top-k, layers, fingerprint/sketch mode)
  fill the capture fields a request leaves out; a request may override them.
- ``attention_max_concurrent_capture``: a cluster-wide limit kept by the
  ``CaptureLimiter`` deployment; over it, HTTP 429 with ``Retry-After``. Each ingress
  replica renews its lease there every ``attention_capture_lease_s / 3`` seconds, so the
  sessions of a replica that died are freed within ``attention_capture_lease_s``.
- ``attention_mask_system_prompt``: the mask covers the chat template's rendering of the
  leading system messages (a request may only ask for a larger mask).
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import itertools
import logging
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jinja2
from ray.exceptions import RayError
from ray.serve.handle import DeploymentHandle

from attnscope.capture import CaptureParams
from attnscope.deployments.errors import ApiError
from attnscope.deployments.messages import ModelInfo
from attnscope.protocol import SYSTEM_ROLES, RequestFieldError, capture_params

if TYPE_CHECKING:
    from attnscope.deployments.application import AppArgs
    from attnscope.engine.tokenizer import Tokenizer
    from attnscope.protocol import ChatCompletionRequest, CompletionRequest

MODE_FIELDS = ("attention_sketch_mode", "attention_fingerprint_mode", "attention_fingerprint_only")
RETRY_AFTER_S = 1

logger = logging.getLogger(__name__)


class Guardrails:
    """The capture policy of one ingress replica."""

    def __init__(self, args: AppArgs, limiter: DeploymentHandle | None) -> None:
        self.args = args
        self._limiter = limiter
        self._owner = uuid.uuid4().hex
        self._lease_task: asyncio.Task | None = None

    def capture_for(self, request: ChatCompletionRequest | CompletionRequest, headers: Mapping[str, str],
                    info: ModelInfo) -> CaptureParams | None:
        """The request's capture parameters under the server's policy, or None for no capture.

        Raises ``ApiError`` (400 when capture is disabled, 401 without the API key) or
        ``RequestFieldError`` (400) naming the field.
        """
        asked = request.capture_fields()
        field = _asking_field(asked)
        if self.args.attention_disable_in_production:
            if field is not None:
                raise ApiError(400, "attention capture is disabled on this server "
                                    "(attention_disable_in_production)", field, "capture_disabled")
            return None
        authorized = self._authorized(headers)
        if field is not None and not authorized:
            raise ApiError(401, "attention capture needs the server's API key "
                                "(Authorization: Bearer KEY or X-Attention-Api-Key: KEY)", field, "invalid_api_key")
        capture = capture_params(self._with_defaults(asked) if authorized else asked, info.num_layers)
        if capture is None:
            return None
        full = capture.mode == "full"
        try:
            capture.resolve_layers(info.num_layers)
        except ValueError as exc:
            raise RequestFieldError(str(exc), "attn_capture_layers" if full else "attention_capture_layers") from exc
        try:
            capture.check_heads(info.num_heads)
        except ValueError as exc:
            raise RequestFieldError(str(exc), "attention_capture_head_ids") from exc
        if full and (request.n or 1) > 1:
            raise RequestFieldError("attn_capture returns one set of matrices per request: use n = 1", "n")
        return capture

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        """True when no key is configured or the request carries it."""
        key = self.args.attention_api_key
        if key is None:
            return True
        bearer = headers.get("authorization", "")
        candidates = [headers.get("x-attention-api-key", ""), bearer[7:].strip() if bearer.lower().startswith("bearer ") else ""]
        return any(hmac.compare_digest(c.encode(), key.encode()) for c in candidates if c)

    def _with_defaults(self, asked: dict[str, Any]) -> dict[str, Any]:
        """The request's capture fields with the server's defaults for those it left out."""
        a = self.args
        fields = dict(asked)
        if a.return_attention_tokens:
            fields.setdefault("return_attention_tokens", True)
        fields.setdefault("top_k_attention", a.attention_tokens_top_k)
        fields.setdefault("attention_capture_layers", a.attention_capture_layers)
        fields.setdefault("attn_capture_layers", a.attention_capture_layers)
        if not any(k in asked for k in MODE_FIELDS):
            if a.attention_fingerprint_mode:
                fields["attention_fingerprint_mode"] = True
            elif a.attention_sketch_mode:
                fields["attention_sketch_mode"] = True
        return fields

    async def acquire(self, session_id: str) -> None:
        """Open a capture session under the cluster-wide limit; ``ApiError`` 429 when it is reached."""
        limit = self.args.attention_max_concurrent_capture
        if limit is None or self._limiter is None:
            return
        if self._lease_task is None:
            self._lease_task = asyncio.get_running_loop().create_task(self._keep_lease())
        if not await self._limiter.acquire.remote(session_id, self._owner, limit):
            raise ApiError(429, f"too many concurrent attention-capture sessions (limit {limit}); retry later",
                           None, "capture_limit_exceeded", {"Retry-After": str(RETRY_AFTER_S)})

    def release(self, session_id: str) -> None:
        """Close a capture session (fire and forget: it runs from cancelled tasks too).

        The call is made outside the request's context: Serve cancels the child calls a
        cancelled request still has pending, and a client that disconnects must still free
        its slot.
        """
        if self._limiter is not None:
            contextvars.Context().run(self._limiter.release.remote, session_id)

    async def _keep_lease(self) -> None:
        """Renew this replica's lease on its capture sessions for as long as the replica lives."""
        while True:
            await asyncio.sleep(self.args.attention_capture_lease_s / 3)
            try:
                await self._limiter.renew.remote(self._owner)
            except RayError as exc:  # the limiter is restarting; the next renewal reaches the new one
                logger.warning("capture lease renewal failed: %s", exc)


def _asking_field(fields: dict[str, Any]) -> str | None:
    """The wire field with which a request asks for capture, if it does."""
    if fields.get("attn_capture"):
        return "attn_capture"
    if fields.get("return_attention_tokens"):
        return "return_attention_tokens"
    return None


def system_prompt_length(tokenizer: Tokenizer, messages: list[dict[str, str]], prompt_len: int) -> int:
    """Tokens of the chat template's rendering of the leading system messages (0 when there are none).

    A template that cannot render the system messages alone gets the whole prompt
    masked: hiding too much is the safe side.
    """
    lead = list(itertools.takewhile(lambda m: m["role"] in SYSTEM_ROLES, messages))
    if not lead:
        return 0
    try:
        text = tokenizer.apply_chat_template(lead, add_generation_prompt=False)
    except (ValueError, jinja2.TemplateError):
        return prompt_len
    return min(len(tokenizer.encode(text, add_special_tokens=False)), prompt_len)
