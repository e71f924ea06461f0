"""The OpenAI-compatible wire protocol with attention capture: request bodies in, responses out.

Requests (``ChatCompletionRequest``, ``CompletionRequest``) accept the OpenAI fields and
the capture fields of both reference families (SGLang: ``return_attention_tokens``, …;
vLLM: ``attn_capture``, ``attn_capture_layers``). They turn into the engine's
``SamplingParams`` and, through ``CaptureParams.from_wire``, ``CaptureParams``; an invalid
value raises ``RequestFieldError`` naming the field as the client spelled it. Fields that
OpenAI clients commonly send but this server does not use are ignored.

Responses and stream chunks are built from ``ChoiceDelta`` (what one choice produced)
by the ``chat_*``/``completion_*`` builders, in OpenAI's shapes plus
``attention_tokens`` per choice and the vLLM family's top-level ``attn_capture_data``.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

from attnscope.capture import CaptureFieldError, CaptureParams
from attnscope.deltas import merge_delta
from attnscope.sampling import SamplingParams


class RequestFieldError(ValueError):
    """An invalid request value; ``field`` is its name on the wire."""

    def __init__(self, message: str, field: str | None) -> None:
        super().__init__(message)
        self.field = field


# --------------------------------------------------------------------------- requests

CAPTURE_FIELDS = (
    "return_attention_tokens", "top_k_attention", "attention_capture_layers", "attention_capture_head_ids",
    "attention_sketch_mode", "attention_fingerprint_mode", "attention_fingerprint_only", "attention_mask_prefix",
    "attention_tokens_stride", "attention_tokens_max", "attention_tokens_window", "include_prompt_attention",
    "attention_sink_tokens", "attention_fingerprint_max_steps", "attention_derotate",
    "attn_capture", "attn_capture_layers",
)


def capture_params(fields: dict[str, Any], num_layers: int) -> CaptureParams | None:
    """``CaptureParams`` from capture wire fields (a request's, merged with server defaults), or None.

    The vLLM family's ``attn_capture_layers: "all"`` becomes every layer of the model.
    """
    if str(fields.get("attn_capture_layers", "")).strip().lower() == "all":
        fields = {**fields, "attn_capture_layers": list(range(num_layers))}
    try:
        return CaptureParams.from_wire(fields)
    except CaptureFieldError as exc:
        raise RequestFieldError(str(exc), exc.field) from exc


class StreamOptions(BaseModel):
    """OpenAI ``stream_options``."""

    model_config = ConfigDict(extra="ignore")

    include_usage: bool = Field(False, description="Send a last chunk with the token usage.")


class _GenerationRequest(BaseModel):
    """Fields shared by chat and text completions: sampling, streaming and attention capture."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="The served model's name (GET /v1/models).")
    max_tokens: int | None = Field(None, description="Most tokens to generate (default: until the context is full).")
    temperature: float | None = Field(None, description="0 means greedy (default 1).")
    top_p: float | None = Field(None, description="Nucleus mass kept, in (0, 1].")
    top_k: int | None = Field(None, description="Keep the k most likely tokens; 0 or -1 keeps all.")
    min_p: float | None = Field(None, description="Drop tokens below min_p times the top probability.")
    n: int | None = Field(None, description="Number of completions (default 1).")
    stop: str | list[str] | None = Field(None, description="Stop strings (not included in the output).")
    stop_token_ids: list[int] | None = Field(None, description="Token ids that end a completion.")
    ignore_eos: bool | None = Field(None, description="Keep generating past end-of-sequence tokens.")
    seed: int | None = Field(None, description="Same seed, same tokens.")
    stream: bool | None = Field(None, description="Stream server-sent events.")
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, description="In [-2, 2].")
    frequency_penalty: float | None = Field(None, description="In [-2, 2].")
    repetition_penalty: float | None = Field(None, description="In (0, 10]; 1 = off.")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported; only an empty map is accepted.")
    user: str | None = Field(None, description="Ignored.")

    return_attention_tokens: bool | None = Field(None, description="SGLang family: capture attention (raw top-k by default).")
    top_k_attention: int | None = Field(None, description="Positions per captured row in raw mode (1..64).")
    attention_capture_layers: str | list[int] | None = Field(None, description="'last', 'auto' or layer ids ('3,7' or [3, 7]).")
    attention_capture_head_ids: list[int] | str | None = Field(None, description="Average only these query heads.")
    attention_sketch_mode: bool | None = Field(None, description="Per-layer sketches instead of raw top-k.")
    attention_fingerprint_mode: bool | None = Field(None, description="20-float fingerprints instead of raw top-k.")
    attention_fingerprint_only: bool | None = Field(None, description="Same as attention_fingerprint_mode.")
    attention_mask_prefix: int | None = Field(None, description="Hide positions < n; report the rest as position - n.")
    attention_tokens_stride: int | None = Field(None, description="Capture every Nth decode step.")
    attention_tokens_max: int | None = Field(None, description="Capture at most this many decode steps.")
    attention_tokens_window: int | None = Field(None, description="Top-k candidates only among the last W positions.")
    include_prompt_attention: bool | None = Field(None, description="Also capture every prompt token's attention.")
    attention_sink_tokens: int | None = Field(None, description="Leading positions reported as sink_mass.")
    attention_fingerprint_max_steps: int | None = Field(None, description="Fingerprint mode: stop after N steps (0 = never).")
    attention_derotate: bool | None = Field(None, description="Capture on q·k with RoPE removed.")
    attn_capture: Literal[0, 1] | bool | None = Field(None, description="vLLM family: 1 = full [T, heads, T] matrices.")
    attn_capture_layers: str | list[int] | None = Field(None, description="vLLM family: layer ids ('2,18' or 'all').")

    def capture_fields(self) -> dict[str, Any]:
        """The capture fields the client set, as sent (for ``CaptureParams.from_wire`` after server defaults)."""
        return {k: v for k in CAPTURE_FIELDS if (v := getattr(self, k)) is not None}

    def wants_usage_chunk(self) -> bool:
        """True when a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """The engine's ``SamplingParams``; ``default_max_tokens`` when the client gave no limit."""
        if self.logit_bias:
            raise RequestFieldError("logit_bias is not supported", "logit_bias")
        max_tokens = self.max_tokens_requested()
        values: dict[str, Any] = {
            "max_tokens": default_max_tokens if max_tokens is None else max_tokens,
            "temperature": self.temperature, "top_p": self.top_p,
            "top_k": 0 if self.top_k == -1 else self.top_k, "min_p": self.min_p, "n": self.n,
            "stop": self.stop, "stop_token_ids": self.stop_token_ids, "ignore_eos": self.ignore_eos,
            "seed": self.seed, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty, "repetition_penalty": self.repetition_penalty,
            "logprobs": self._logprobs(),
        }
        try:
            return SamplingParams(**{k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            err = exc.errors()[0]
            name = str(err["loc"][0]) if err["loc"] else None
            wire = self._wire_names().get(name, name)
            raise RequestFieldError(f"invalid {wire}: {err['msg']}", wire) from exc

    def max_tokens_requested(self) -> int | None:
        """The client's output limit, None when it set none."""
        return self.max_tokens

    @abstractmethod
    def _logprobs(self) -> int | None:
        """Top-N logprobs asked for, None for none."""

    def _wire_names(self) -> dict[str, str]:
        """Wire names of ``SamplingParams`` fields that differ in this request type."""
        return {}


class ChatMessage(BaseModel):
    """One chat message; content as a string or OpenAI's list of text parts."""

    model_config = ConfigDict(extra="ignore")

    role: str = Field(description="system, developer, user, assistant or tool.")
    content: str | list[dict[str, Any]] | None = Field(None, description="Text, or a list of {type: 'text', text} parts.")

    def text(self) -> str:
        """The content as one string; only text parts are supported."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content part of type {part.get('type')!r} is not supported (text only)")
            parts.append(part["text"])
        return "".join(parts)


SYSTEM_ROLES = frozenset({"system", "developer"})


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_completion_tokens: int | None = Field(None, description="Newer name of max_tokens; wins when both are set.")
    logprobs: bool | None = Field(None, description="Return the chosen tokens' logprobs.")
    top_logprobs: int | None = Field(None, description="With logprobs: also the N likeliest alternatives (0..20).")

    def engine_messages(self) -> list[dict[str, str]]:
        """Messages as the chat template takes them ({role, content} strings)."""
        out = []
        for index, message in enumerate(self.messages):
            try:
                out.append({"role": message.role, "content": message.text()})
            except ValueError as exc:
                raise RequestFieldError(str(exc), f"messages.{index}.content") from exc
        return out

    def max_tokens_requested(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestFieldError("top_logprobs needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def _wire_names(self) -> dict[str, str]:
        names = {"logprobs": "top_logprobs"}
        if self.max_completion_tokens is not None:
            names["max_tokens"] = "max_completion_tokens"
        return names


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``."""

    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="Text or token ids (a list of one prompt is accepted; batches are not).")
    logprobs: int | None = Field(None, description="Return the chosen tokens' logprobs and the N likeliest alternatives.")
    echo: bool | None = Field(None, description="Not supported; only false is accepted.")

    def engine_prompt(self) -> dict[str, Any]:
        """``{"prompt": text}`` or ``{"prompt_token_ids": ids}`` for the engine."""
        if self.echo:
            raise RequestFieldError("echo is not supported", "echo")
        prompt: Any = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise RequestFieldError("batched prompts are not supported; send one prompt per request", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return {"prompt": prompt}
        return {"prompt_token_ids": list(prompt)}

    def _logprobs(self) -> int | None:
        return self.logprobs


# ------------------------------------------------------------------ generated output

class TopLogprobEntry(BaseModel):
    """One alternative token at a step."""

    token_id: int
    token: str
    logprob: float


class TokenLogprobEntry(BaseModel):
    """The chosen token's logprob and its top alternatives."""

    token_id: int
    token: str
    logprob: float
    top: list[TopLogprobEntry]


class ChoiceDelta(BaseModel):
    """What one choice produced: a streamed delta, or (merged) the whole choice."""

    index: int
    token_ids: list[int] = Field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprobEntry] | None = None
    finish_reason: str | None = None
    attention_tokens: list[dict[str, Any]] | None = None
    attn_capture_data: list[dict[str, Any]] | None = None


class UsageCounts(BaseModel):
    """Token counts of a request."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0


def merge_deltas(deltas: list[ChoiceDelta], n: int) -> list[ChoiceDelta]:
    """Whole choices from their streamed deltas, in index order."""
    whole = [ChoiceDelta(index=i) for i in range(n)]
    for d in deltas:
        merge_delta(whole[d.index], d)
    return whole


# ------------------------------------------------------------------------ responses

class _Wire(BaseModel):
    """A response model whose ``_omit_if_none`` fields are left out when empty (extensions, optional parts)."""

    _omit_if_none: frozenset[str] = frozenset()

    @model_serializer(mode="wrap")
    def _drop_empty(self, handler):  # no return annotation: the JSON schema stays the model's own
        """The default serialisation minus the empty optional fields."""
        data = handler(self)
        return {k: v for k, v in data.items() if not (v is None and k in self._omit_if_none)}


class PromptTokensDetails(BaseModel):
    """OpenAI's breakdown of prompt tokens."""

    cached_tokens: int = 0


class Usage(BaseModel):
    """OpenAI ``usage``."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ChatTopLogprob(BaseModel):
    """One alternative in chat logprobs."""

    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(ChatTopLogprob):
    """One chosen token in chat logprobs."""

    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    """Chat ``choices[i].logprobs``."""

    content: list[ChatTokenLogprob]


class CompletionLogprobs(BaseModel):
    """Text completion ``choices[i].logprobs`` (the legacy shape)."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class AssistantMessage(BaseModel):
    """The generated chat message."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Wire):
    """One choice of a chat completion."""

    _omit_if_none = frozenset({"attention_tokens"})
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    attention_tokens: list[dict[str, Any]] | None = None


class ChatCompletionResponse(_Wire):
    """A whole chat completion."""

    _omit_if_none = frozenset({"attn_capture_data"})
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    attn_capture_data: list[dict[str, Any]] | None = None


class ChatDelta(_Wire):
    """What a chat chunk adds to a choice."""

    _omit_if_none = frozenset({"role", "content", "attention_tokens"})
    role: Literal["assistant"] | None = None
    content: str | None = None
    attention_tokens: list[dict[str, Any]] | None = None


class ChatChunkChoice(_Wire):
    """One choice's part of a chat chunk."""

    _omit_if_none = frozenset({"logprobs"})
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Wire):
    """One server-sent event of a streamed chat completion."""

    _omit_if_none = frozenset({"usage", "attn_capture_data"})
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    attn_capture_data: list[dict[str, Any]] | None = None


