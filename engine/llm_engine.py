"""``LLMEngine``: requests in, streamed per-request deltas out, continuous batching in between.

The engine is driven step by step: ``step()`` schedules, runs the model once, samples,
detokenises and returns what each request produced. ``generate()`` drives it to
completion for a batch of prompts; ``start()`` runs the step loop on a background
thread so ``stream()`` can serve many concurrent requests from asyncio code.

Two locks keep an asyncio caller from ever waiting for a model step: the step lock is
held by ``step()`` for the whole step (scheduler, KV blocks, model), while the short
state lock guards only the request table, the inbox of new sequences and aborts, and
each request's output queue. ``add_request`` and ``abort`` put work in the inbox, which
the next step moves into the scheduler; ``stream`` drains its queue under the state
lock alone.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import itertools
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence as SequenceOf
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import torch
from pydantic import BaseModel, ValidationError

from attnscope.capture import CaptureParams
from attnscope.engine.block_manager import BlockManager
from attnscope.engine.capture_records import append_full_rows, full_capture_data, pack_results, step_records
from attnscope.engine.capture_plan import StepCapture
from attnscope.engine.capture_state import SequenceCapture, ThinkTags
from attnscope.engine.device_values import copy_to_host
from attnscope.engine.engine_config import EngineConfig
from attnscope.engine.kv_cache import kv_cache_blocks
from attnscope.engine.model import LlamaForCausalLM
from attnscope.engine.model_runner import ModelRunner, prepare_step

if TYPE_CHECKING:
    from attnscope.engine.process_tensor_parallel import ProcessTensorParallelRunner
    from attnscope.engine.tensor_parallel_runner import TensorParallelRunner

    Runner = ModelRunner | TensorParallelRunner | ProcessTensorParallelRunner
from attnscope.engine.outputs import (
    CompletionDelta,
    EngineStats,
    FinalOutput,
    RequestOutput,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from attnscope.engine.sampler import PendingSample, Sampler, SamplingInputs, make_generator
from attnscope.engine.scheduler import Scheduler, SchedulerConfig, StepPlan
from attnscope.engine.sequence import Sequence
from attnscope.engine.stop import StopStringText
from attnscope.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from attnscope.engine.weights import LoadedCheckpoint, default_model_path, load_checkpoint
from attnscope.sampling import SamplingParams


ModelT = TypeVar("ModelT", bound=BaseModel)


class InvalidRequestError(ValueError):
    """A request the engine refuses; ``field`` names the offending input."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class _Choice:
    """Per-sequence output state: detokeniser, stop-string buffer, pending tokens."""

    seq: Sequence
    detokenizer: IncrementalDetokenizer
    text: StopStringText
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    pending_attention: list[dict] = field(default_factory=list)
    reported: bool = False


@dataclass
class _Request:
    """A request's sequences and the outputs waiting for its consumer."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    choices: list[_Choice]
    retain: bool = False
    outputs: deque[RequestOutput] = field(default_factory=deque)
    done: threading.Event = field(default_factory=threading.Event)
    wake: asyncio.Event | None = None
    loop: asyncio.AbstractEventLoop | None = None

    def notify(self) -> None:
        """Wake the request's stream consumer, if one is still listening (its event loop may be gone)."""
        if self.wake is not None and self.loop is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self.wake.set)
            except RuntimeError:
                pass

    @property
    def finished(self) -> bool:
        """True when every choice has ended."""
        return all(c.seq.finished for c in self.choices)

    def usage(self) -> Usage:
        """Token counts so far."""
        return Usage(
            prompt_tokens=len(self.prompt_token_ids),
            completion_tokens=sum(c.seq.num_known_outputs for c in self.choices),
            cached_prompt_tokens=self.choices[0].seq.num_cached_prompt_tokens,
        )


