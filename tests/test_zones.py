"""Zone rules of fingerprint v1, including the structure-ripple periodicity rule."""

from __future__ import annotations

from attnscope.zones import SAMPLING_BY_ZONE, classify, is_periodic


def fingerprint(local=0.0, mid=0.0, long=0.0, entropy=0.0):
    return [local, mid, long, entropy] + [0.0] * 16


def test_rules_apply_in_the_reference_order():
    assert classify(fingerprint(local=0.7, mid=0.5, long=0.4, entropy=0.9)) == "syntax_floor"
    assert classify(fingerprint(local=0.3, mid=0.5, long=0.4, entropy=0.9)) == "semantic_bridge"
    assert classify(fingerprint(local=0.3, mid=0.3, long=0.4, entropy=0.9)) == "long_range"
    assert classify(fingerprint(local=0.3, mid=0.3, long=0.2, entropy=0.9)) == "diffuse"
    assert classify(fingerprint(local=0.3, mid=0.3, long=0.2, entropy=0.5), periodic=True) == "structure_ripple"
    assert classify(fingerprint(local=0.3, mid=0.3, long=0.2, entropy=0.5)) == "unknown"
    assert set(SAMPLING_BY_ZONE) == {"syntax_floor", "semantic_bridge", "long_range", "structure_ripple", "diffuse"}


def test_table_columns_are_periodic():
    # A table with 12-token rows: the same column in the previous rows, plus the local token.
    offsets = [1, 12, 24, 36, 48]
    masses = [0.2, 0.3, 0.2, 0.15, 0.1]
    assert is_periodic(offsets, masses)


def test_scattered_offsets_are_not_periodic():
    assert not is_periodic([1, 7, 19, 40, 101], [0.2, 0.2, 0.2, 0.2, 0.2])
    assert not is_periodic([0, 1], [0.6, 0.4])
    assert not is_periodic([], [])


def test_a_period_holding_little_mass_does_not_count():
    offsets = [5, 10, 15, 33, 47, 61]
    masses = [0.02, 0.02, 0.02, 0.3, 0.3, 0.34]
    assert not is_periodic(offsets, masses)
