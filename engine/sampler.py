"""Batched next-token sampler with vLLM-compatible penalties, filters and logprobs.

One ``Sampler.sample`` call picks a token for every row of a ``[B, V]`` logits
tensor. Rows carry their own ``SamplingParams`` and their own random generator,
so a seeded request yields the same tokens whatever else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnscope.engine.device_values import copy_to_host
from attnscope.sampling import SamplingParams

# Temperatures below this are treated as greedy, as vLLM does: dividing by them
# would overflow float32 and the distribution is one-hot anyway.
_GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplingInputs:
    """Per-step inputs of the sampler, one entry per logits row.

    ``generators[i]`` is the row's own RNG (seeded per request, on the logits'
    device), or ``None`` to draw from torch's global RNG. The token id lists feed
    the repetition, presence and frequency penalties. An output token the host has not
    read yet is negative in ``output_token_ids``; its value is
    ``pending_tokens[pending_sources[i]]`` on the device (the previous step's samples).
    """

    params: list[SamplingParams]
    generators: list[torch.Generator | None]
    prompt_token_ids: list[list[int]]
    output_token_ids: list[list[int]]
    pending_tokens: torch.Tensor | None = None
    pending_sources: list[int] | None = None


@dataclass
class SampleResult:
    """Chosen tokens of one step, plus logprobs for the rows that asked for them.

    ``logprobs[i]`` and ``top_logprobs[i]`` are ``None`` unless
    ``params[i].logprobs`` is set; logprobs are those of the raw model
    distribution (before penalties and temperature). ``top_logprobs[i]`` holds
    ``params[i].logprobs`` ``(token_id, logprob)`` pairs in descending order.
    """

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """Return a generator on ``device`` seeded with ``seed``, or ``None`` without a seed.

    The seed is reduced modulo 2**64 so any Python int (negative or huge) is accepted,
    and the generator lives on ``device`` because torch only draws on a tensor's own
    device from a generator of that device.
    """
    if seed is None:
        return None
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed % (1 << 64))
    return generator


def _is_greedy(params: SamplingParams) -> bool:
    """True when the row takes the argmax: greedy params or a vanishing temperature."""
    return params.greedy or params.temperature < _GREEDY_TEMPERATURE


def _is_penalised(params: SamplingParams) -> bool:
    """True when any repetition, presence or frequency penalty changes the logits."""
    return params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0


def _row_values(values: list[float], device: torch.device) -> torch.Tensor:
    """One float32 column ``[R, 1]`` of per-row parameters, broadcastable against ``[R, V]``."""
    return torch.tensor(values, dtype=torch.float32).to(device).unsqueeze(1)


def _token_counts(token_ids: list[list[int]], vocab_size: int, device: torch.device,
                  pending: tuple[torch.Tensor, list[int]] | None = None) -> torch.Tensor:
    """Per-row occurrence counts ``[R, V]`` (float32) of the given token ids.

    Rows are padded with an out-of-vocabulary column that is dropped afterwards, so
    one ``scatter_add_`` counts the whole batch; negative (pending) ids land there too.
    ``pending = (tokens, sources)`` adds ``tokens[sources[i]]`` to row ``i`` where
    ``sources[i] >= 0``, on the device.
    """
    width = max((len(ids) for ids in token_ids), default=0)
    padded = torch.tensor([ids + [vocab_size] * (width - len(ids)) for ids in token_ids], dtype=torch.long)
    padded = padded.reshape(len(token_ids), width)
    padded = padded.masked_fill(padded < 0, vocab_size).to(device)
    counts = torch.zeros(len(token_ids), vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    if pending is not None:
        tokens, sources = pending
        rows = [i for i, s in enumerate(sources) if s >= 0]
        if rows:
            picked = tokens.index_select(0, torch.tensor([sources[i] for i in rows]).to(device))
            counts.index_put_((torch.tensor(rows).to(device), picked), torch.ones(len(rows), device=device),
                              accumulate=True)
    return counts[:, :vocab_size]


def _apply_penalties(
    logits: torch.Tensor,
    params: list[SamplingParams],
    prompt_token_ids: list[list[int]],
    output_token_ids: list[list[int]],
    pending: tuple[torch.Tensor, list[int]] | None = None,
) -> torch.Tensor:
    """Return penalised copies of float32 ``logits`` rows, in vLLM's order.

    Repetition penalty on tokens of prompt or output (positive logits divided,
    others multiplied), then ``frequency * count`` and ``presence`` subtracted for
    tokens of the output (pending outputs counted from the device, see ``_token_counts``).
    """
    vocab_size = logits.shape[1]
    device = logits.device
    output_counts = _token_counts(output_token_ids, vocab_size, device, pending)
    in_output = output_counts > 0
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = in_output | (_token_counts(prompt_token_ids, vocab_size, device) > 0)
        penalty = _row_values([p.repetition_penalty for p in params], device)
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalised, logits)
    frequency = _row_values([p.frequency_penalty for p in params], device)
    presence = _row_values([p.presence_penalty for p in params], device)
    return logits - frequency * output_counts - presence * in_output


def _filter_probs(logits: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply temperature, top-k, top-p and min-p to float32 ``logits`` rows.

    Returns unnormalised probabilities with filtered tokens at zero, and the
    permutation that sorted them (``None`` when no row needed sorting, in which case
    the probabilities are in vocabulary order). The top token always survives.
    """
    device = logits.device
    vocab_size = logits.shape[1]
    logits = logits / _row_values([p.temperature for p in params], device)
    order = None
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        # A stable sort breaks ties by token id, so the kept set does not depend on the batch.
        logits, order = logits.sort(dim=-1, descending=True, stable=True)
        positions = torch.arange(vocab_size, device=device)
        if any(p.top_k > 0 for p in params):
            top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab_size for p in params]).to(device)
            logits = logits.masked_fill(positions >= top_k.unsqueeze(1), float("-inf"))
        if any(p.top_p < 1.0 for p in params):
            probs = logits.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs
            top_p = _row_values([p.top_p if p.top_p < 1.0 else 2.0 for p in params], device)
            logits = logits.masked_fill(mass_before >= top_p, float("-inf"))
    probs = logits.softmax(dim=-1)
    if any(p.min_p > 0.0 for p in params):
        min_p = _row_values([p.min_p for p in params], device)
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    return probs, order


