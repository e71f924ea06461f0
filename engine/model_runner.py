"""Turns a scheduled step into model inputs, runs the model, returns the logits to sample."""

from __future__ import annotations

import torch

from attnscope.engine.attention import AttentionBatch, PrefillChunk
from attnscope.engine.block_manager import BlockManager
from attnscope.engine.capture_plan import CaptureRow, StepCapture
from attnscope.engine.kv_cache import allocate_kv_cache
from attnscope.engine.model import LlamaForCausalLM
from attnscope.engine.scheduler import ScheduledChunk, StepPlan


class ModelRunner:
    """Owns the model and its KV cache on one device."""

    def __init__(self, model: LlamaForCausalLM, blocks: BlockManager, num_blocks: int, block_size: int,
                 kv_dtype: torch.dtype, device: torch.device) -> None:
        self.model = model
        self.blocks = blocks
        self.block_size = block_size
        self.device = device
        heads = model.heads
        self.kv_caches = allocate_kv_cache(model.config.num_layers, num_blocks, block_size,
                                           len(heads.kv_heads), model.config.head_dim, kv_dtype, device)

    def execute(self, plan: StepPlan) -> tuple[torch.Tensor, StepCapture | None]:
        """Run one step; float32 logits ``[num_sampling_chunks, vocab]`` in plan order, and what was captured."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        prefills: list[PrefillChunk] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        sample_rows: list[int] = []
        capture = StepCapture()
        for chunk in plan.chunks:
            seq = chunk.seq
            start, end = chunk.start, chunk.start + chunk.num_tokens
            offset = len(input_ids)
            input_ids.extend(seq.all_token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(self.blocks.slots(seq.seq_id, start, end))
            table = self.blocks.block_table(seq.seq_id)
            if seq.capture is not None:
                self._plan_capture(capture, chunk, offset, table)
            if chunk.num_tokens == 1 and chunk.samples:
                decode_tables.append(table)
                decode_lens.append(end)
            else:
                prefills.append(PrefillChunk(offset, offset + chunk.num_tokens, start,
                                             torch.tensor(table, dtype=torch.long, device=self.device)))
            if chunk.samples:
                sample_rows.append(len(input_ids) - 1)
        batch = AttentionBatch(
            slot_mapping=self._tensor(slots),
            prefills=prefills,
            decode_start=len(input_ids) - len(decode_lens),
            decode_block_tables=self._block_table_tensor(decode_tables),
            decode_context_lens=torch.tensor(decode_lens, dtype=torch.int32, device=self.device),
            kv_caches=self.kv_caches,
            capture=None if capture.empty else capture,
            rope=(self.model.rope.cos, self.model.rope.sin),
        )
        hidden = self.model(self._tensor(input_ids), self._tensor(positions), batch)
        return self.model.logits(hidden[self._tensor(sample_rows)]), batch.capture

    @staticmethod
    def _plan_capture(capture: StepCapture, chunk: ScheduledChunk, offset: int, table: list[int]) -> None:
        """Register the chunk's captured query rows: decode steps and, when asked, prompt tokens.

        A row at a position already captured (recomputed after preemption) is not captured again.
        """
        seq = chunk.seq
        cap = seq.capture
        tokens = seq.all_token_ids
        prompt_len = len(seq.prompt_token_ids)
        for i in range(chunk.num_tokens):
            position = chunk.start + i
            if position < cap.rows_upto:
                continue
            sampling = chunk.samples and i == chunk.num_tokens - 1
            if sampling:
                step = len(seq.output_token_ids)
                if not cap.wants_step(step):
                    continue
                cap.steps_captured += 1
            elif position < prompt_len - 1 and cap.needs_all_rows:
                step = None
            else:
                continue
            cap.rows_upto = position + 1
            capture.add(CaptureRow(seq, offset + i, position, step, cap.think_phase(tokens, position + 1), table))

    def _tensor(self, values: list[int]) -> torch.Tensor:
        """An int64 tensor on the model's device."""
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _block_table_tensor(self, tables: list[list[int]]) -> torch.Tensor:
        """Block tables padded with block 0 into ``[B, max_blocks]`` int32."""
        width = max((len(t) for t in tables), default=1)
        padded = [t + [0] * (width - len(t)) for t in tables]
        return torch.tensor(padded, dtype=torch.int32, device=self.device).reshape(len(tables), width)
