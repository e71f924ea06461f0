"""Bookkeeping for the paged KV cache: which physical blocks each sequence owns.

Pure Python and numpy, no torch. The cache holds ``num_blocks`` blocks of ``block_size``
token slots; the model writes the K/V of logical token ``position`` of a
sequence to ``slot = block_table[position // block_size] * block_size +
position % block_size``.

Prefix caching: once a block is full and its KV has been computed
(``mark_computed``) it is registered under a hash chained over all earlier
blocks, ``hash((parent_hash, tuple(block_tokens)))``, so a later prompt with
an identical prefix reuses it instead of recomputing it. Freed hashed blocks
stay cached (evictable, least recently used first) until their memory is
needed.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np


class NoFreeBlocksError(RuntimeError):
    """Raised when a request needs more blocks than can be handed out; nothing was changed."""


@dataclass
class BlockManagerStats:
    """Cumulative prefix-cache counters; hit rate is ``prefix_hit_blocks / prefix_queried_blocks``."""

    prefix_hit_blocks: int = 0
    """Blocks reused from the prefix cache by successful allocations."""
    prefix_queried_blocks: int = 0
    """Full prompt blocks eligible for reuse (all but the one holding the last token) that were looked up."""
    evicted_blocks: int = 0
    """Cached blocks whose hash was dropped so their memory could be reused."""


@dataclass
class _SeqState:
    """One sequence's table, the token count it is sized for, and its computed-block hash chain.

    ``table`` mirrors ``block_ids`` as int32 (with spare capacity), so a step hands the
    model the table without converting a Python list.
    """

    block_ids: list[int]
    num_tokens: int
    block_hashes: list[int] = field(default_factory=list)
    table: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.table = np.zeros(max(16, 2 * len(self.block_ids)), dtype=np.int32)
        self.table[: len(self.block_ids)] = self.block_ids

    def extend(self, new_blocks: list[int]) -> None:
        """Append blocks to the table (both forms)."""
        start = len(self.block_ids)
        self.block_ids.extend(new_blocks)
        if len(self.block_ids) > len(self.table):
            grown = np.zeros(2 * len(self.block_ids), dtype=np.int32)
            grown[:start] = self.table[:start]
            self.table = grown
        self.table[start : len(self.block_ids)] = new_blocks


@dataclass
class _Plan:
    """What an allocation would do: reused blocks, their hashes, and how many fresh blocks it needs."""

    hit_blocks: list[int]
    hit_hashes: list[int]
    num_queried: int
    num_new: int
    num_evictable_hits: int


class BlockManager:
    """Hands out KV-cache blocks to sequences, sharing and caching full prompt blocks.

    Every block is in exactly one of three states: free (unhashed, ref count 0),
    evictable (hashed, ref count 0, kept in LRU order) or referenced by one or
    more live sequences. Every mutating call either succeeds completely or
    raises leaving the manager unchanged. Errors about ``seq_id`` are
    ``KeyError``; impossible arguments are ``ValueError``.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        """Create a cache of ``num_blocks`` blocks of ``block_size`` slots, all free."""
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = BlockManagerStats()
        self._ref = [0] * num_blocks
        self._block_hash: list[int | None] = [None] * num_blocks
        self._hash_to_block: dict[int, int] = {}
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._seqs: dict[int, _SeqState] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now: free ones plus cached ones no sequence holds."""
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of all blocks referenced by live sequences (cached-but-idle blocks count as unused)."""
        return (self.num_blocks - self.num_free_blocks) / self.num_blocks

    def can_allocate(self, token_ids: Sequence[int]) -> bool:
        """Whether ``allocate`` of this prompt would succeed now, counting prefix-cache reuse."""
        plan = self._plan(token_ids)
        return plan.num_new <= self.num_free_blocks - plan.num_evictable_hits

    def allocate(self, seq_id: int, token_ids: Sequence[int], reuse_prefix: bool = True) -> int:
        """Give ``seq_id`` blocks for all of ``token_ids``; return how many leading tokens are already cached.

        ``reuse_prefix=False`` computes every token afresh (capture of prompt attention
        needs every prompt token's query).

        The returned count is a multiple of ``block_size`` and at most
        ``len(token_ids) - 1``: the block holding the last prompt token is never
        reused, so the model always computes at least one token (it needs its
        logits). Raises ``NoFreeBlocksError`` with nothing changed if the
        blocks are not available.
        """
        if seq_id in self._seqs:
            raise KeyError(f"sequence {seq_id} is already allocated")
        plan = self._plan(token_ids, reuse_prefix)
        if plan.num_new > self.num_free_blocks - plan.num_evictable_hits:
            raise NoFreeBlocksError(
                f"sequence {seq_id} needs {plan.num_new} new blocks, "
                f"{self.num_free_blocks - plan.num_evictable_hits} available"
            )
        for block_id in plan.hit_blocks:
            if self._ref[block_id] == 0:
                del self._evictable[block_id]
            self._ref[block_id] += 1
        new_blocks = self._take_blocks(plan.num_new)
        self._seqs[seq_id] = _SeqState(
            block_ids=plan.hit_blocks + new_blocks,
            num_tokens=len(token_ids),
            block_hashes=plan.hit_hashes,
        )
        self.stats.prefix_hit_blocks += len(plan.hit_blocks)
        self.stats.prefix_queried_blocks += plan.num_queried
        return len(plan.hit_blocks) * self.block_size

    def can_append(self, seq_id: int, num_new_tokens: int = 1) -> bool:
        """Whether ``seq_id`` can grow by ``num_new_tokens`` tokens beyond the count it is sized for."""
        state = self._state(seq_id)
        return self._blocks_needed(state, state.num_tokens + num_new_tokens) <= self.num_free_blocks

    def append_slots(self, seq_id: int, num_total_tokens: int) -> None:
        """Grow ``seq_id``'s table so it holds ``num_total_tokens`` tokens; never shrinks it.

        Raises ``NoFreeBlocksError`` with nothing changed if the new blocks are
        not available.
        """
        state = self._state(seq_id)
        needed = self._blocks_needed(state, num_total_tokens)
        if needed > self.num_free_blocks:
            raise NoFreeBlocksError(
                f"sequence {seq_id} needs {needed} new blocks, {self.num_free_blocks} available"
            )
        state.extend(self._take_blocks(needed))
        state.num_tokens = max(state.num_tokens, num_total_tokens)

    def mark_computed(self, seq_id: int, token_ids: Sequence[int], num_computed: int) -> None:
        """Record that KV of the first ``num_computed`` of ``token_ids`` is written; cache newly full blocks.

        ``token_ids`` is the sequence's whole token list so far. A block whose
        content is already cached in another block stays unregistered (the
        first copy wins) and is simply freed with its sequence.
        """
        state = self._state(seq_id)
        if not 0 <= num_computed <= min(len(token_ids), state.num_tokens):
            raise ValueError(
                f"num_computed={num_computed} must be within 0..{min(len(token_ids), state.num_tokens)} "
                f"(tokens given / tokens allocated for sequence {seq_id})"
            )
        if not self.enable_prefix_caching:
            return
        size = self.block_size
        parent = state.block_hashes[-1] if state.block_hashes else None
        for index in range(len(state.block_hashes), num_computed // size):
            parent = hash((parent, tuple(token_ids[index * size : (index + 1) * size])))
            state.block_hashes.append(parent)
            block_id = state.block_ids[index]
            if parent not in self._hash_to_block:
                self._hash_to_block[parent] = block_id
                self._block_hash[block_id] = parent

    def free(self, seq_id: int) -> None:
        """Release ``seq_id``'s blocks; blocks other sequences hold stay, hashed ones stay cached.

        Blocks are released last-first so that, among one sequence's blocks,
        the tail is evicted before the more widely shareable prefix.
        """
        state = self._seqs.pop(seq_id, None)
        if state is None:
            raise KeyError(f"sequence {seq_id} is not allocated (unknown seq_id or double free)")
        for block_id in reversed(state.block_ids):
            self._ref[block_id] -= 1
            if self._ref[block_id] == 0:
                if self._block_hash[block_id] is None:
                    self._free.append(block_id)
                else:
                    self._evictable[block_id] = None

    def block_table(self, seq_id: int) -> list[int]:
        """Physical block ids of ``seq_id`` in logical order (a copy)."""
        return list(self._state(seq_id).block_ids)

    def block_table_array(self, seq_id: int) -> np.ndarray:
        """The same as an int32 array: a read-only view, valid until the sequence grows or is freed."""
        state = self._state(seq_id)
        view = state.table[: len(state.block_ids)]
        view.flags.writeable = False
        return view

    def slot(self, seq_id: int, position: int) -> int:
        """Physical KV slot of logical token ``position`` of ``seq_id``."""
        state = self._state(seq_id)
        if not 0 <= position < state.num_tokens:
            raise IndexError(f"position {position} outside sequence {seq_id} of {state.num_tokens} tokens")
        return state.block_ids[position // self.block_size] * self.block_size + position % self.block_size

    def slots(self, seq_id: int, start: int, end: int) -> list[int]:
        """Physical KV slots of logical positions ``start..end-1`` of ``seq_id``."""
        state = self._state(seq_id)
        if not 0 <= start <= end <= state.num_tokens:
            raise IndexError(
                f"range {start}..{end} outside sequence {seq_id} of {state.num_tokens} tokens"
            )
        size = self.block_size
        return [state.block_ids[pos // size] * size + pos % size for pos in range(start, end)]

    def _state(self, seq_id: int) -> _SeqState:
        """The live state of ``seq_id``, or a ``KeyError`` naming it."""
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"sequence {seq_id} is not allocated") from None

    def _blocks_needed(self, state: _SeqState, num_total_tokens: int) -> int:
        """New blocks ``state`` needs to hold ``num_total_tokens`` tokens (0 if it already can)."""
        return max(0, -(-num_total_tokens // self.block_size) - len(state.block_ids))

    def _plan(self, token_ids: Sequence[int], reuse_prefix: bool = True) -> _Plan:
        """Look up the cached prefix of ``token_ids`` and count the fresh blocks it would need."""
        if len(token_ids) == 0:
            raise ValueError("cannot allocate a sequence with no tokens")
        size = self.block_size
        total = -(-len(token_ids) // size)
        hit_blocks: list[int] = []
        hit_hashes: list[int] = []
        num_queried = 0
        if self.enable_prefix_caching and reuse_prefix:
            num_queried = (len(token_ids) - 1) // size
            parent: int | None = None
            for index in range(num_queried):
                parent = hash((parent, tuple(token_ids[index * size : (index + 1) * size])))
                block_id = self._hash_to_block.get(parent)
                if block_id is None:
                    break
                hit_blocks.append(block_id)
                hit_hashes.append(parent)
        return _Plan(
            hit_blocks=hit_blocks,
            hit_hashes=hit_hashes,
            num_queried=num_queried,
            num_new=total - len(hit_blocks),
            num_evictable_hits=sum(1 for block_id in hit_blocks if self._ref[block_id] == 0),
        )

    def _take_blocks(self, count: int) -> list[int]:
        """Pop ``count`` blocks, free ones first, then evicting least recently used cached ones.

        The caller has checked that ``count <= num_free_blocks``.
        """
        taken: list[int] = []
        for _ in range(count):
            if self._free:
                block_id = self._free.popleft()
            else:
                block_id, _ = self._evictable.popitem(last=False)
                del self._hash_to_block[self._block_hash[block_id]]
                self._block_hash[block_id] = None
                self.stats.evicted_blocks += 1
            self._ref[block_id] = 1
            taken.append(block_id)
        return taken


class SlotPositionMap:
    """Per sequence: for each used slot index in the sequence's table order, the logical token position it holds.

    The map is the identity (slot index i holds position i) until KV eviction
    drops entries and compacts the rest; attention capture uses it to report
    the logical positions of the keys a query attended to.
    """

    def __init__(self) -> None:
        """Start empty: the sequence has no slots in use yet."""
        self._positions: list[int] = []

    def append(self, positions: Iterable[int]) -> None:
        """Record that the next slot indices, in order, hold these logical positions."""
        self._positions.extend(positions)

    def positions(self) -> list[int]:
        """Logical position held by each used slot index, in slot order (a copy)."""
        return list(self._positions)

    def remove(self, indices: Iterable[int]) -> None:
        """Drop the entries at these slot indices (eviction); later entries shift down to close the gaps."""
        drop = set(indices)
        bad = [i for i in drop if not 0 <= i < len(self._positions)]
        if bad:
            raise IndexError(f"slot indices {sorted(bad)} outside 0..{len(self._positions) - 1}")
        self._positions = [pos for i, pos in enumerate(self._positions) if i not in drop]
