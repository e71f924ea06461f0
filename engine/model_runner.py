"""Turns a scheduled step into model inputs (``prepare_step``) and runs the model on them (``ModelRunner``).

The two halves are apart so that a tensor-parallel engine prepares a step once, on the
driver that owns the scheduler and the block tables, and ships the plain ``StepInputs``
(plus the sequence-free capture plan) to every rank.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from attnscope.engine.attention import AttentionBatch, CachedPrefills, PrefillChunk, runs_paged_prefill
from attnscope.engine.block_manager import BlockManager
from attnscope.capture import CaptureParams
from attnscope.engine.capture_plan import CaptureRow, StepCapture, block_table_tensor, layer_needs
from attnscope.engine.decode_graphs import DecodeGraphs
from attnscope.engine.kv_cache import allocate_kv_cache
from attnscope.engine.model import LlamaForCausalLM
from attnscope.engine.device_values import read_pending_tokens
from attnscope.engine.scheduler import ScheduledChunk, StepPlan
from attnscope.kernels.decode_matmul import MAX_ROWS, variant_rows

logger = logging.getLogger(__name__)


@dataclass
class StepInputs:
    """One step's flattened tokens and where they live in the KV cache (plain lists, cheap to ship)."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    prefills: list[tuple[int, int, int, np.ndarray]] = field(default_factory=list)  # start, end, cached, table
    decode_tables: list[np.ndarray] = field(default_factory=list)  # int32 block tables
    decode_lens: list[int] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)
    # Per input token: the row of the previous step's sampled tokens (still on the device) that
    # holds its value, or -1 (its value is in input_ids). Empty when no input is pending.
    token_sources: list[int] = field(default_factory=list)


def prepare_step(plan: StepPlan, blocks: BlockManager,
                 pending_rows: dict[int, int] | None = None) -> tuple[StepInputs, StepCapture | None]:
    """The step's model inputs and its capture plan (``None`` when nothing is captured).

    ``pending_rows`` maps a sequence id to its row in the previous step's sampled tokens
    when its last token is still pending (only a decode chunk may end there): the input
    then reads the token on the device (``token_sources``).
    """
    inputs = StepInputs()
    capture = StepCapture()
    for chunk in plan.chunks:
        seq = chunk.seq
        start, end = chunk.start, chunk.start + chunk.num_tokens
        offset = len(inputs.input_ids)
        inputs.input_ids.extend(seq.all_token_ids[start:end])
        if pending_rows:
            source = pending_rows.get(seq.seq_id, -1) if seq.num_pending and end == seq.num_tokens else -1
            if source >= 0 and chunk.num_tokens != 1:
                raise ValueError(f"sequence {seq.seq_id}: a prefill chunk cannot read a pending token")
            inputs.token_sources.extend([-1] * (chunk.num_tokens - 1))
            inputs.token_sources.append(source)
        inputs.positions.extend(range(start, end))
        inputs.slots.extend(blocks.slots(seq.seq_id, start, end))
        table = blocks.block_table_array(seq.seq_id)
        if seq.capture is not None:
            _plan_capture(capture, chunk, offset, table)
        if chunk.num_tokens == 1 and chunk.samples:
            inputs.decode_tables.append(table)
            inputs.decode_lens.append(end)
        else:
            inputs.prefills.append((offset, offset + chunk.num_tokens, start, table))
        if chunk.samples:
            inputs.sample_rows.append(len(inputs.input_ids) - 1)
    return inputs, None if capture.empty else capture


