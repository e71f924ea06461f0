"""Zone rules of fingerprint v1, including the structure-ripple periodicity rule."""

from __future__ import annotations

import numpy as np

from attnscope.engine.capture_records import _step_periodicity
from attnscope.zones import SAMPLING_BY_ZONE, classify, is_periodic, periodic_rows


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


def _periodic_by_definition(offsets, masses, min_share=0.5):
    """The rule read literally: some offset p >= 2 among the far ones with >= 3 distinct far multiples
    holding >= min_share of the far mass."""
    far = {d: 0.0 for d in offsets if d >= 2}
    for d, m in zip(offsets, masses):
        if d >= 2:
            far[d] += m
    total = sum(far.values())
    return total > 0 and any(
        len([d for d in far if d % p == 0]) >= 3 and sum(m for d, m in far.items() if d % p == 0) >= min_share * total
        for p in far)


def test_rows_at_once_agree_with_the_rule(seed):
    """Random top-k rows (distinct offsets, some near-periodic, some invalid entries): the batched rule and
    the one-row rule both give the rule's answer for every row."""
    rng = np.random.default_rng(seed)
    rows, k = 300, 12
    offsets = np.zeros((rows, k), dtype=np.int64)
    for r in range(rows):
        period = int(rng.integers(2, 9))
        pool = np.concatenate([period * np.arange(1, 40), rng.integers(0, 300, 20)])
        offsets[r] = rng.choice(np.unique(pool), size=k, replace=False)
    masses = rng.dirichlet(np.ones(k), size=rows)
    valid = rng.random((rows, k)) > 0.15
    batched = periodic_rows(offsets, masses, valid)
    expected = [_periodic_by_definition(offsets[r][valid[r]].tolist(), masses[r][valid[r]].tolist())
                for r in range(rows)]
    assert batched.tolist() == expected, f"seed={seed}"
    assert 0 < sum(expected) < rows  # both answers occur
    for r in range(0, rows, 7):
        assert is_periodic(offsets[r][valid[r]].tolist(), masses[r][valid[r]].tolist()) == expected[r]


def test_repeated_offsets_count_once_with_their_mass():
    assert is_periodic([4, 4, 8, 12, 3], [0.2, 0.2, 0.2, 0.2, 0.2])
    assert not is_periodic([4, 4, 4, 8], [0.25, 0.25, 0.25, 0.25])  # only two distinct multiples of 4


def test_step_periodicity_gives_every_row_its_defined_zone(seed):
    """The engine tests hub periodicity only for rows whose fingerprint no earlier zone rule claims; every
    row still gets the zone of its fingerprint and of whether any of its sketched layers is periodic (two
    layer groups, rows in either or both, raw rows without a fingerprint)."""
    rng = np.random.default_rng(seed)
    num_rows, k = 200, 8
    fingerprints = [None if r % 10 == 9 else fingerprint(local=rng.choice([0.1, 0.7]), mid=rng.choice([0.1, 0.5]),
                                                          entropy=rng.choice([0.2, 0.9]))
                    for r in range(num_rows)]
    groups, periodic_layers = [], [[] for _ in range(num_rows)]
    for _ in range(2):
        where = np.array([r for r in range(num_rows) if fingerprints[r] is not None and rng.random() < 0.7])
        offsets = np.array([rng.choice(np.unique(np.concatenate([int(rng.integers(2, 9)) * np.arange(1, 20),
                                                                 rng.integers(0, 200, 10)])), k, replace=False)
                            for _ in where])
        masses = rng.dirichlet(np.ones(k), size=len(where))
        valid = rng.random((len(where), k)) > 0.1
        groups.append((where, offsets, masses, valid))
        for i, r in enumerate(where.tolist()):
            periodic_layers[r].append(is_periodic(offsets[i][valid[i]].tolist(), masses[i][valid[i]].tolist()))
    periodic = _step_periodicity(groups, fingerprints)
    zones = [classify(fp, flag) if fp is not None else None for fp, flag in zip(fingerprints, periodic)]
    expected = [classify(fp, any(flags)) if fp is not None else None
                for fp, flags in zip(fingerprints, periodic_layers)]
    assert zones == expected, f"seed={seed}"
    assert "structure_ripple" in expected and "unknown" in expected and "syntax_floor" in expected, f"seed={seed}"
