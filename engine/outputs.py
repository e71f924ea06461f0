"""What the engine hands back per step for each request: token and text deltas, logprobs, usage."""

from __future__ import annotations

from dataclasses import dataclass, field

from attnscope.deltas import merge_delta


@dataclass
class TopLogprob:
    """One alternative token and its log probability."""

    token_id: int
    token: str
    logprob: float


@dataclass
class TokenLogprob:
    """The chosen token's log probability and the top-N alternatives at that step."""

    token_id: int
    token: str
    logprob: float
    top: list[TopLogprob]


@dataclass
class CompletionDelta:
    """What one choice of a request produced since the last output."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    attention_tokens: list[dict] | None = None
    attn_capture_data: list[dict] | None = None


@dataclass
class Usage:
    """Token counts of a request, OpenAI style, plus prompt tokens served from the prefix cache."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


@dataclass
class RequestOutput:
    """One step's news for one request."""

    request_id: str
    deltas: list[CompletionDelta]
    finished: bool
    usage: Usage


@dataclass
class EngineStats:
    """A snapshot of the engine's load."""

    kv_usage: float
    num_running: int
    num_waiting: int
    num_requests: int
    capture_sessions: int


@dataclass
class Completion:
    """The whole text and tokens of one finished choice (built by ``LLMEngine.generate``)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    attention_tokens: list[dict] | None = None
    attn_capture_data: list[dict] | None = None


@dataclass
class FinalOutput:
    """A finished request: its choices and usage."""

    request_id: str
    prompt_token_ids: list[int]
    completions: list[Completion]
    usage: Usage

    @classmethod
    def collect(cls, request_id: str, prompt_token_ids: list[int], outputs: list[RequestOutput], n: int) -> "FinalOutput":
        """Concatenate a request's streamed outputs into whole completions."""
        completions = [Completion(index=i) for i in range(n)]
        for out in outputs:
            for d in out.deltas:
                merge_delta(completions[d.index], d)
        return cls(request_id, prompt_token_ids, completions, outputs[-1].usage)