class CompletionChoice(_Wire):
    """One choice of a text completion (whole or streamed)."""

    _omit_if_none = frozenset({"attention_tokens"})
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    attention_tokens: list[dict[str, Any]] | None = None


class CompletionResponse(_Wire):
    """A whole text completion, or (object ``text_completion`` too, as OpenAI streams it) one chunk."""

    _omit_if_none = frozenset({"usage", "attn_capture_data"})
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    attn_capture_data: list[dict[str, Any]] | None = None


class ErrorDetail(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body."""

    error: ErrorDetail


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "attnscope"
    max_model_len: int


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class CaptureFeatures(BaseModel):
    """Optional capture features this server has."""

    include_prompt_attention: bool
    head_filtering: bool
    derotated_scores: bool
    think_segmentation: bool
    full_matrix: bool


class CaptureGuardrails(BaseModel):
    """The guardrails in force."""

    max_concurrent_capture: int | None
    requires_api_key: bool
    system_prompt_masked: bool
    disabled_in_production: bool


class CaptureDefaults(BaseModel):
    """What a capture request gets for the fields it leaves out."""

    return_attention_tokens: bool
    top_k_attention: int
    attention_capture_layers: str
    mode: Literal["raw", "sketch", "fingerprint"]


class Capabilities(BaseModel):
    """``GET /v1/attention/capabilities``: what capture this server supports now."""

    supported: bool
    modes: list[str]
    max_top_k: int
    max_layers: int
    max_heads: int
    max_full_capture_tokens: int
    features: CaptureFeatures
    guardrails: CaptureGuardrails
    defaults: CaptureDefaults


# ------------------------------------------------------------------------- builders

def now() -> int:
    """The ``created`` timestamp of a response."""
    return int(time.time())


def usage(counts: UsageCounts) -> Usage:
    """OpenAI usage from the engine's counts."""
    return Usage(prompt_tokens=counts.prompt_tokens, completion_tokens=counts.completion_tokens,
                 total_tokens=counts.prompt_tokens + counts.completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=counts.cached_prompt_tokens))


