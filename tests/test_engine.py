"""The engine as a user drives it: chat answers, batching, preemption, prefix cache, streaming, errors."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref

import pytest

from attnscope.engine.engine_config import EngineConfig
from attnscope.engine.llm_engine import InvalidRequestError, LLMEngine
from attnscope.engine.weights import ModelLoadError

GREEDY = {"temperature": 0.0, "max_tokens": 24}

def _eventually(condition, timeout: float = 5.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass (aborts land at the next step boundary)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


PROMPTS = [
    "The capital of Italy is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "List three colors:",
    "Water boils at a temperature of",
    "The quick brown fox jumps over the lazy dog. " * 4 + "Summarise the sentence above:",
    "1, 2, 3, 4, 5,",
    "Translate to French: good morning ->",
]


def _texts(outputs):
    return [o.completions[0].token_ids for o in outputs]


def test_chat_answers_capital_of_france(smollm_engine):
    out = smollm_engine.generate(messages=[[{"role": "user", "content": "What is the capital of France?"}]],
                                 params={"temperature": 0.0, "max_tokens": 32})
    assert "Paris" in out[0].completions[0].text


def test_batch_equals_each_prompt_alone_under_preemption(smollm_engine, smollm_path):
    alone = [smollm_engine.generate([p], GREEDY)[0].completions[0].token_ids for p in PROMPTS]
    tight = LLMEngine(EngineConfig(model=str(smollm_path), device="cpu", num_kv_blocks=14, block_size=16))
    batched = _texts(tight.generate(PROMPTS, GREEDY))
    assert tight.scheduler.num_preemptions > 0
    assert batched == alone
    assert tight.kv_usage() == 0.0


def test_chunked_prefill_matches_single_pass(smollm_engine, smollm_path):
    prompt = " ".join(f"item {i} is {'red' if i % 3 else 'blue'}." for i in range(60)) + " The first item is"
    whole = smollm_engine.generate([prompt], GREEDY)[0].completions[0].token_ids
    chunked = LLMEngine(EngineConfig(model=str(smollm_path), device="cpu", max_num_batched_tokens=40,
                                     kv_cache_memory_gib=0.1))
    assert chunked.generate([prompt], GREEDY)[0].completions[0].token_ids == whole


def test_prefix_cache_reuses_blocks_with_identical_output(smollm_path):
    engine = LLMEngine(EngineConfig(model=str(smollm_path), device="cpu", kv_cache_memory_gib=0.1))
    system = "You are a careful assistant. " + " ".join(f"Rule {i}: answer briefly." for i in range(30))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Name a fruit."}]
    first = engine.generate(messages=[messages], params=GREEDY)[0]
    hits_before = engine.blocks.stats.prefix_hit_blocks
    second = engine.generate(messages=[messages], params=GREEDY)[0]
    reused = engine.blocks.stats.prefix_hit_blocks - hits_before
    prompt_len = first.usage.prompt_tokens
    assert reused == (prompt_len - 1) // engine.config.block_size
    assert second.usage.cached_prompt_tokens == reused * engine.config.block_size
    assert first.usage.cached_prompt_tokens == 0
    assert second.completions[0].token_ids == first.completions[0].token_ids


def test_seeded_sampling_is_reproducible_and_n_choices_differ(smollm_engine):
    params = {"temperature": 1.0, "max_tokens": 16, "seed": 1234, "n": 3}
    a = smollm_engine.generate(["Write a word:"], params)[0]
    b = smollm_engine.generate(["Write a word:"], params)[0]
    assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]
    assert len({tuple(c.token_ids) for c in a.completions}) > 1
    assert a.usage.completion_tokens == sum(len(c.token_ids) for c in a.completions)


def test_stop_string_cuts_text_and_finishes(smollm_engine):
    full = smollm_engine.generate([PROMPTS[2]], GREEDY)[0].completions[0]
    stop = full.text[10:14]
    cut = smollm_engine.generate([PROMPTS[2]], {**GREEDY, "stop": [stop]})[0].completions[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert stop not in cut.text


def test_max_tokens_gives_length_finish_and_logprobs(smollm_engine):
    out = smollm_engine.generate(["Hello"], {"temperature": 0.0, "max_tokens": 5, "logprobs": 3})[0]
    choice = out.completions[0]
    assert choice.finish_reason == "length"
    assert len(choice.token_ids) == 5 and len(choice.logprobs) == 5
    for tok, lp in zip(choice.token_ids, choice.logprobs):
        assert lp.token_id == tok
        assert len(lp.top) == 3
        assert lp.top[0].token_id == tok
        assert lp.top[0].logprob >= lp.top[1].logprob >= lp.top[2].logprob
        assert lp.logprob <= 0.0


def test_background_loop_streams_concurrent_requests(smollm_path):
    engine = LLMEngine(EngineConfig(model=str(smollm_path), device="cpu", kv_cache_memory_gib=0.1))
    expected = [o.completions[0].text for o in engine.generate(PROMPTS[:3], GREEDY)]
    engine.start()

    async def consume(prompt):
        rid = engine.add_request(prompt, params=GREEDY)
        pieces, finish = [], None
        async for out in engine.stream(rid):
            for delta in out.deltas:
                pieces.append(delta.text)
                finish = delta.finish_reason or finish
        return "".join(pieces), finish

    async def main():
        return await asyncio.gather(*(consume(p) for p in PROMPTS[:3]))

    try:
        results = asyncio.run(main())
    finally:
        engine.shutdown()
    assert [text for text, _ in results] == expected
    assert all(finish in {"stop", "length"} for _, finish in results)
    assert engine.kv_usage() == 0.0


def test_abandoned_stream_aborts_and_frees_blocks(smollm_path):
    engine = LLMEngine(EngineConfig(model=str(smollm_path), device="cpu", kv_cache_memory_gib=0.1))
    engine.start()

    async def read_two_then_leave():
        rid = engine.add_request("Count slowly:", params={"temperature": 0.0, "max_tokens": 200, "ignore_eos": True})
        seen = 0
        async for _ in engine.stream(rid):
            seen += 1
            if seen == 2:
                break
        return seen

    try:
        assert asyncio.run(read_two_then_leave()) == 2
        assert _eventually(lambda: not engine.has_unfinished())
    finally:
        engine.shutdown()
    assert engine.kv_usage() == 0.0


def test_new_requests_and_stats_never_wait_for_a_running_step(smollm_path):
    engine = LLMEngine(EngineConfig(model=str(smollm_path), device="cpu", kv_cache_memory_gib=0.1,
                                    max_num_batched_tokens=1200))
    vocab = engine.model_config.vocab_size
    long_prompts = [[(7 * i + 13 * j) % (vocab - 1000) + 1000 for i in range(1100)] for j in range(2)]
    engine.start()
    try:
        started = time.perf_counter()
        engine.add_request(prompt_token_ids=long_prompts[0], params={"max_tokens": 1})
        assert _eventually(lambda: not engine.has_unfinished(), timeout=60)
        step_seconds = time.perf_counter() - started
        engine.add_request(prompt_token_ids=long_prompts[1], params={"max_tokens": 1})
        time.sleep(step_seconds / 3)
        assert engine.has_unfinished()
        started = time.perf_counter()
        engine.add_request("Hello", params={"max_tokens": 1})
        stats = engine.stats()
        waited = time.perf_counter() - started
        assert stats.num_requests == 2
        assert waited < step_seconds / 4, (waited, step_seconds)
        assert _eventually(lambda: not engine.has_unfinished(), timeout=60)
    finally:
        engine.shutdown()


def test_abort_before_streaming_forgets_the_request_and_stats_follow(smollm_path):
    engine = LLMEngine(EngineConfig(model=str(smollm_path), device="cpu", kv_cache_memory_gib=0.1))
    engine.start()
    try:
        rid = engine.add_request("Count slowly:", params={"temperature": 0.0, "max_tokens": 200, "ignore_eos": True},
                                 capture={"mode": "fingerprint"})
        stats = engine.stats()
        assert (stats.num_requests, stats.capture_sessions) == (1, 1)
        assert stats.num_running + stats.num_waiting == 1
        engine.abort(rid)
        assert _eventually(lambda: engine.stats().num_requests == 0)
        stats = engine.stats()
        assert (stats.num_requests, stats.num_running, stats.num_waiting, stats.kv_usage) == (0, 0, 0, 0.0)
        with pytest.raises(KeyError):
            asyncio.run(anext(engine.stream(rid)))
    finally:
        engine.shutdown()


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"n": 0}, "n"),
        ({"stop": [""]}, "stop"),
        ({"tempreature": 0.5}, "tempreature"),
    ],
)
def test_invalid_sampling_values_name_the_field(smollm_engine, params, field):
    with pytest.raises(InvalidRequestError) as err:
        smollm_engine.add_request("hi", params=params)
    assert err.value.field == field
    assert not smollm_engine.has_unfinished()


def test_bad_prompts_are_refused_and_engine_keeps_serving(smollm_engine):
    too_long = "word " * (smollm_engine.max_model_len + 10)
    with pytest.raises(InvalidRequestError, match="context limit") as err:
        smollm_engine.add_request(too_long, params=GREEDY)
    assert err.value.field == "prompt"
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        smollm_engine.add_request(prompt_token_ids=[1, 2, 10**9], params=GREEDY)
    with pytest.raises(InvalidRequestError, match="empty"):
        smollm_engine.add_request("", params=GREEDY)
    with pytest.raises(InvalidRequestError) as err:
        smollm_engine.add_request(messages=[{"role": "user"}], params=GREEDY)
    assert err.value.field == "messages"
    assert not smollm_engine.has_unfinished()
    out = smollm_engine.generate(["The capital of Italy is"], GREEDY)[0]
    assert len(out.completions[0].token_ids) > 0


def test_unknown_and_corrupt_models_give_clear_errors(tmp_path, smollm_path):
    with pytest.raises(ModelLoadError, match="does-not-exist"):
        LLMEngine(EngineConfig(model=str(tmp_path / "does-not-exist"), device="cpu"))
    corrupt = tmp_path / "broken.gguf"
    corrupt.write_bytes(smollm_path.read_bytes()[: 1 << 20])
    with pytest.raises(ModelLoadError):
        LLMEngine(EngineConfig(model=str(corrupt), device="cpu"))


def test_engine_freezes_its_start_up_heap_until_closed(smollm_path):
    """The heap built at start-up is frozen while the engine serves (the collector's full passes skip it) and
    handed back on close, so a closed engine is collected like any object."""
    gc.unfreeze()
    engine = LLMEngine(EngineConfig(model=str(smollm_path), device="cpu", kv_cache_memory_gib=0.1))
    assert gc.get_freeze_count() > 10_000
    assert engine.generate(PROMPTS[:1], GREEDY)[0].completions[0].token_ids
    engine.close()
    assert gc.get_freeze_count() == 0
    closed = weakref.ref(engine)
    del engine
    gc.collect()
    assert closed() is None
