"""The state of one generated sequence (one choice of one request) inside the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

import torch

from attnscope.sampling import SamplingParams

if TYPE_CHECKING:
    from attnscope.engine.capture_state import SequenceCapture


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One output sequence: its tokens, how many of them have KV in the cache, and why it ended."""

    seq_id: int
    request_id: str
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    finish_reason: str | None = None
    capture: SequenceCapture | None = None

    _all_token_ids: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._all_token_ids = list(self.prompt_token_ids) + list(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by generated tokens: one list kept up to date (no copy per access); do not modify it."""
        return self._all_token_ids

    def append_token(self, token_id: int) -> None:
        """Record a generated token."""
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)

    @property
    def num_tokens(self) -> int:
        """Length of prompt plus output."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        """Tokens whose keys and values are not in the cache yet."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        """True once the sequence has ended for any reason."""
        return self.status is SequenceStatus.FINISHED
