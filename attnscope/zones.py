"""Manifold zones of fingerprint v1 and the sampling each zone recommends (reference table)."""

from __future__ import annotations

from collections.abc import Sequence

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
    multiples hold at least ``min_share`` of the mass at ``d >= 2``.
    """
    far = [(d, m) for d, m in zip(offsets, masses) if d >= 2]
    total = sum(m for _, m in far)
    if total <= 0:
        return False
    for period in sorted({d for d, _ in far}):
        multiples = {d for d, _ in far if d % period == 0}
        if len(multiples) >= 3:
            share = sum(m for d, m in far if d % period == 0) / total
            if share >= min_share:
                return True
    return False


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
