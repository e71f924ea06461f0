"""Behaviour of the paged-KV-cache block manager and the slot position map."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from attnscope.engine.block_manager import BlockManager, NoFreeBlocksError, SlotPositionMap


def _snapshot(bm: BlockManager, seq_ids: list[int]) -> tuple:
    """Everything a caller can observe about the manager's state."""
    return (
        {sid: bm.block_table(sid) for sid in seq_ids},
        bm.num_free_blocks,
        bm.usage,
        dataclasses.asdict(bm.stats),
    )


def _prefill(bm: BlockManager, seq_id: int, tokens: list[int]) -> int:
    """Allocate and pretend the model computed the whole prompt; return the cached token count."""
    cached = bm.allocate(seq_id, tokens)
    bm.mark_computed(seq_id, tokens, len(tokens))
    return cached


def test_rejects_impossible_sizes() -> None:
    with pytest.raises(ValueError):
        BlockManager(0, 4)
    with pytest.raises(ValueError):
        BlockManager(4, 0)


def test_allocate_and_slot_arithmetic() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.num_free_blocks == 8 and bm.usage == 0.0
    assert bm.allocate(1, list(range(10))) == 0
    table = bm.block_table(1)
    assert len(table) == 3 and len(set(table)) == 3
    assert bm.num_free_blocks == 5
    assert bm.usage == pytest.approx(3 / 8)
    for pos in range(10):
        assert bm.slot(1, pos) == table[pos // 4] * 4 + pos % 4
    assert bm.slots(1, 2, 9) == [bm.slot(1, p) for p in range(2, 9)]
    assert bm.slots(1, 5, 5) == []
    with pytest.raises(IndexError):
        bm.slot(1, 10)
    with pytest.raises(IndexError):
        bm.slots(1, 0, 11)
    with pytest.raises(ValueError):
        bm.allocate(2, [])


def test_append_slots_allocates_only_at_block_boundaries() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate(1, [1, 2, 3])
    assert bm.can_append(1, 1)
    bm.append_slots(1, 4)
    assert len(bm.block_table(1)) == 1 and bm.num_free_blocks == 3
    bm.append_slots(1, 5)
    assert len(bm.block_table(1)) == 2 and bm.slot(1, 4) == bm.block_table(1)[1] * 4
    bm.append_slots(1, 3)  # never shrinks
    assert len(bm.block_table(1)) == 2
    assert bm.can_append(1, 11) and not bm.can_append(1, 12)
    bm.append_slots(1, 16)
    assert bm.num_free_blocks == 0 and not bm.can_append(1, 1)
    with pytest.raises(NoFreeBlocksError):
        bm.append_slots(1, 17)


def test_shared_prefix_reused_only_after_mark_computed() -> None:
    bs = 4
    bm = BlockManager(num_blocks=16, block_size=bs)
    prefix = list(range(100, 100 + 3 * bs))
    a, b, c = prefix + [1, 2], prefix + [3], prefix + [5, 6, 7]
    assert bm.allocate(1, a) == 0
    assert bm.allocate(2, b) == 0  # A's KV not computed yet: nothing to reuse
    assert bm.stats.prefix_hit_blocks == 0
    bm.mark_computed(1, a, len(a))
    hits = bm.stats.prefix_hit_blocks
    assert bm.allocate(3, c) == 3 * bs
    assert bm.stats.prefix_hit_blocks == hits + 3
    assert bm.block_table(3)[:3] == bm.block_table(1)[:3]
    assert bm.block_table(3)[3] not in bm.block_table(1)
    assert bm.stats.prefix_queried_blocks == 3 * 3


def test_mark_computed_partially_caches_only_computed_full_blocks() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    tokens = list(range(13))
    bm.allocate(1, tokens)
    bm.mark_computed(1, tokens, 7)  # chunked prefill: one full block done
    assert bm.allocate(2, tokens) == 4
    bm.mark_computed(1, tokens, 13)
    assert bm.allocate(3, tokens) == 12
    with pytest.raises(ValueError):
        bm.mark_computed(1, tokens, 14)


def test_block_holding_last_token_is_never_reused() -> None:
    bs = 4
    bm = BlockManager(num_blocks=16, block_size=bs)
    tokens = list(range(3 * bs))  # exactly three full blocks
    _prefill(bm, 1, tokens)
    assert bm.allocate(2, tokens) == 2 * bs
    assert bm.block_table(2)[2] != bm.block_table(1)[2]
    one = [7]
    _prefill(bm, 3, one)
    assert bm.allocate(4, one) == 0
    bm1 = BlockManager(num_blocks=8, block_size=1)
    _prefill(bm1, 1, [5, 6, 7])
    assert bm1.allocate(2, [5, 6, 7]) == 2


def test_partial_blocks_are_never_shared() -> None:
    bs = 4
    bm = BlockManager(num_blocks=16, block_size=bs)
    tokens = list(range(10))  # 2 full blocks + a partial one
    _prefill(bm, 1, tokens)
    assert bm.allocate(2, tokens + [99, 98]) == 2 * bs
    assert bm.block_table(2)[2] != bm.block_table(1)[2]
    assert bm.allocate(3, tokens[:8] + [1, 2, 3]) == 2 * bs
    assert bm.block_table(3)[2] not in bm.block_table(1) + bm.block_table(2)


def test_free_releases_only_blocks_no_other_sequence_holds() -> None:
    bs = 2
    bm = BlockManager(num_blocks=10, block_size=bs)
    prefix = [1, 2, 3, 4]
    _prefill(bm, 1, prefix + [5])
    assert _prefill(bm, 2, prefix + [6, 7]) == 4
    assert bm.num_free_blocks == 10 - 3 - 1
    shared = bm.block_table(2)[:2]
    bm.free(1)
    assert bm.num_free_blocks == 10 - 3  # A's private last block came back
    assert bm.block_table(2)[:2] == shared
    _prefill(bm, 3, [9] * 14)  # takes every free block, must not touch B's shared ones
    assert not set(bm.block_table(3)) & set(bm.block_table(2))
    bm.free(3)
    bm.free(2)
    assert bm.num_free_blocks == 10 and bm.usage == 0.0


def test_bad_seq_ids_raise_key_error() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate(1, [1, 2, 3])
    with pytest.raises(KeyError, match="already allocated"):
        bm.allocate(1, [1])
    bm.free(1)
    with pytest.raises(KeyError, match="double free"):
        bm.free(1)
    for call in (
        lambda: bm.block_table(7),
        lambda: bm.slot(7, 0),
        lambda: bm.slots(7, 0, 1),
        lambda: bm.append_slots(7, 3),
        lambda: bm.can_append(7),
        lambda: bm.mark_computed(7, [1], 1),
    ):
        with pytest.raises(KeyError, match="sequence 7 is not allocated"):
            call()


def test_lru_eviction_when_memory_is_needed_and_evicted_hashes_miss() -> None:
    bs = 2
    bm = BlockManager(num_blocks=6, block_size=bs)
    p1, p2 = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]
    _prefill(bm, 1, p1)
    bm.free(1)
    _prefill(bm, 2, p2)
    bm.free(2)
    assert bm.num_free_blocks == 6 and bm.usage == 0.0  # cached blocks still count as free
    # Reusing p1 makes it the most recently used cached prompt.
    assert bm.allocate(3, p1) == 4
    bm.free(3)
    bm.allocate(4, list(range(50, 58)))  # 4 blocks: 2 never-hashed ones, then evicts p2 (LRU)
    assert bm.stats.evicted_blocks == 2
    bm.free(4)
    assert bm.allocate(5, p2) == 0
    bm.free(5)
    assert bm.allocate(6, p1) == 4


