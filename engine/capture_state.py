"""Per-sequence capture state: which layers, which heads, which steps, and the think phase."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attnscope.capture import CaptureParams


@dataclass
class ThinkTags:
    """Token ids that open and close a reasoning block (``<think>``/``</think>``); empty when the model has none."""

    start: frozenset[int] = frozenset()
    end: frozenset[int] = frozenset()

    def phase_after(self, token_ids: list[int], inside: bool = False) -> bool:
        """Whether the text is inside a think block after ``token_ids``, starting from ``inside``."""
        for t in token_ids:
            if t in self.start:
                inside = True
            elif t in self.end:
                inside = False
        return inside


@dataclass
class SequenceCapture:
    """Capture bookkeeping of one sequence (one choice of one request)."""

    params: CaptureParams
    layers: list[int]
    head_weights: torch.Tensor
    tags: ThinkTags
    steps_captured: int = 0
    rows_upto: int = 0
    in_think: bool = False
    scanned: int = 0
    full_rows: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def create(cls, params: CaptureParams, num_layers: int, num_heads: int, tags: ThinkTags) -> SequenceCapture:
        """Resolve layers and heads against the model (ValueError naming the bad id)."""
        layers = params.resolve_layers(num_layers)
        params.check_heads(num_heads)
        heads = list(params.head_ids) if params.head_ids else list(range(num_heads))
        weights = torch.zeros(num_heads)
        weights[heads] = 1.0 / len(heads)
        return cls(params, layers, weights, tags)

    @property
    def needs_all_rows(self) -> bool:
        """True when every prompt token's query is captured, so cached prefixes cannot be skipped."""
        return self.is_full or self.params.include_prompt

    @property
    def is_full(self) -> bool:
        """True for the vLLM-family full-matrix mode."""
        return self.params.mode == "full"

    def wants_step(self, decode_step: int) -> bool:
        """Whether the query producing output token ``decode_step`` is captured (stride, max, early exit)."""
        p = self.params
        if self.is_full:
            return True
        if decode_step % p.stride != 0:
            return False
        limit = p.max_steps
        if p.mode == "fingerprint" and p.fingerprint_max_steps is not None:
            limit = p.fingerprint_max_steps if limit is None else min(limit, p.fingerprint_max_steps)
        return limit is None or self.steps_captured < limit

    def think_phase(self, all_token_ids: list[int], upto: int) -> str:
        """'think' or 'output' for a query at position ``upto - 1`` (tokens before ``upto`` seen)."""
        if upto < self.scanned:
            inside = self.tags.phase_after(all_token_ids[:upto])
            return "think" if inside else "output"
        self.in_think = self.tags.phase_after(all_token_ids[self.scanned:upto], self.in_think)
        self.scanned = upto
        return "think" if self.in_think else "output"
