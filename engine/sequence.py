"""The state of one generated sequence (one choice of one request) inside the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

import torch

from attnscope.sampling import SamplingParams

if TYPE_CHECKING:
    from attnscope.engine.capture_state import SequenceCapture


PENDING_TOKEN = -1
"""Value of a generated token the device has sampled and the host not yet read."""


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
    num_pending: int = 0  # trailing outputs still PENDING_TOKEN
    final_pending: bool = False  # a pending token ends the sequence (length): nothing more to schedule

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

    def append_pending(self) -> int:
        """Count a token the device sampled but the host has not read yet; returns its output index.

        The pending token holds ``PENDING_TOKEN`` until :meth:`set_output_token`, so the
        scheduler can plan the next step (it needs counts, not values) while the device
        still runs this one.
        """
        self.append_token(PENDING_TOKEN)
        self.num_pending += 1
        return len(self.output_token_ids) - 1

    def set_output_token(self, index: int, token_id: int) -> None:
        """Fill in the oldest pending token, output ``index``, with its value."""
        if index != len(self.output_token_ids) - self.num_pending:
            raise ValueError(f"output {index} is not the oldest pending token")
        self.output_token_ids[index] = token_id
        self._all_token_ids[len(self.prompt_token_ids) + index] = token_id
        self.num_pending -= 1

    def drop_pending(self) -> None:
        """Forget tokens still pending (the sequence ended before they were read)."""
        if self.num_pending:
            del self.output_token_ids[-self.num_pending:]
            del self._all_token_ids[-self.num_pending:]
            self.num_pending = 0

    @property
    def num_known_outputs(self) -> int:
        """Generated tokens whose values the host has."""
        return len(self.output_token_ids) - self.num_pending

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