def test_evicted_block_reused_for_other_content_is_not_hit() -> None:
    bm = BlockManager(num_blocks=2, block_size=2)
    old = [1, 2, 3]
    _prefill(bm, 1, old)
    old_block = bm.block_table(1)[0]
    bm.free(1)
    _prefill(bm, 2, [8, 9, 10, 11])  # needs both blocks: evicts the cached one and overwrites it
    assert old_block in bm.block_table(2)
    bm.free(2)
    assert bm.allocate(3, old) == 0


def test_sequences_holding_the_same_content_do_not_both_register() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    tokens = [1, 2, 3, 4, 5]
    bm.allocate(1, tokens)
    bm.allocate(2, tokens)  # same step: neither is computed yet
    bm.mark_computed(1, tokens, 5)
    bm.mark_computed(2, tokens, 5)
    assert bm.allocate(3, tokens) == 4
    assert bm.block_table(3)[:2] == bm.block_table(1)[:2]
    bm.free(2)
    bm.free(3)
    bm.free(1)
    assert bm.num_free_blocks == 8


def test_hash_chain_keeps_different_prefixes_apart() -> None:
    bs = 2
    bm = BlockManager(num_blocks=16, block_size=bs)
    _prefill(bm, 1, [1, 1, 7, 7, 7, 7, 0])
    assert bm.allocate(2, [2, 2, 7, 7, 7, 7, 0]) == 0  # equal later blocks, different first one
    assert bm.allocate(3, [1, 1, 7, 7, 9, 9, 0]) == 2 * bs
    assert bm.allocate(4, [7, 7, 1, 1, 0]) == 0  # same blocks, other order


