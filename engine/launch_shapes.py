"""Batch buckets, and the launch shapes eager capture steps share with the CUDA graphs.

Triton compiles a kernel variant for every set of compile-time choices, and the capture
kernels make theirs from the number of captured rows, the split count and the block-table
width (the finish's split and head grouping, its register cap, whether Pass A stores logits).
The decode graphs launch them for batch buckets, with captured rows padded to a bucket and
block tables as wide as the longest possible sequence, and ``DecodeGraphs.warm_capture``
compiles those variants at start-up. Steps that run eagerly (a prefill chunk beside decode
rows, a request's first token, which its prefill produces) launch at the same shapes
(``LaunchShapes``): captured rows padded to a bucket (padding rows match no decode row and
their results are never read), block tables widened to the graphs' width, and the split count
of the graph of the batch's bucket. A layer's rows beyond the largest bucket (prompt attention
captures every prompt token of a prefill chunk) are padded to whole launches of
``PROMPT_LAUNCH_ROWS`` rows (at least ``max_batch``), which run one after another; the warm-up
compiles that shape too. Without this, serving compiled a finish variant (8-10 s on
an H100, every request waiting) whenever an eager step met a new row count or context length.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
# Rows of one standalone capture launch beyond the largest batch bucket. Measured on an H100 (Llama-1B
# shape, 8K tables, 32 sequences, rounds of six prompts of 300-4000 tokens with prompt attention, the
# third and fourth rounds, each against unpadded launches after their compiles on the same machine):
# launches of 32 rows (the largest bucket) 6.1 and 5.3 s against 4.8 and 3.9 s; of 256 rows 3.1 and
# 2.7 s against 4.5 and 3.4 s.
PROMPT_LAUNCH_ROWS = 256


def bucket(n: int, limit: int = BATCH_BUCKETS[-1]) -> int | None:
    """The smallest bucket holding ``n`` rows, capped at ``limit``; ``None`` when ``n`` exceeds the cap."""
    i = bisect.bisect_left(BATCH_BUCKETS, n)
    if i == len(BATCH_BUCKETS):
        return None
    return min(BATCH_BUCKETS[i], limit) if n <= limit else None


@dataclass(frozen=True)
class LaunchShapes:
    """The decode graphs' launch shapes: batch buckets up to ``max_batch``, block tables ``width`` blocks wide,
    launches of ``max(max_batch, prompt_rows)`` rows beyond the buckets."""

    max_batch: int
    width: int
    prompt_rows: int = PROMPT_LAUNCH_ROWS

    def rows(self, n: int) -> int:
        """``n`` captured rows padded to their bucket, or beyond ``max_batch`` to whole launches of
        ``launch_rows`` rows."""
        padded = bucket(n, self.max_batch)
        return -(-n // self.launch_rows) * self.launch_rows if padded is None else padded

    @property
    def launch_rows(self) -> int:
        """The most captured rows one standalone capture launch takes: more run in launches of this many."""
        return max(self.max_batch, self.prompt_rows)

    def num_splits(self, batch: int, num_kv_heads: int, head_dim: int, block_size: int, device: torch.device) -> int:
        """The split count the decode graph of ``batch``'s bucket gives its kernels (``default_num_splits`` of
        the bucket over the graphs' table width)."""
        from attnscope.kernels.paged_decode import _num_sms, default_num_splits

        return default_num_splits(self.rows(batch), num_kv_heads, self.width * block_size, _num_sms(device), head_dim)