def _token_bytes(token: str) -> list[int]:
    """UTF-8 bytes of a token string, as chat logprobs report them."""
    return list(token.encode("utf-8"))


def chat_logprobs(entries: list[TokenLogprobEntry] | None) -> ChatLogprobs | None:
    """Chat-shaped logprobs."""
    if entries is None:
        return None
    return ChatLogprobs(content=[
        ChatTokenLogprob(token=e.token, logprob=e.logprob, bytes=_token_bytes(e.token),
                         top_logprobs=[ChatTopLogprob(token=t.token, logprob=t.logprob, bytes=_token_bytes(t.token))
                                       for t in e.top])
        for e in entries])


def completion_logprobs(entries: list[TokenLogprobEntry] | None, offset: int = 0) -> CompletionLogprobs | None:
    """Legacy completion-shaped logprobs; ``offset`` is where this text starts in the completion."""
    if entries is None:
        return None
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return CompletionLogprobs(tokens=[e.token for e in entries], token_logprobs=[e.logprob for e in entries],
                              top_logprobs=[{t.token: t.logprob for t in e.top} for e in entries],
                              text_offset=offsets)


def chat_response(rid: str, created: int, model: str, choices: list[ChoiceDelta], counts: UsageCounts) -> ChatCompletionResponse:
    """A whole chat completion; the first choice's full matrices go top-level, as the vLLM family has them."""
    return ChatCompletionResponse(
        id=rid, created=created, model=model, usage=usage(counts), attn_capture_data=choices[0].attn_capture_data,
        choices=[ChatChoice(index=c.index, message=AssistantMessage(content=c.text), logprobs=chat_logprobs(c.logprobs),
                            finish_reason=c.finish_reason, attention_tokens=c.attention_tokens) for c in choices])