def test_disabled_prefix_caching_never_reuses() -> None:
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    tokens = [1, 2, 3, 4, 5]
    _prefill(bm, 1, tokens)
    assert bm.allocate(2, tokens) == 0
    assert not set(bm.block_table(1)) & set(bm.block_table(2))
    assert bm.stats.prefix_hit_blocks == 0 and bm.stats.prefix_queried_blocks == 0


def _build() -> BlockManager:
    """A manager with live, shared and cached-idle blocks, built deterministically."""
    bm = BlockManager(num_blocks=8, block_size=2)
    _prefill(bm, 1, [1, 2, 3, 4, 5])  # 3 blocks, 2 hashed
    bm.free(1)  # 2 evictable + 1 free
    _prefill(bm, 2, [1, 2, 3, 4, 6, 7])  # reuses 2 cached blocks, 1 new
    _prefill(bm, 3, [9, 9, 9])  # 2 new
    return bm


def test_failed_allocate_and_append_leave_everything_unchanged() -> None:
    bm, twin = _build(), _build()
    live = [2, 3]
    before = _snapshot(bm, live)
    # Would reuse the 2 shared blocks but needs 5 more while 3 are free.
    big = [1, 2, 3, 4] + list(range(20, 30))
    assert not bm.can_allocate(big)
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(4, big)
    assert _snapshot(bm, live) == before
    with pytest.raises(KeyError):
        bm.block_table(4)
    assert not bm.can_append(3, 100)
    with pytest.raises(NoFreeBlocksError):
        bm.append_slots(3, 100)
    assert _snapshot(bm, live) == before
    # And it keeps behaving exactly like a manager that never saw the failures.
    for manager in (bm, twin):
        manager.free(2)
    results = [
        (m.allocate(5, [1, 2, 3, 4, 5]), m.allocate(6, list(range(40, 46))), _snapshot(m, [3, 5, 6]))
        for m in (bm, twin)
    ]
    assert results[0] == results[1]
    assert results[0][0] == 4


def test_failed_allocate_keeps_hit_blocks_cached() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    _prefill(bm, 1, [1, 2, 3, 4, 5])
    bm.free(1)
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(2, [1, 2, 3, 4] + list(range(10, 20)))
    assert bm.allocate(3, [1, 2, 3, 4, 5]) == 4


def test_slot_position_map() -> None:
    m = SlotPositionMap()
    assert m.positions() == []
    m.append(range(6))
    assert m.positions() == [0, 1, 2, 3, 4, 5]
    m.remove([1, 3])
    assert m.positions() == [0, 2, 4, 5]
    m.append([6])
    m.remove([0])
    assert m.positions() == [2, 4, 5, 6]
    m.positions().clear()  # a copy
    assert m.positions() == [2, 4, 5, 6]
    with pytest.raises(IndexError):
        m.remove([4])