def _plan_capture(capture: StepCapture, chunk: ScheduledChunk, offset: int, table: np.ndarray) -> None:
    """Register the chunk's captured query rows: decode steps and, when asked, prompt tokens.

    A row at a position already captured (recomputed after preemption) is not captured again,
    nor a row before the request's ``mask_prefix``: its keys are all masked, so it has nothing to
    report (and its decode step does not count against ``max_steps``).
    """
    seq = chunk.seq
    cap = seq.capture
    prompt_len = len(seq.prompt_token_ids)
    end = chunk.start + chunk.num_tokens
    first = chunk.start if cap.needs_all_rows else end - 1  # else only a sampling row can be captured
    for position in range(max(first, cap.rows_upto, cap.params.mask_prefix), end):
        i = position - chunk.start
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
        capture.add(CaptureRow(seq, offset + i, position, step, table))


class ModelRunner:
    """Owns the model (one rank's shard of it) and its KV cache on one device.

    With ``cuda_graphs`` on a CUDA device, pure decode steps of up to ``max_num_seqs``
    sequences replay CUDA graphs (``DecodeGraphs``; the no-capture graphs are recorded here,
    the eager steps' kernels compiled by throwaway steps, and with ``warm_capture`` the capture
    kernels those graphs launch are compiled here); other steps run eagerly. On a
    tensor-parallel rank a graph computes the rank's partial captures, which the rank worker
    then sums across ranks.
    """

    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, kv_dtype: torch.dtype,
                 device: torch.device, cuda_graphs: bool = False, max_num_seqs: int = 1,
                 warm_capture: bool = False) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        self.kv_caches = allocate_kv_cache(model.config.num_layers, num_blocks, block_size,
                                           len(model.heads.kv_heads), model.config.head_dim, kv_dtype, device)
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs and device.type == "cuda":
            max_len = min(model.rope.cos.shape[0], num_blocks * block_size)
            self.graphs = DecodeGraphs(model, self.kv_caches, max_num_seqs, -(-max_len // block_size), device)
            self.graphs.record_plain()
            self._warm_eager_steps()
            if warm_capture:
                self._warm_capture()

    def _warm_eager_steps(self) -> None:
        """Run throwaway eager steps at start-up, so the kernels only eager steps launch are compiled before the
        first prompt arrives (Triton compiles at first launch, seconds each). Each holds a new prompt, a prompt
        continuing a cached prefix (the paged prefill kernel) and a decode row, and samples every row; their
        sizes reach every variant of the decode matmul kernels (``decode_matmul.variant_rows``: the decode
        graphs launch only their buckets' sizes), and the last has too many rows for them
        (``decode_matmul.MAX_ROWS``: torch matmuls and the separate SiLU kernel). Every slot is ``-1``: nothing
        is written to the cache, and what the steps read there is discarded with their logits. Positions wrap at
        the rope tables' length (a short ``max_model_len``)."""
        started = time.perf_counter()
        max_positions = self.model.rope.cos.shape[0]
        cached, continued = 2, 2  # a continuation runs the paged prefill kernel when cached >= its length
        for tokens in (*variant_rows(), MAX_ROWS + continued + 1):
            new_prompt = tokens - continued - 1
            table = np.zeros(-(-max(new_prompt, cached + continued) // self.block_size), dtype=np.int32)
            positions = [*range(new_prompt), *range(cached, cached + continued), 0]
            inputs = StepInputs(
                input_ids=[0] * tokens, positions=[p % max_positions for p in positions], slots=[-1] * tokens,
                prefills=[(0, new_prompt, 0, table), (new_prompt, new_prompt + continued, cached, table)],
                decode_tables=[table], decode_lens=[1], sample_rows=list(range(tokens)))
            self.run(inputs, None)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        logger.info("eager step kernels compiled in %.1f s", time.perf_counter() - started)

    def _warm_capture(self) -> int:
        """Compile the capture kernels of the decode graphs at start-up (``DecodeGraphs.warm_capture``): for
        ``last`` and ``auto`` layers, what fingerprint, raw and sketch requests need of a layer. Returns how
        many forwards ran."""
        started = time.perf_counter()
        logger.info("compiling the capture kernels for the decode graphs (warm_capture; seconds per kernel variant)")
        num_layers = self.model.config.num_layers
        layer_sets = [CaptureParams(layers=layers).resolve_layers(num_layers) for layers in ("last", "auto")]
        needs = sorted({layer_needs(CaptureParams(mode=mode)) for mode in ("fingerprint", "raw", "sketch")})
        runs = self.graphs.warm_capture(layer_sets, needs)
        logger.info("capture kernels compiled for the decode graphs: %d forwards in %.1f s", runs,
                    time.perf_counter() - started)
        return runs

    def run(self, inputs: StepInputs, capture: StepCapture | None,
            previous_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Run one step; float32 logits ``[len(sample_rows), vocab]``. Fills ``capture``'s results.

        ``previous_tokens`` (the previous step's sampled ids, on the device) supplies the
        inputs ``inputs.token_sources`` points at, so the host need not have read them.
        """
        if self.graphs is not None:
            logits = self.graphs.run(inputs.input_ids, inputs.positions, inputs.slots, inputs.decode_tables,
                                     inputs.decode_lens, len(inputs.prefills), capture,
                                     inputs.token_sources, previous_tokens)
            if logits is not None:
                return logits
        shapes = self.graphs.shapes if self.graphs is not None else None
        if capture is not None:
            capture.finalize(self.device, shapes)
        batch = AttentionBatch(
            slot_mapping=self._tensor(inputs.slots),
            prefills=[PrefillChunk(start, end, cached, torch.tensor(table, dtype=torch.long, device=self.device))
                      for start, end, cached, table in inputs.prefills],
            decode_start=len(inputs.input_ids) - len(inputs.decode_lens),
            decode_block_tables=block_table_tensor(inputs.decode_tables, self.device,
                                                   width=shapes.width if shapes else 0),
            decode_context_lens=torch.tensor(inputs.decode_lens, dtype=torch.int32, device=self.device),
            kv_caches=self.kv_caches,
            capture=capture,
            rope=(self.model.rope.cos, self.model.rope.sin),
            q_heads=self.model.heads.q_heads if self.model.tp.size > 1 else None,
            cached_prefills=self._cached_prefills(inputs) if self.device.type == "cuda" else None,
            decode_num_splits=(shapes.num_splits(len(inputs.decode_lens), *self.kv_caches[0][0].shape[2:],
                                                 self.block_size, self.device) if shapes else None),
            capture_launch_rows=shapes.launch_rows if shapes else None,
        )
        input_ids = self._tensor(inputs.input_ids)
        if inputs.token_sources:
            input_ids = read_pending_tokens(input_ids, self._tensor(inputs.token_sources), previous_tokens)
        hidden = self.model(input_ids, self._tensor(inputs.positions), batch)
        return self.model.logits(hidden[self._tensor(inputs.sample_rows)])

    def _cached_prefills(self, inputs: StepInputs) -> CachedPrefills | None:
        """The prefill chunks the paged prefill kernel runs (``runs_paged_prefill``), packed for it (one copy each)."""
        chunks = [(start, end - start, cached, table) for start, end, cached, table in inputs.prefills
                  if runs_paged_prefill(cached, end - start)]
        if not chunks:
            return None
        columns = np.array([c[:3] for c in chunks], dtype=np.int32).T.copy()
        q_starts, q_lens, cached = (torch.from_numpy(c).to(self.device) for c in columns)
        return CachedPrefills(block_table_tensor([c[3] for c in chunks], self.device), q_starts, q_lens, cached,
                              int(columns[1].max()))

    def check_health(self) -> None:
        """Nothing remote to check on one device (the tensor-parallel runner pings its workers here)."""

    def shutdown(self) -> None:
        """Nothing to release on one device (the tensor-parallel runner stops its workers here)."""

    def _tensor(self, values: list[int]) -> torch.Tensor:
        """An int64 tensor on the model's device."""
        return torch.tensor(values, dtype=torch.long, device=self.device)