def chat_role_chunk(rid: str, created: int, model: str, index: int) -> ChatCompletionChunk:
    """The first chunk of a streamed choice: the assistant role, no content yet."""
    return ChatCompletionChunk(id=rid, created=created, model=model,
                               choices=[ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))])


def chat_chunk(rid: str, created: int, model: str, delta: ChoiceDelta) -> ChatCompletionChunk:
    """One streamed chat delta with that delta's capture records (and full matrices when it ends)."""
    return ChatCompletionChunk(
        id=rid, created=created, model=model, attn_capture_data=delta.attn_capture_data,
        choices=[ChatChunkChoice(index=delta.index, delta=ChatDelta(content=delta.text, attention_tokens=delta.attention_tokens),
                                 logprobs=chat_logprobs(delta.logprobs), finish_reason=delta.finish_reason)])


def chat_usage_chunk(rid: str, created: int, model: str, counts: UsageCounts) -> ChatCompletionChunk:
    """The last chunk when ``stream_options.include_usage`` is set: no choices, the usage."""
    return ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=usage(counts))


def completion_response(rid: str, created: int, model: str, choices: list[ChoiceDelta], counts: UsageCounts) -> CompletionResponse:
    """A whole text completion."""
    return CompletionResponse(
        id=rid, created=created, model=model, usage=usage(counts), attn_capture_data=choices[0].attn_capture_data,
        choices=[CompletionChoice(index=c.index, text=c.text, logprobs=completion_logprobs(c.logprobs),
                                  finish_reason=c.finish_reason, attention_tokens=c.attention_tokens) for c in choices])


def completion_chunk(rid: str, created: int, model: str, delta: ChoiceDelta, offset: int) -> CompletionResponse:
    """One streamed text-completion delta; ``offset`` is the length of the choice's text before it."""
    return CompletionResponse(
        id=rid, created=created, model=model, attn_capture_data=delta.attn_capture_data,
        choices=[CompletionChoice(index=delta.index, text=delta.text, logprobs=completion_logprobs(delta.logprobs, offset),
                                  finish_reason=delta.finish_reason, attention_tokens=delta.attention_tokens)])


def completion_usage_chunk(rid: str, created: int, model: str, counts: UsageCounts) -> CompletionResponse:
    """The last text-completion chunk when ``stream_options.include_usage`` is set."""
    return CompletionResponse(id=rid, created=created, model=model, choices=[], usage=usage(counts))
