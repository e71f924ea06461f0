"""Behaviour of the batched sampler: greedy, seeded draws, filters, penalties, logprobs."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from attnscope.engine.sampler import SampleResult, Sampler, SamplingInputs, make_generator
from attnscope.sampling import SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seeds: list[int | None] | None = None,
    prompt: list[list[int]] | None = None,
    output: list[list[int]] | None = None,
) -> SampleResult:
    """Sample one step with fresh generators made from ``seeds``."""
    batch = len(params)
    seeds = seeds if seeds is not None else [None] * batch
    inputs = SamplingInputs(
        params=params,
        generators=[make_generator(s, logits.device) for s in seeds],
        prompt_token_ids=prompt if prompt is not None else [[] for _ in range(batch)],
        output_token_ids=output if output is not None else [[] for _ in range(batch)],
    )
    return Sampler().sample(logits, inputs)


def draw_many(logits_row: torch.Tensor, params: SamplingParams, draws: int, seed: int = 0) -> Counter[int]:
    """Token counts of ``draws`` unseeded rows sharing the same logits (global RNG seeded once)."""
    torch.manual_seed(seed)
    logits = logits_row.unsqueeze(0).expand(draws, -1).contiguous()
    return Counter(run(logits, [params] * draws).token_ids)


def log_probs(probs: list[float]) -> torch.Tensor:
    """Logits whose softmax is exactly ``probs`` (up to float rounding)."""
    return torch.tensor(probs).log()


GREEDY = SamplingParams(temperature=0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_rows_take_the_argmax(device: str) -> None:
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(1)).to(device)
    params = [GREEDY, SamplingParams(top_k=1), GREEDY, SamplingParams(temperature=0.0, top_p=0.5), GREEDY]
    result = run(logits, params)
    assert result.token_ids == logits.argmax(dim=-1).tolist()
    assert result.logprobs == [None] * 5
    assert result.top_logprobs == [None] * 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_ties_break_to_the_lowest_index(dtype: torch.dtype) -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0, 3.0], [5.0, 5.0, 5.0, 5.0, 5.0]], dtype=dtype)
    assert run(logits, [GREEDY, GREEDY]).token_ids == [1, 0]
    # The same with penalties and logprobs, which leave the fast path.
    penalised = SamplingParams(temperature=0.0, presence_penalty=0.5, logprobs=1)
    assert run(logits, [penalised, penalised], output=[[1], [0]]).token_ids == [3, 1]


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_row_is_independent_of_batch_and_position(device: str) -> None:
    steps, vocab = 12, 64
    step_logits = torch.randn(steps, vocab, generator=torch.Generator().manual_seed(2)).to(device)
    target = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=1234)

    def sequence(batch_params: list[SamplingParams], position: int) -> list[int]:
        generators = [make_generator(p.seed, device) for p in batch_params]
        tokens = []
        for step in range(steps):
            logits = torch.randn(len(batch_params), vocab, device=device)
            logits[position] = step_logits[step]
            inputs = SamplingInputs(batch_params, generators, [[] for _ in batch_params], [[] for _ in batch_params])
            tokens.append(Sampler().sample(logits, inputs).token_ids[position])
        return tokens

    alone = sequence([target], 0)
    others = [SamplingParams(seed=7), SamplingParams(), GREEDY, SamplingParams(temperature=1.3, min_p=0.1, seed=99)]
    assert sequence(others[:2] + [target] + others[2:], 2) == alone
    assert sequence([target] + others, 0) == alone
    assert sequence(others + [target], 4) == alone
    assert len(set(alone)) > 1


def test_different_seeds_give_different_sequences() -> None:
    logits = torch.zeros(4, 50)
    seeds = [1, 2, 3, 4]
    generators = [make_generator(s, "cpu") for s in seeds]
    inputs = SamplingInputs([SamplingParams(seed=s) for s in seeds], generators, [[]] * 4, [[]] * 4)
    rows = list(zip(*(Sampler().sample(logits, inputs).token_ids for _ in range(30))))
    assert len(set(rows)) == 4


def test_make_generator_without_seed_is_none_and_accepts_any_int() -> None:
    assert make_generator(None, "cpu") is None
    a = torch.rand(3, generator=make_generator(-5, "cpu"))
    b = torch.rand(3, generator=make_generator(-5 + (1 << 64), "cpu"))
    assert torch.equal(a, b)
    assert make_generator(1 << 100, torch.device("cpu")) is not None


def test_temperature_one_matches_softmax() -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    draws = 6000
    counts = draw_many(logits, SamplingParams(), draws)
    expected = (logits.softmax(-1) * draws).tolist()
    chi_square = sum((counts[i] - e) ** 2 / e for i, e in enumerate(expected))
    assert chi_square < 20.5  # 5 degrees of freedom, p = 0.001


def test_seeded_draws_match_softmax() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0])
    generator = make_generator(3, "cpu")
    inputs = SamplingInputs([SamplingParams(seed=3)], [generator], [[]], [[]])
    counts = Counter(Sampler().sample(logits.unsqueeze(0), inputs).token_ids[0] for _ in range(3000))
    expected = (logits.softmax(-1) * 3000).tolist()
    chi_square = sum((counts[i] - e) ** 2 / e for i, e in enumerate(expected))
    assert chi_square < 13.8  # 2 degrees of freedom, p = 0.001


def test_temperature_flattens_and_sharpens() -> None:
    logits = torch.tensor([2.0, 0.0])
    hot = draw_many(logits, SamplingParams(temperature=4.0), 4000)
    cold = draw_many(logits, SamplingParams(temperature=0.5), 4000)
    assert abs(hot[1] / 4000 - torch.tensor([0.5, 0.0]).softmax(-1)[1].item()) < 0.03
    assert abs(cold[1] / 4000 - torch.tensor([4.0, 0.0]).softmax(-1)[1].item()) < 0.01


def test_top_k_only_samples_the_k_best() -> None:
    logits = torch.randn(30, generator=torch.Generator().manual_seed(4))
    best = set(logits.topk(3).indices.tolist())
    counts = draw_many(logits, SamplingParams(temperature=2.0, top_k=3), 3000)
    assert set(counts) == best


def test_top_p_keeps_the_smallest_nucleus() -> None:
    # Token ids are shuffled so the nucleus is not a prefix of the vocabulary.
    probs = {4: 0.5, 0: 0.3, 3: 0.15, 1: 0.04, 2: 0.01}
    logits = log_probs([probs[i] for i in range(5)])
    assert set(draw_many(logits, SamplingParams(top_p=0.79), 2000)) == {4, 0}
    assert set(draw_many(logits, SamplingParams(top_p=0.81), 2000)) == {4, 0, 3}
    assert set(draw_many(logits, SamplingParams(top_p=0.96), 2000)) == {4, 0, 3, 1}
    assert set(draw_many(logits, SamplingParams(top_p=0.3), 500)) == {4}


def test_top_p_renormalises_the_nucleus() -> None:
    logits = log_probs([0.5, 0.3, 0.2])
    counts = draw_many(logits, SamplingParams(top_p=0.7), 5000)
    assert set(counts) == {0, 1}
    assert abs(counts[0] / 5000 - 0.5 / 0.8) < 0.03


def test_min_p_drops_tokens_below_the_scaled_top_probability() -> None:
    logits = log_probs([0.05, 0.5, 0.15, 0.3])
    assert set(draw_many(logits, SamplingParams(min_p=0.2), 2000)) == {1, 2, 3}
    assert set(draw_many(logits, SamplingParams(min_p=0.5), 2000)) == {1, 3}
    assert set(draw_many(logits, SamplingParams(min_p=1.0), 300)) == {1}


def test_filters_combine_in_one_batch() -> None:
    logits = log_probs([0.4, 0.25, 0.2, 0.1, 0.05]).unsqueeze(0).expand(3000, -1).contiguous()
    params = [SamplingParams(top_k=2), SamplingParams(top_p=0.8), SamplingParams(min_p=0.3)] * 1000
    torch.manual_seed(5)
    tokens = run(logits, params).token_ids
    assert set(tokens[0::3]) == {0, 1}
    assert set(tokens[1::3]) == {0, 1, 2}
    assert set(tokens[2::3]) == {0, 1, 2}


def test_tiny_temperature_behaves_like_greedy() -> None:
    # Distinct logits 0.05 apart: at T = 1e-3 the runner-up is e^-50 times less likely.
    generator = torch.Generator().manual_seed(6)
    logits = torch.stack([torch.randperm(40, generator=generator) * 0.05 + 10.0 for _ in range(200)])
    for temperature in (1e-3, 1e-7, 1e-38):
        params = [SamplingParams(temperature=temperature, seed=i) for i in range(200)]
        assert run(logits, params, seeds=list(range(200))).token_ids == logits.argmax(-1).tolist()


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([[2.0, 1.5, -3.0, -3.0], [-1.0, -1.2, -5.0, -5.0]])
    # Row 0: token 0 (seen in the prompt) drops to 2.0 / p. Row 1: token 0 (seen in the output) to -1.0 * p.
    below = SamplingParams(temperature=0.0, repetition_penalty=1.4)  # 1.43 < 1.5 ; -1.4 < -1.2
    above = SamplingParams(temperature=0.0, repetition_penalty=1.1)  # 1.82 > 1.5 ; -1.1 > -1.2
    seen = {"prompt": [[0], []], "output": [[], [0]]}
    assert run(logits, [below, below], **seen).token_ids == [1, 1]
    assert run(logits, [above, above], **seen).token_ids == [0, 0]
    # Unseen tokens are left alone.
    assert run(logits, [below, below], prompt=[[2], [3]], output=[[3], [2]]).token_ids == [0, 0]


def test_presence_penalty_subtracts_once_per_generated_token() -> None:
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    output = [[0, 0, 0, 2]]
    assert run(logits, [SamplingParams(temperature=0.0, presence_penalty=0.4)], output=output).token_ids == [0]
    assert run(logits, [SamplingParams(temperature=0.0, presence_penalty=0.6)], output=output).token_ids == [1]
    # Prompt tokens do not count.
    assert run(logits, [SamplingParams(temperature=0.0, presence_penalty=2.0)], prompt=[[0]]).token_ids == [0]
    # A negative penalty encourages repeats.
    boosted = SamplingParams(temperature=0.0, presence_penalty=-2.0)
    assert run(torch.tensor([[3.0, 2.5, 1.1]]), [boosted], output=[[2]]).token_ids == [2]


def test_frequency_penalty_subtracts_per_occurrence() -> None:
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    output = [[0, 2, 0, 0]]  # token 0 three times: 3.0 - 3 * f
    assert run(logits, [SamplingParams(temperature=0.0, frequency_penalty=0.15)], output=output).token_ids == [0]
    assert run(logits, [SamplingParams(temperature=0.0, frequency_penalty=0.2)], output=output).token_ids == [1]
    assert run(logits, [SamplingParams(temperature=0.0, frequency_penalty=2.0)], prompt=[[0]]).token_ids == [0]


def test_penalties_stack_in_vllm_order() -> None:
    # Repetition first (4.0 / 2 = 2.0), then frequency (2 * 0.25) and presence (0.2): 2.0 - 0.5 - 0.2 = 1.3.
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, frequency_penalty=0.25, presence_penalty=0.2)
    output = [[0, 0]]
    assert run(torch.tensor([[4.0, 1.29]]), [params], output=output).token_ids == [0]
    assert run(torch.tensor([[4.0, 1.31]]), [params], output=output).token_ids == [1]


def test_penalised_sampling_never_picks_a_suppressed_token() -> None:
    logits = torch.tensor([5.0, 0.0, 0.0])
    params = [SamplingParams(presence_penalty=2.0, frequency_penalty=2.0, top_k=2)] * 500
    torch.manual_seed(8)
    tokens = run(logits.expand(500, -1).contiguous(), params, output=[[0, 0]] * 500).token_ids
    assert 0 not in tokens


def test_sampling_does_not_modify_the_logits() -> None:
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(9))
    before = logits.clone()
    params = [SamplingParams(repetition_penalty=1.5, presence_penalty=1.0, temperature=0.5, top_p=0.5)] * 2
    run(logits, params, prompt=[[1, 2], [3]], output=[[4], [5, 5]])
    assert torch.equal(logits, before)


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_those_of_the_raw_logits(device: str) -> None:
    logits = torch.randn(4, 32, generator=torch.Generator().manual_seed(10)).to(device)
    params = [
        SamplingParams(logprobs=5, temperature=0.7, repetition_penalty=1.3, seed=1),
        SamplingParams(logprobs=0, temperature=0.0),
        SamplingParams(),
        SamplingParams(logprobs=20, top_k=3, presence_penalty=1.0, seed=2),
    ]
    result = run(logits, params, seeds=[1, None, None, 2], prompt=[[0, 1], [], [], []], output=[[2], [], [], [3]])
    reference = logits.float().log_softmax(-1).cpu()
    for row in (0, 1, 3):
        assert result.logprobs[row] == pytest.approx(reference[row, result.token_ids[row]].item(), abs=1e-5)
    assert result.logprobs[2] is None and result.top_logprobs[2] is None
    assert result.top_logprobs[1] == []
    for row, n in ((0, 5), (3, 20)):
        top = result.top_logprobs[row]
        assert top is not None and len(top) == n
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        expected = reference[row].topk(n)
        assert [t for t, _ in top] == expected.indices.tolist()
        assert values == pytest.approx(expected.values.tolist(), abs=1e-5)


def test_logprobs_of_low_precision_logits_are_computed_in_float32() -> None:
    logits = (torch.randn(1, 1000, generator=torch.Generator().manual_seed(11)) * 5).to(torch.bfloat16)
    result = run(logits, [SamplingParams(temperature=0.0, logprobs=3)])
    reference = logits.float().log_softmax(-1)[0]
    assert result.token_ids == [int(reference.argmax())]
    assert result.logprobs[0] == pytest.approx(reference.max().item(), abs=1e-6)
    assert math.fsum(math.exp(v) for v in reference.tolist()) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_batch_rows_match_sampling_each_row_alone(device: str) -> None:
    vocab = 48
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(12)).to(device)
    params = [
        GREEDY,
        SamplingParams(temperature=0.8, top_k=10, seed=21),
        SamplingParams(temperature=1.2, repetition_penalty=1.5, frequency_penalty=0.5, seed=22),
        SamplingParams(top_p=0.9, min_p=0.05, logprobs=4, seed=23),
        SamplingParams(temperature=0.0, presence_penalty=1.5, logprobs=2),
    ]
    seeds = [p.seed for p in params]
    prompt = [[1, 2], [3], [4, 5, 6], [], [7]]
    output = [[8], [9, 9], [10, 10, 11], [12], [int(logits[4].argmax())]]
    batched = run(logits, params, seeds, prompt, output)
    for order in (range(5), reversed(range(5))):
        order = list(order)
        permuted = run(
            logits[order], [params[i] for i in order], [seeds[i] for i in order],
            [prompt[i] for i in order], [output[i] for i in order],
        )
        for j, i in enumerate(order):
            assert permuted.token_ids[j] == batched.token_ids[i]
    for i in range(5):
        alone = run(logits[i : i + 1], [params[i]], [seeds[i]], [prompt[i]], [output[i]])
        assert alone.token_ids[0] == batched.token_ids[i]
        assert alone.logprobs[0] == batched.logprobs[i]
        assert alone.top_logprobs[0] == batched.top_logprobs[i]
    assert batched.token_ids[0] == int(logits[0].argmax())
    assert batched.token_ids[4] != int(logits[4].argmax())


def test_mismatched_inputs_are_rejected() -> None:
    inputs = SamplingInputs([GREEDY], [None], [[]], [[], []])
    with pytest.raises(ValueError, match="output_token_ids"):
        Sampler().sample(torch.zeros(1, 4), inputs)
    with pytest.raises(ValueError, match="2-D"):
        Sampler().sample(torch.zeros(4), SamplingInputs([GREEDY], [None], [[]], [[]]))


@pytest.mark.parametrize("device", DEVICES)
def test_pending_output_tokens_are_counted_from_the_device(device: str) -> None:
    """An output token the host has not read (negative id) is penalised from the previous step's device tokens
    exactly as if its value were in the list."""
    vocab = 40
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(13)).to(device)
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.8, frequency_penalty=0.7, logprobs=3),
              SamplingParams(temperature=0.9, presence_penalty=1.2, seed=5),
              SamplingParams(temperature=0.0, frequency_penalty=2.0, presence_penalty=2.0)]
    top = logits.argmax(dim=-1).tolist()
    known = [[4, top[0]], [top[1], 6, top[1]], [top[2]]]  # each row's last output repeats its best token
    previous = torch.tensor([11, top[2], top[0], 7, top[1]], device=device)  # the previous step's samples
    pending = [[4, -1], [top[1], 6, -1], [-1]]
    sources = [2, 4, 1]
    sampler = Sampler()

    def sample(output, **extra):
        inputs = SamplingInputs(params, [make_generator(p.seed, device) for p in params], [[1, 2]] * 3, output,
                                **extra)
        return sampler.sample(logits, inputs)

    want = sample(known)
    got = sample(pending, pending_tokens=previous, pending_sources=sources)
    assert got.token_ids == want.token_ids and got.top_logprobs == want.top_logprobs
    assert want.token_ids[2] != top[2]  # the penalty moved the argmax: the pending token was counted
