"""Streamed choice deltas folded into whole choices: shared by the engine and the HTTP layer."""

from __future__ import annotations

from typing import Any


def merge_delta(whole: Any, delta: Any) -> None:
    """Append one streamed delta to the whole choice it belongs to.

    Works on any objects with the delta fields (``text, token_ids, logprobs,
    attention_tokens, attn_capture_data, finish_reason``): the engine's dataclasses and
    the wire models alike.
    """
    whole.text += delta.text
    whole.token_ids.extend(delta.token_ids)
    if delta.logprobs is not None:
        whole.logprobs = (whole.logprobs or []) + delta.logprobs
    if delta.attention_tokens is not None:
        whole.attention_tokens = (whole.attention_tokens or []) + delta.attention_tokens
    whole.attn_capture_data = delta.attn_capture_data or whole.attn_capture_data
    whole.finish_reason = delta.finish_reason or whole.finish_reason
