"""The compact per-layer print of the reference guide.

```
── L18 (T=138 H=9 prompt=131) ──
  avg  <bos>(0)=0.24  :(132)=0.17  alpha(131)=0.08◀  ...
  h6   alpha(131)=0.23◀  ↵(127)=0.13  :(132)=0.12
```
``◀`` marks the target tokens; ``avg`` is the head mean, then the heads that put the most
weight on the target. When no target token makes the ``avg`` top list, the best-placed
one is appended after ``…``.
"""

from __future__ import annotations

import numpy as np

from attnscope.client import AttentionAnalyzer

MARK = "◀"
AVG_TOP_K = 5
HEAD_TOP_K = 3
SHOWN_HEADS = 3


def token_label(tokens: list[str], position: int) -> str:
    """``text(position)`` with newlines shown as ↵ and surrounding blanks stripped."""
    text = tokens[position] if position < len(tokens) else "?"
    shown = text.replace("\n", "↵").strip()
    return f"{shown or repr(text)}({position})"


def word_positions(tokens: list[str], start: int, end: int, word: str) -> list[int]:
    """Positions in ``[start, end)`` whose text overlaps the first occurrence of ``word`` (case-insensitive)."""
    pieces = tokens[start:end]
    at = "".join(pieces).lower().find(word.lower())
    if at < 0:
        return []
    found, offset = [], 0
    for i, piece in enumerate(pieces):
        if offset < at + len(word) and offset + len(piece) > at:
            found.append(start + i)
        offset += len(piece)
    return found


def layer_block(layer: int, analyzer: AttentionAnalyzer, tokens: list[str], query: int, marked: set[int]) -> list[str]:
    """The header, ``avg`` line and top-head lines of one layer for query row ``query``."""
    prompt_len = analyzer.meta.prompt_len
    lines = [f"── L{layer} (T={analyzer.num_tokens} H={analyzer.num_heads} prompt={prompt_len}) ──"]
    top = analyzer.top_attended_tokens(query, AVG_TOP_K, avg_heads=True)
    cells = [_cell(tokens, k, w, marked) for k, w, _ in top]
    if marked and not marked & {k for k, _, _ in top}:
        mean = analyzer.attention_for_token(query, avg_heads=True)
        best = max(marked, key=lambda k: mean[k])
        cells += ["…", _cell(tokens, best, float(mean[best]), marked)]
    lines.append("  avg  " + "  ".join(cells))
    for head in _top_heads(analyzer, query, marked):
        cells = [_cell(tokens, k, w, marked) for k, w, _ in analyzer.top_attended_tokens(query, HEAD_TOP_K, head_idx=head)]
        lines.append(f"  h{head:<3} " + "  ".join(cells))
    return lines


def _top_heads(analyzer: AttentionAnalyzer, query: int, marked: set[int]) -> list[int]:
    """The heads with the most weight on the marked tokens (on their strongest key without marks)."""
    row = analyzer.attention_for_token(query)
    score = row[:, sorted(marked)].sum(axis=1) if marked else row.max(axis=1)
    return [int(h) for h in np.argsort(-score, kind="stable")[:SHOWN_HEADS]]


def _cell(tokens: list[str], position: int, weight: float, marked: set[int]) -> str:
    """``text(position)=weight`` with the target mark."""
    return f"{token_label(tokens, position)}={weight:.2f}{MARK if position in marked else ''}"