@dataclass
class _LaunchedStep:
    """A step whose device work is queued, and what the host needs to finish it once the device is done.

    ``output_indices[i]`` is where ``sampling[i]``'s sampled token goes among its outputs
    (counted as pending until then); ``packed`` the host copy (in flight) of the capture results.
    """

    sampling: list[Sequence]
    output_indices: list[int]
    sample: PendingSample
    capture: StepCapture | None
    packed: torch.Tensor | None


atexit.register(gc.unfreeze)  # the exit's last collection then also sees what engines froze (see close)


class LLMEngine:
    """A continuous-batching inference engine over a paged KV cache."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        # A tensor-parallel driver holds no weights: it schedules and samples on the CPU.
        self.device = torch.device("cpu") if config.tensor_parallel_size > 1 else config.resolved_device()
        self.dtype = config.resolved_dtype(self.device)
        threads = config.host_threads(self.device)
        if threads is not None:
            torch.set_num_threads(threads)
        checkpoint = load_checkpoint(config.model or default_model_path(), config.load_format)
        self.model_config = checkpoint.config
        self.tokenizer = _load_tokenizer(checkpoint)
        self.eos_token_ids = frozenset(self.tokenizer.stop_token_ids) | frozenset(self.model_config.eos_token_ids)
        self.think_tags = self._think_tags()
        self.runner, num_blocks = self._make_runner(checkpoint)
        capacity = num_blocks * config.block_size
        self.max_model_len = min(config.max_model_len or self.model_config.max_position_embeddings,
                                 self.model_config.max_position_embeddings, capacity)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs), self.blocks)
        self.sampler = Sampler()
        self._requests: dict[str, _Request] = {}
        self._inbox: list[_Request] = []
        self._active: dict[str, _Request] = {}
        self._aborts: list[_Request] = []
        self._launched: _LaunchedStep | None = None
        overlap = config.overlap_steps if config.overlap_steps is not None else self.device.type == "cuda"
        self.overlap_steps = overlap and isinstance(self.runner, ModelRunner)
        """Whether steps overlap (see ``step``); may be switched between steps (on only with one device)."""
        self._seq_ids = itertools.count()
        self._lock = threading.RLock()
        self._state = threading.Lock()
        self._work = threading.Condition(self._state)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._error: BaseException | None = None
        gc.collect()
        gc.freeze()  # the start-up heap (modules, model, tokenizer, graphs) is never garbage: see close()

    def _think_tags(self) -> ThinkTags:
        """Think-tag token ids from the config, else the vocabulary's ``<think>``/``</think>``."""
        def lookup(configured: list[int] | None, text: str) -> frozenset[int]:
            if configured is not None:
                return frozenset(configured)
            token_id = self.tokenizer.backend.token_to_id(text)
            return frozenset() if token_id is None else frozenset([token_id])

        return ThinkTags(lookup(self.config.think_start_token_ids, "<think>"),
                         lookup(self.config.think_end_token_ids, "</think>"))

    def _make_runner(self, checkpoint: LoadedCheckpoint) -> tuple[Runner, int]:
        """The model on this device, or rank workers holding its shards when ``tensor_parallel_size > 1``,
        and the number of KV blocks (sized after the weights are loaded)."""
        if self.config.tensor_parallel_size > 1:
            if self.config.tensor_parallel_backend == "processes":
                from attnscope.engine.process_tensor_parallel import ProcessTensorParallelRunner

                runner = ProcessTensorParallelRunner(self.config)
            else:
                from attnscope.engine.tensor_parallel_runner import TensorParallelRunner

                runner = TensorParallelRunner(self.config)
            return runner, runner.num_blocks
        model = self._load_model(checkpoint)
        num_blocks = self._num_kv_blocks()
        runner = ModelRunner(model, num_blocks, self.config.block_size, self.dtype, self.device,
                             self.config.cuda_graphs, self.config.max_num_seqs, self.config.warm_capture)
        return runner, num_blocks

    def _load_model(self, checkpoint: LoadedCheckpoint) -> LlamaForCausalLM:
        """Build the model on the target device and stream the checkpoint's weights into it."""
        max_positions = min(self.config.max_model_len or self.model_config.max_position_embeddings,
                            self.model_config.max_position_embeddings)
        with torch.device(self.device):
            model = LlamaForCausalLM(self.model_config, dtype=self.dtype, max_positions=max_positions)
        model.load_weights(checkpoint.tensors(self.dtype, self.device))
        return model.eval()

    def _num_kv_blocks(self) -> int:
        """Size the KV cache from the configured block count or memory budget."""
        c = self.model_config
        return kv_cache_blocks(self.config, c.num_layers, c.num_kv_heads, c.head_dim, self.dtype, self.device)

    # ----------------------------------------------------------------- requests

    def add_request(
        self,
        prompt: str | None = None,
        *,
        prompt_token_ids: SequenceOf[int] | None = None,
        messages: list[dict] | None = None,
        params: SamplingParams | dict | None = None,
        capture: CaptureParams | dict | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a request given as text, token ids or chat messages; returns its id.

        ``capture`` asks for attention capture (see ``attnscope.capture.CaptureParams``);
        its records arrive in the deltas' ``attention_tokens`` (``attn_capture_data`` for
        the full mode). Raises ``InvalidRequestError`` (naming the field) for anything the
        engine cannot serve; nothing is queued then.
        """
        params = _validated(SamplingParams, params, "")
        ids = self.tokenize_prompt(prompt, prompt_token_ids, messages)
        capture = self._validate_capture(capture, len(ids), params)
        request_id = request_id or uuid.uuid4().hex
        choices = []
        for index in range(params.n):
            seed = None if params.seed is None else params.seed + index
            seq = Sequence(next(self._seq_ids), request_id, index, list(ids), params,
                           make_generator(seed, self.device))
            if capture is not None:
                seq.capture = SequenceCapture.create(capture, self.model_config.num_layers,
                                                     self.model_config.num_heads, self.think_tags)
            choices.append(_Choice(seq, IncrementalDetokenizer(self.tokenizer, list(ids)), StopStringText(params.stop)))
        with self._state:
            if request_id in self._requests:
                raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
            self._requests[request_id] = _Request(request_id, list(ids), params, choices,
                                                  retain=self._thread is not None)
            self._inbox.append(self._requests[request_id])
            self._work.notify_all()
        return request_id

    def tokenize_prompt(self, prompt: str | None = None, prompt_token_ids: SequenceOf[int] | None = None,
                        messages: list[dict] | None = None) -> list[int]:
        """Token ids of exactly one of the three prompt forms, checked against the context limit.

        ``add_request`` tokenises through here; callers that need the prompt's length
        first (to size ``max_tokens``, or to mask a system prompt) pass the ids on as
        ``prompt_token_ids`` and get the same request. Raises ``InvalidRequestError``.
        """
        given = [x is not None for x in (prompt, prompt_token_ids, messages)]
        if sum(given) != 1:
            raise InvalidRequestError("give exactly one of prompt, prompt_token_ids or messages", "prompt")
        if messages is not None:
            try:
                prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            except ValueError as exc:
                raise InvalidRequestError(str(exc), "messages") from exc
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        elif prompt is not None:
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt_token_ids)
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise InvalidRequestError(f"token id {bad[0]!r} is outside the vocabulary "
                                          f"[0, {self.model_config.vocab_size})", "prompt_token_ids")
        if not ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens but the context limit is {self.max_model_len} "
                "(prompt plus at least one generated token)", "prompt")
        return ids

    def _validate_capture(self, capture: CaptureParams | dict | None, prompt_len: int,
                          params: SamplingParams) -> CaptureParams | None:
        """Capture parameters checked against the model and limits (``InvalidRequestError`` naming the field)."""
        if capture is None:
            return None
        capture = _validated(CaptureParams, capture, "capture.")
        try:
            capture.resolve_layers(self.model_config.num_layers)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), "capture.layers") from exc
        try:
            capture.check_heads(self.model_config.num_heads)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), "capture.head_ids") from exc
        if capture.mode == "full" and prompt_len + params.max_tokens > self.config.max_full_capture_tokens:
            raise InvalidRequestError(
                f"full attention capture is limited to {self.config.max_full_capture_tokens} tokens "
                f"(prompt {prompt_len} + max_tokens {params.max_tokens})", "capture.mode")
        return capture

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks; unknown or finished ids are ignored.

        Never waits for a running step: the abort is applied at once when no step runs,
        else at the start of the next one. A request nobody streams yet is then forgotten:
        no one will read its outputs.
        """
        with self._state:
            req = self._requests.get(request_id)
            if req is None:
                return
            self._aborts.append(req)
            self._work.notify_all()
        if self._lock.acquire(blocking=False):
            try:
                self._take_inbox()
            finally:
                self._lock.release()

    def _take_inbox(self) -> None:
        """Move new sequences into the scheduler and apply pending aborts (step lock held)."""
        with self._state:
            for req in self._inbox:
                self._active[req.request_id] = req
                for choice in req.choices:
                    self.scheduler.add(choice.seq)
            self._inbox.clear()
            aborts, self._aborts = self._aborts, []
        for req in aborts:
            for choice in req.choices:
                if not choice.seq.finished:
                    self._finish(choice, "abort")
            self._publish(req)
            with self._state:
                if req.wake is None and self._requests.get(req.request_id) is req:
                    del self._requests[req.request_id]

    def has_unfinished(self) -> bool:
        """True while any request is queued or running."""
        with self._state:
            return self._has_work()

    def _has_work(self) -> bool:
        """True while sequences wait in the inbox or the scheduler, aborts are pending or a launched step
        waits to be finished (state lock held)."""
        return bool(self._inbox or self._aborts or self._launched) or self.scheduler.has_work()

    # ----------------------------------------------------------------- stepping

    def step(self) -> list[RequestOutput]:
        """Run one scheduling + model step; the outputs finished steps produced, one per advanced request.

        With overlapping steps (``EngineConfig.overlap_steps``) a step is launched before the
        previous one is finished: its decode inputs read the previous step's sampled tokens
        on the device, and the host reads those tokens, checks stops, builds capture records
        and publishes while the device runs the new step. So a call returns the previous
        step's outputs; a call with nothing new to launch returns the last ones. A sequence
        that stopped meanwhile ran one step too many; that token is dropped.
        """
        with self._lock:
            self._take_inbox()
            plan = self.scheduler.schedule()
            previous, self._launched = self._launched, None
            outputs: list[RequestOutput] = []
            if previous is not None and not self._can_overlap(plan):
                outputs = self._finish_step(previous)
                previous = None
                plan.chunks = [c for c in plan.chunks if not c.seq.finished]
            if not plan.chunks:
                return outputs + (self._finish_step(previous) if previous is not None else [])
            launched = self._launch(plan, previous)
            if previous is not None:
                outputs = self._finish_step(previous)  # host work while the device runs the new step
            for chunk in plan.chunks:
                if not chunk.seq.finished:
                    self.blocks.mark_computed(chunk.seq.seq_id, chunk.seq.all_token_ids, chunk.seq.num_computed_tokens)
            if self.overlap_steps and not (launched.capture is not None and launched.capture.full):
                self._launched = launched
                return outputs
            return outputs + self._finish_step(launched)

    def _can_overlap(self, plan: StepPlan) -> bool:
        """Whether ``plan`` can launch before the previous step's tokens are on the host.

        Not when a prefill chunk covers a pending token (only decode inputs read tokens on
        the device) or a sequence captures full matrices.
        """
        if not self.overlap_steps:
            return False
        for chunk in plan.chunks:
            seq = chunk.seq
            if seq.num_pending and chunk.num_tokens != 1:
                return False
            if seq.capture is not None and seq.capture.is_full:
                return False
        return True

    def _launch(self, plan: StepPlan, previous: _LaunchedStep | None) -> _LaunchedStep:
        """Queue a step's device work (forward, capture, sampling, host copies) and count its tokens as pending."""
        pending_rows = None if previous is None else {seq.seq_id: row for row, seq in enumerate(previous.sampling)}
        inputs, captured = prepare_step(plan, self.blocks, pending_rows)
        if previous is None:
            logits = self.runner.run(inputs, captured)
        else:
            logits = self.runner.run(inputs, captured, previous.sample.token_ids)
        packed = None
        if captured is not None:
            append_full_rows(captured)
            on_device = captured.packed if captured.packed is not None else pack_results(captured)
            packed = copy_to_host(on_device) if on_device is not None else None
        sampling = [c.seq for c in plan.chunks if c.samples]
        sample = self.sampler.sample_async(logits, SamplingInputs(
            params=[s.params for s in sampling],
            generators=[s.generator for s in sampling],
            prompt_token_ids=[s.prompt_token_ids for s in sampling],
            output_token_ids=[s.output_token_ids for s in sampling],
            pending_tokens=None if previous is None else previous.sample.token_ids,
            pending_sources=None if previous is None else [pending_rows.get(s.seq_id, -1) for s in sampling],
        ))
        for chunk in plan.chunks:
            chunk.seq.num_computed_tokens += chunk.num_tokens
        indices = []
        for seq in sampling:
            index = seq.append_pending()
            indices.append(index)
            seq.final_pending = self._ends_by_length(seq, index)
        return _LaunchedStep(sampling, indices, sample, captured, packed)

    def _finish_step(self, step: _LaunchedStep) -> list[RequestOutput]:
        """Read a launched step's results (waiting for them): capture records, tokens, stops; publish.

        Sequences that ended while the step ran (stop, abort) get neither its token nor its records.
        """
        result = step.sample.result()
        if step.capture is not None:
            packed = step.packed.numpy() if step.packed is not None else None
            sequences = step.capture.sequences()
            for seq_id, records in step_records(step.capture, packed).items():
                seq = sequences[seq_id]
                req = self._active.get(seq.request_id)
                if req is not None and not seq.finished:
                    req.choices[seq.index].pending_attention.extend(records)
        touched: dict[str, _Request] = {}
        for row, seq in enumerate(step.sampling):
            if seq.finished:
                continue
            req = self._active[seq.request_id]
            lp = None
            if result.logprobs[row] is not None:
                lp = self._token_logprob(result.token_ids[row], result.logprobs[row], result.top_logprobs[row])
            self._append_token(req.choices[seq.index], step.output_indices[row], result.token_ids[row], lp)
            touched[req.request_id] = req
        return [out for req in touched.values() if (out := self._publish(req)) is not None]

    def _token_logprob(self, token_id: int, logprob: float, top: list[tuple[int, float]]) -> TokenLogprob:
        """Logprob record with token strings for the API."""
        def text(i: int) -> str:
            return self.tokenizer.decode([i], skip_special_tokens=False)

        return TokenLogprob(token_id, text(token_id), logprob, [TopLogprob(i, text(i), p) for i, p in top])

    def _append_token(self, choice: _Choice, index: int, token_id: int, logprob: TokenLogprob | None) -> None:
        """Record the sampled token of output ``index`` (pending until now), extend the text, and end the
        sequence if a stop condition holds."""
        seq = choice.seq
        seq.set_output_token(index, token_id)
        choice.pending_ids.append(token_id)
        if logprob is not None:
            choice.pending_logprobs.append(logprob)
        params = seq.params
        if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in self.eos_token_ids):
            self._finish(choice, "stop")
        elif choice.text.add(choice.detokenizer.step(token_id)):
            self.scheduler.finish(seq, "stop")
        elif self._ends_by_length(seq, index):
            self._finish(choice, "length")

    def _ends_by_length(self, seq: Sequence, index: int) -> bool:
        """Whether output ``index`` is the sequence's last by ``max_tokens`` or the context limit."""
        return index + 1 >= seq.params.max_tokens or len(seq.prompt_token_ids) + index + 1 >= self.max_model_len

    def _finish(self, choice: _Choice, reason: str) -> None:
        """End a choice, first releasing text the detokeniser held back for an unfinished character."""
        if choice.text.add(choice.detokenizer.flush()) and reason == "length":
            reason = "stop"
        self.scheduler.finish(choice.seq, reason)

    def _publish(self, req: _Request) -> RequestOutput | None:
        """Turn pending tokens of a request's choices into one output and hand it to its consumer."""
        deltas = []
        for choice in req.choices:
            final = choice.seq.finished
            if not choice.pending_ids and not (final and not choice.reported):
                continue
            capture = choice.seq.capture
            full = capture is not None and capture.is_full
            deltas.append(CompletionDelta(
                index=choice.seq.index,
                token_ids=choice.pending_ids,
                text=choice.text.release(final),
                logprobs=choice.pending_logprobs if req.params.logprobs is not None else None,
                finish_reason=choice.seq.finish_reason,
                attention_tokens=choice.pending_attention if capture is not None and not full else None,
                attn_capture_data=full_capture_data(choice.seq) if full and final else None,
            ))
            choice.pending_ids, choice.pending_logprobs, choice.pending_attention = [], [], []
            choice.reported = final
        if not deltas:
            return None
        out = RequestOutput(req.request_id, deltas, req.finished, req.usage())
        if req.finished:
            self._active.pop(req.request_id, None)
        with self._state:
            if req.retain:
                req.outputs.append(out)
            elif req.finished:
                self._requests.pop(req.request_id, None)
            if req.finished:
                req.done.set()
            req.notify()
        return out

    # ------------------------------------------------------------ driving modes

    def generate(self, prompts: list[str] | None = None, params: SamplingParams | dict | None = None, *,
                 prompt_token_ids: list[list[int]] | None = None,
                 messages: list[list[dict]] | None = None,
                 capture: CaptureParams | dict | None = None) -> list[FinalOutput]:
        """Generate for a batch of prompts (all batched together) and return whole outputs in order."""
        kinds = [("prompt", prompts), ("prompt_token_ids", prompt_token_ids), ("messages", messages)]
        given = [(k, v) for k, v in kinds if v is not None]
        if len(given) != 1:
            raise InvalidRequestError("give exactly one of prompts, prompt_token_ids or messages", "prompt")
        kind, items = given[0]
        rids = [self.add_request(**{kind: item}, params=params, capture=capture) for item in items]
        with self._state:
            reqs = {rid: self._requests[rid] for rid in rids}
        collected: dict[str, list[RequestOutput]] = {rid: [] for rid in rids}
        if self._thread is None:
            while not all(r.done.is_set() for r in reqs.values()):
                for out in self.step():
                    if out.request_id in collected:
                        collected[out.request_id].append(out)
        else:
            for rid, req in reqs.items():
                while not req.done.wait(0.05):
                    self.raise_if_failed()
                with self._state:
                    collected[rid] = list(req.outputs)
                    self._requests.pop(rid, None)
        return [FinalOutput.collect(rid, reqs[rid].prompt_token_ids, collected[rid], reqs[rid].params.n) for rid in rids]

    def start(self) -> None:
        """Run the step loop on a background thread (idempotent)."""
        with self._state:
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._loop, name="attnscope-engine", daemon=True)
                self._thread.start()

    def close(self) -> None:
        """Stop the background loop, release the rank workers of a tensor-parallel engine, and hand the heap
        frozen at start-up back to the garbage collector.

        The engine freezes the heap when it is built (``gc.freeze``), as serving engines do,
        so the collector's full passes, which a step's capture records trigger, walk only
        what was made since (hundreds of thousands of start-up objects otherwise: with 32
        sketch rows such passes took most of the records' host time). Closing unfreezes it,
        so a closed engine's cycles can be collected.
        """
        self.shutdown()
        self.runner.shutdown()
        gc.unfreeze()

    def shutdown(self) -> None:
        """Stop the background loop; running requests stay queued."""
        with self._state:
            self._stopping = True
            self._work.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def _loop(self) -> None:
        """Step while there is work; sleep on the condition otherwise."""
        try:
            while True:
                with self._state:
                    while not self._stopping and not self._has_work():
                        self._work.wait()
                    if self._stopping:
                        return
                self.step()
        except BaseException as exc:  # surfaced to every waiting consumer
            self._error = exc
            with self._state:
                for req in list(self._requests.values()):
                    req.done.set()
                    req.notify()

    def raise_if_failed(self) -> None:
        """Re-raise a failure of the background loop in the caller."""
        if self._error is not None:
            raise RuntimeError("the engine loop failed") from self._error

    def check_health(self) -> None:
        """Raise if the loop failed or a tensor-parallel rank worker is gone (Serve's health check)."""
        self.raise_if_failed()
        self.runner.check_health()

    async def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """Yield a request's outputs as they are produced; aborts it if the consumer goes away.

        Needs ``start()`` to have been called before ``add_request``, so the request keeps
        its outputs until they are read here.
        """
        with self._state:
            req = self._requests.get(request_id)
            if req is None or not req.retain:
                raise KeyError(f"request {request_id!r} is unknown or was not added while the engine loop ran")
            req.loop = asyncio.get_running_loop()
            req.wake = asyncio.Event()
        finished = False
        try:
            while not finished:
                with self._state:
                    batch = list(req.outputs)
                    req.outputs.clear()
                    req.wake.clear()
                for out in batch:
                    finished = out.finished
                    yield out
                if not finished:
                    self.raise_if_failed()
                    await req.wake.wait()
        finally:
            with self._state:
                req.loop = None
            if not finished:
                self.abort(request_id)
            with self._state:
                if self._requests.get(request_id) is req:
                    del self._requests[request_id]

    def kv_usage(self) -> float:
        """Fraction of KV blocks held by live sequences."""
        with self._state:
            return self.blocks.usage

    def stats(self) -> EngineStats:
        """Load figures for health checks and operators: KV usage, queue lengths, capturing requests."""
        with self._state:
            live = [r for r in self._requests.values() if not r.finished]
            return EngineStats(
                kv_usage=self.blocks.usage,
                num_running=len(self.scheduler.running),
                num_waiting=len(self.scheduler.waiting) + sum(len(r.choices) for r in self._inbox),
                num_requests=len(live),
                capture_sessions=sum(1 for r in live if r.choices[0].seq.capture is not None),
            )


def _validated(model: type[ModelT], value: ModelT | dict | None, prefix: str) -> ModelT:
    """``value`` as a validated ``model``; the first invalid field raises ``InvalidRequestError`` naming it."""
    if isinstance(value, model):
        return value
    try:
        return model(**(value or {}))
    except ValidationError as exc:
        err = exc.errors()[0]
        name = prefix + ".".join(str(p) for p in err["loc"])
        raise InvalidRequestError(f"invalid {name}: {err['msg']}", name) from exc


def _load_tokenizer(checkpoint: LoadedCheckpoint) -> Tokenizer:
    """The checkpoint's tokenizer: from GGUF metadata or the folder's tokenizer.json."""
    if checkpoint.gguf_reader is not None:
        return Tokenizer.from_gguf(checkpoint.gguf_reader)
    return Tokenizer.from_pretrained_dir(checkpoint.path)
