"""Manifold zones of fingerprint v1 and the sampling each zone recommends (reference table)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ZONES = ("syntax_floor", "semantic_bridge", "long_range", "diffuse", "structure_ripple", "unknown")

SAMPLING_BY_ZONE = {
    "syntax_floor": {"temperature": 0.3, "top_p": 0.9},
    "semantic_bridge": {"temperature": 0.6, "top_p": 0.95},
    "long_range": {"temperature": 0.7, "top_p": 0.95},
    "structure_ripple": {"temperature": 0.5, "top_p": 0.9},
    "diffuse": {"temperature": 0.8, "top_p": 0.98},
}


def is_periodic(offsets: Sequence[int], masses: Sequence[float], min_share: float = 0.5) -> bool:
    """True when the attended offsets repeat with a common period.

    The structure-ripple rule: among the attended offsets ``d >= 2`` (local ones say
    nothing about structure) there are at least three distinct multiples of one period
    ``p >= 2`` (the same column of earlier table rows, earlier list items), and those
    multiples hold at least ``min_share`` of the mass at ``d >= 2``. Repeated offsets
    count once, with their masses added (see :func:`periodic_rows`).
    """
    distinct, where = np.unique(np.asarray(offsets, dtype=np.int64), return_inverse=True)
    summed = np.bincount(where.reshape(-1), weights=np.asarray(masses, dtype=np.float64), minlength=len(distinct))
    return bool(periodic_rows(distinct[None, :], summed[None, :], np.ones((1, len(distinct)), bool), min_share)[0])


def periodic_rows(offsets: np.ndarray, masses: np.ndarray, valid: np.ndarray, min_share: float = 0.5) -> np.ndarray:
    """:func:`is_periodic` for many rows at once: ``[N]`` bools for ``[N, K]`` offsets, masses and valid flags.

    Each row's valid offsets must be distinct (top-k positions are). Every valid offset
    ``d >= 2`` is tried as the period, as a ``[N, K, K]`` divisibility table, so a step's
    sketches are classified without a Python loop per row; each period's mass is one
    batched matrix-vector product (on a 2-core CPU, an engine step's 32 rows of 32 hubs
    took 116 instead of 139 us with a broadcast multiply and sum).
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    far = np.asarray(valid, dtype=bool) & (offsets >= 2)
    weights = np.where(far, np.asarray(masses, dtype=np.float64), 0.0)
    total = weights.sum(axis=1)
    periods = np.where(far, offsets, 1)
    multiple = far[:, None, :] & (offsets[:, None, :] % periods[:, :, None] == 0)  # [row, period, offset]
    counted = np.count_nonzero(multiple, axis=2) >= 3
    share = np.matmul(multiple.astype(np.float64), weights[:, :, None])[..., 0]
    holds = far & counted & (share >= min_share * total[:, None])
    return (total > 0) & holds.any(axis=1)


def classify(fingerprint: Sequence[float], periodic: bool = False) -> str:
    """The zone of a fingerprint v1, first rule that holds (the reference kernel's order).

    ``periodic`` comes from ``is_periodic`` on the top attended offsets when the capture
    mode has them; discovered clusters (a later stage) will replace ``unknown``.
    """
    local, mid, long, entropy = fingerprint[0], fingerprint[1], fingerprint[2], fingerprint[3]
    if local > 0.6:
        return "syntax_floor"
    if mid > 0.4:
        return "semantic_bridge"
    if long > 0.3:
        return "long_range"
    if entropy > 0.7:
        return "diffuse"
    if periodic:
        return "structure_ripple"
    return "unknown"
