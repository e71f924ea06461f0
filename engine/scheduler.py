"""Continuous batching: which sequences run in the next step, and how many tokens each.

Each step has a token budget. Running sequences go first (one token each when
decoding, a chunk when their prompt is still being prefilled); waiting sequences are
then admitted in arrival order while blocks and budget last, their prompts prefilled
in chunks if longer than what is left of the budget. When the KV cache runs out,
the most recently arrived running sequence is preempted: its blocks are freed and it
waits at the head of the queue to be recomputed (its cached prefix blocks usually
survive in the prefix cache). Admission is strictly first-come first-served, so no
request starves.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from attnscope.engine.block_manager import BlockManager, NoFreeBlocksError
from attnscope.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one step."""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64


@dataclass
class ScheduledChunk:
    """``num_tokens`` tokens of ``seq`` starting at ``seq.num_computed_tokens`` run this step."""

    seq: Sequence
    num_tokens: int

    @property
    def start(self) -> int:
        """Logical position of the chunk's first token."""
        return self.seq.num_computed_tokens

    @property
    def samples(self) -> bool:
        """True when the chunk reaches the sequence's last token, so a new token is sampled."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class StepPlan:
    """The chunks of one step (prefill chunks first, then single-token decodes) and who was preempted."""

    chunks: list[ScheduledChunk]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        """Tokens the model processes this step."""
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    """Owns the waiting and running queues and the block manager."""

    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence behind those already waiting."""
        self.waiting.append(seq)

    def has_work(self) -> bool:
        """True while any sequence waits or runs."""
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        """Plan the next step."""
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        scheduled: list[Sequence] = []
        queue = list(self.running)
        while queue:
            seq = queue.pop(0)
            if budget == 0 or seq.final_pending:
                scheduled.append(seq)
                continue
            n = min(seq.num_uncomputed, budget)
            while not self._reserve(seq, n):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq in preempted:
                continue
            chunks.append(ScheduledChunk(seq, n))
            scheduled.append(seq)
            budget -= n
        self.running = scheduled
        if not preempted:
            budget = self._admit(chunks, budget)
        chunks.sort(key=lambda c: c.num_tokens == 1 and c.samples)
        return StepPlan(chunks, preempted)

    def _admit(self, chunks: list[ScheduledChunk], budget: int) -> int:
        """Move waiting sequences into the running set, first come first served."""
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            try:
                cached = self.blocks.allocate(seq.seq_id, seq.all_token_ids,
                                              reuse_prefix=seq.capture is None or not seq.capture.needs_all_rows)
            except NoFreeBlocksError:
                break
            self.waiting.popleft()
            seq.num_computed_tokens = cached
            if not seq.output_token_ids:
                seq.num_cached_prompt_tokens = cached
            seq.status = SequenceStatus.RUNNING
            n = min(seq.num_uncomputed, budget)
            chunks.append(ScheduledChunk(seq, n))
            self.running.append(seq)
            budget -= n
        return budget

    def _reserve(self, seq: Sequence, num_new: int) -> bool:
        """Make room in the cache for ``num_new`` more tokens of a running sequence."""
        try:
            self.blocks.append_slots(seq.seq_id, seq.num_computed_tokens + num_new)
        except NoFreeBlocksError:
            return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and put it back at the head of the queue for recompute."""
        self.blocks.free(seq.seq_id)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (stop, length or abort) and release its blocks; tokens still pending are dropped.

        Blocks a launched step still uses may be handed out again at once: that step's
        kernels run before any later step's on the device's stream.
        """
        if seq.finished:
            return
        seq.drop_pending()
        if seq.status is SequenceStatus.RUNNING:
            self.blocks.free(seq.seq_id)
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