@pytest.mark.parametrize("seed", range(40))
def test_random_operations_keep_invariants(seed: int) -> None:
    """Random allocate / chunked prefill / decode / free against a fake KV memory.

    The fake memory stores, per slot, the token prefix whose KV it holds. After
    every operation every computed position of every live sequence must still
    read back its own content: any wrongly shared, wrongly reused or evicted-
    but-hit block shows up as a mismatch.
    """
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 3, 4])
    num_blocks = rng.randint(3, 24)
    bm = BlockManager(num_blocks, bs)
    prefixes = [[rng.randint(0, 2) for _ in range(rng.randint(0, 10))] for _ in range(3)]
    kv: dict[int, tuple[int, ...]] = {}
    tokens: dict[int, list[int]] = {}
    computed: dict[int, int] = {}
    hits = queried = 0
    next_id = 0

    def compute(sid: int, end: int) -> None:
        for pos in range(computed[sid], end):
            kv[bm.slot(sid, pos)] = tuple(tokens[sid][: pos + 1])
        computed[sid] = end
        bm.mark_computed(sid, tokens[sid], end)

    for _ in range(150):
        op = rng.random()
        live = sorted(tokens)
        before = _snapshot(bm, live)
        if op < 0.4 or not live:
            prompt = rng.choice(prefixes) + [rng.randint(0, 2) for _ in range(rng.randint(1, 8))]
            fits = bm.can_allocate(prompt)
            try:
                cached = bm.allocate(next_id, prompt)
            except NoFreeBlocksError:
                assert not fits
                assert _snapshot(bm, live) == before
                continue
            assert fits
            assert cached % bs == 0 and cached <= len(prompt) - 1
            hits += cached // bs
            queried += (len(prompt) - 1) // bs
            tokens[next_id], computed[next_id] = prompt, cached
            for pos in range(cached):
                assert kv[bm.slot(next_id, pos)] == tuple(prompt[: pos + 1])
            compute(next_id, rng.randint(cached + 1, len(prompt)))
            next_id += 1
        elif op < 0.8:
            sid = rng.choice(live)
            if computed[sid] < len(tokens[sid]):
                compute(sid, rng.randint(computed[sid] + 1, len(tokens[sid])))
            else:
                fits = bm.can_append(sid)
                try:
                    bm.append_slots(sid, len(tokens[sid]) + 1)
                except NoFreeBlocksError:
                    assert not fits
                    assert _snapshot(bm, live) == before
                    continue
                assert fits
                tokens[sid].append(rng.randint(0, 2))
                compute(sid, len(tokens[sid]))
        else:
            sid = rng.choice(live)
            bm.free(sid)
            del tokens[sid], computed[sid]

        tables = {sid: bm.block_table(sid) for sid in tokens}
        referenced = set().union(*tables.values()) if tables else set()
        assert bm.num_free_blocks == num_blocks - len(referenced)
        assert bm.usage == pytest.approx(len(referenced) / num_blocks)
        assert bm.stats.prefix_hit_blocks == hits and bm.stats.prefix_queried_blocks == queried
        owners: dict[int, list[tuple[int, int]]] = {}
        for sid, table in tables.items():
            assert len(table) == -(-len(tokens[sid]) // bs)
            assert len(set(table)) == len(table)
            for index, block in enumerate(table):
                owners.setdefault(block, []).append((sid, index))
            for pos in range(computed[sid]):
                assert kv[bm.slot(sid, pos)] == tuple(tokens[sid][: pos + 1])
        for block, holders in owners.items():
            if len(holders) > 1:  # shared only as the same computed prefix block
                (sid0, index0), *rest = holders
                end = (index0 + 1) * bs
                for sid, index in rest:
                    assert index == index0
                    assert tokens[sid][:end] == tokens[sid0][:end]
                    assert computed[sid] >= end and computed[sid0] >= end

    for sid in list(tokens):
        bm.free(sid)
    assert bm.num_free_blocks == num_blocks and bm.usage == 0.0


def test_block_table_array_follows_the_table_as_it_grows():
    manager = BlockManager(num_blocks=64, block_size=4)
    manager.allocate(7, list(range(10)))
    assert manager.block_table_array(7).dtype == np.int32
    for total in (11, 13, 40, 120, 200):
        manager.append_slots(7, total)
        table = manager.block_table_array(7)
        assert table.tolist() == manager.block_table(7)
        assert len(table) == -(-total // 4)
    with pytest.raises(ValueError):
        table[0] = 99  # a read-only view: the scheduler's table cannot be changed through it