def _exponential_noise(shape: torch.Size, generators: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """Exp(1) noise ``[R, V]`` in vocabulary order, each seeded row from its own generator.

    A seeded row draws exactly ``V`` values per step from its generator, so its
    stream does not depend on the other rows; unseeded rows share one global draw.
    """
    noise = torch.empty(shape, dtype=torch.float32, device=device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if len(unseeded) == len(generators):
        return noise.exponential_()
    if unseeded:
        rows = torch.tensor(unseeded).to(device)
        noise[rows] = torch.empty(len(unseeded), shape[1], device=device).exponential_()
    for i, generator in enumerate(generators):
        if generator is not None:
            noise[i].exponential_(generator=generator)
    return noise


def _sample_rows(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """Draw one token per row of penalised float32 ``logits`` (``[R, V]`` → ``[R]``).

    Uses the exponential race ``argmax(p / q)``, ``q ~ Exp(1)``, which picks token
    ``i`` with probability ``p_i / sum(p)``: no renormalisation needed, and no
    host synchronisation.
    """
    probs, order = _filter_probs(logits, params)
    noise = _exponential_noise(logits.shape, generators, logits.device)
    if order is not None:
        noise = noise.gather(1, order)
    # Exp(1) can return 0; a tiny floor keeps zero-probability tokens at exactly 0.
    choice = (probs / noise.clamp_min(torch.finfo(torch.float32).tiny)).argmax(dim=-1)
    if order is None:
        return choice
    return order.gather(1, choice.unsqueeze(1)).squeeze(1)


def _validate(logits: torch.Tensor, inputs: SamplingInputs) -> None:
    """Reject shapes and inputs that would silently mis-sample."""
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a 2-D float tensor, got {tuple(logits.shape)} {logits.dtype}")
    batch = logits.shape[0]
    lengths = {
        "params": len(inputs.params),
        "generators": len(inputs.generators),
        "prompt_token_ids": len(inputs.prompt_token_ids),
        "output_token_ids": len(inputs.output_token_ids),
    }
    wrong = {name: n for name, n in lengths.items() if n != batch}
    if wrong:
        raise ValueError(f"{batch} logits rows but sampling inputs of lengths {wrong}")
    for generator in inputs.generators:
        if generator is not None and generator.device.type != logits.device.type:
            raise ValueError(f"generator on {generator.device} cannot draw for logits on {logits.device}")


def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, wanted: list[int], top_n: int) -> list[torch.Tensor]:
    """Device tensors ``[chosen [W], top values [W, top_n], top ids [W, top_n]]`` of the rows ``wanted``
    from the raw float32 logits (nothing when no row wants logprobs)."""
    if not wanted:
        return []
    rows = torch.tensor(wanted).to(raw.device)
    log_dist = raw[rows].log_softmax(dim=-1)
    chosen = log_dist.gather(1, tokens[rows].unsqueeze(1)).squeeze(1)
    top_values, top_ids = log_dist.topk(top_n, dim=-1, sorted=True)
    return [chosen, top_values, top_ids]


class PendingSample:
    """One step's sampled tokens, still on the device, and their copies on their way to the host.

    ``token_ids`` (``[R]`` int64, on the logits' device) can feed the next step's inputs
    before the host has read them; :meth:`result` waits for the copies only.
    """

    def __init__(self, token_ids: torch.Tensor, logprobs: list[torch.Tensor], wanted: list[int],
                 params: list[SamplingParams]) -> None:
        self.token_ids = token_ids
        self._host = [copy_to_host(t) for t in (token_ids, *logprobs)]
        self._event = None
        if token_ids.device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()
        self._wanted = wanted
        self._params = params

    def result(self) -> SampleResult:
        """The host values (waits for this step's copies, not for later device work)."""
        if self._event is not None:
            self._event.synchronize()
        tokens = self._host[0].tolist()
        batch = len(tokens)
        logprobs: list[float | None] = [None] * batch
        top_logprobs: list[list[tuple[int, float]] | None] = [None] * batch
        if self._wanted:
            chosen, top_values, top_ids = (t.tolist() for t in self._host[1:])
            for j, i in enumerate(self._wanted):
                n = self._params[i].logprobs or 0
                logprobs[i] = chosen[j]
                top_logprobs[i] = list(zip(top_ids[j][:n], top_values[j][:n]))
        return SampleResult(tokens, logprobs, top_logprobs)


class Sampler:
    """Picks the next token of every sequence in a batch.

    Stateless: all per-request state (parameters, RNG, history) comes in through
    ``SamplingInputs``, so one instance serves the whole engine.
    """

    def sample(self, logits: torch.Tensor, inputs: SamplingInputs) -> SampleResult:
        """Choose one token per row of ``logits`` ``[B, V]`` following each row's params.

        Penalties first, then argmax for greedy rows or temperature, top-k, top-p,
        min-p and a draw from the row's generator for the others. Logprobs, when
        asked for, are those of the raw ``logits``.
        """
        return self.sample_async(logits, inputs).result()

    def sample_async(self, logits: torch.Tensor, inputs: SamplingInputs) -> PendingSample:
        """:meth:`sample` without waiting for the device: the tokens stay on it, their host copies in flight."""
        _validate(logits, inputs)
        params = inputs.params
        if all(_is_greedy(p) and not _is_penalised(p) and p.logprobs is None for p in params):
            return PendingSample(logits.argmax(dim=-1), [], [], params)

        raw = logits.float()
        scores = raw
        penalised = [i for i, p in enumerate(params) if _is_penalised(p)]
        if penalised:
            rows = torch.tensor(penalised).to(logits.device)
            scores = raw.clone()
            pending = None
            if inputs.pending_tokens is not None and inputs.pending_sources is not None:
                pending = (inputs.pending_tokens, [inputs.pending_sources[i] for i in penalised])
            scores[rows] = _apply_penalties(
                raw[rows],
                [params[i] for i in penalised],
                [inputs.prompt_token_ids[i] for i in penalised],
                [inputs.output_token_ids[i] for i in penalised],
                pending,
            )

        tokens = scores.argmax(dim=-1)
        sampled = [i for i, p in enumerate(params) if not _is_greedy(p)]
        if sampled:
            rows = torch.tensor(sampled).to(logits.device)
            tokens[rows] = _sample_rows(
                scores[rows], [params[i] for i in sampled], [inputs.generators[i] for i in sampled]
            )
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        top_n = min(max((params[i].logprobs or 0 for i in wanted), default=0), logits.shape[1])
        return PendingSample(tokens, _logprobs(raw, tokens, wanted, top_n), wanted, params)

