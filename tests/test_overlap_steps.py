"""Overlapped steps: step N+1 is launched before the host reads step N's tokens, with the same outputs.

On the CPU a launch computes the step, so nothing actually overlaps here; what these tests
pin down is the bookkeeping: decode inputs read the previous step's sampled tokens on the
device, pending tokens are counted but not yet known (penalties count them on the device),
sequences that stop meanwhile drop their extra token, think phases come from the filled-in
tokens, and preempted sequences with a pending token recompute correctly.
"""

from __future__ import annotations

import pytest

from attnscope.engine.engine_config import EngineConfig
from attnscope.engine.llm_engine import LLMEngine
from records import assert_records_close  # tests/records.py

LONG_PROMPT = " ".join(["The river runs past the old mill and under the stone bridge."] * 8)
REQUESTS = [  # (prompt, sampling params, capture)
    ("Name three colours of the rainbow.", {"temperature": 0.0, "max_tokens": 12, "ignore_eos": True},
     {"mode": "raw", "top_k": 5, "layers": [3, 18]}),
    ("Write one sentence about the sea.", {"temperature": 0.8, "top_p": 0.9, "seed": 7, "n": 2, "max_tokens": 10,
                                           "logprobs": 2, "ignore_eos": True}, None),
    ("Count from one to ten:", {"temperature": 0.0, "repetition_penalty": 1.3, "max_tokens": 8}, None),
    ("What is the capital of France? Answer in one sentence.", {"temperature": 0.0, "max_tokens": 40, "stop": ["."]},
     {"mode": "fingerprint"}),
    (LONG_PROMPT, {"temperature": 0.0, "max_tokens": 6, "ignore_eos": True}, {"mode": "sketch", "layers": "last"}),
    ("Say hello.", {"temperature": 0.0, "max_tokens": 64}, None),
]


def _engine(smollm_path, overlap: bool, **extra) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(smollm_path), device="cpu", overlap_steps=overlap, **extra))


def _run(engine: LLMEngine, requests=REQUESTS) -> dict:
    rids = [engine.add_request(p, params=params, capture=capture) for p, params, capture in requests]
    outputs: dict[str, list] = {rid: [] for rid in rids}
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].append(out)
    return {rid: outputs[rid] for rid in rids}


def _completions(outputs: list) -> dict:
    """Per choice index: tokens, text, finish reason, logprob ids, capture records; plus the final usage."""
    merged: dict[int, dict] = {}
    for out in outputs:
        for d in out.deltas:
            c = merged.setdefault(d.index, {"ids": [], "text": "", "finish": None, "lp": [], "records": []})
            c["ids"] += d.token_ids
            c["text"] += d.text
            c["finish"] = d.finish_reason or c["finish"]
            c["lp"] += [(lp.token_id, [t.token_id for t in lp.top]) for lp in d.logprobs or []]
            c["records"] += d.attention_tokens or []
    return {"choices": merged, "usage": outputs[-1].usage, "finished": outputs[-1].finished}


@pytest.fixture(scope="module")
def one_step_outputs(smollm_path):
    engine = _engine(smollm_path, False, max_num_batched_tokens=48)
    return list(_run(engine).values())


def test_overlapped_steps_give_the_same_outputs(smollm_path, one_step_outputs):
    """Greedy, seeded n=2 with logprobs, a repetition penalty, stop string, EOS, chunked prefill, capture."""
    engine = _engine(smollm_path, True, max_num_batched_tokens=48)
    overlapped = list(_run(engine).values())
    for want_outputs, got_outputs in zip(one_step_outputs, overlapped):
        want, got = _completions(want_outputs), _completions(got_outputs)
        assert got["finished"] and got["usage"] == want["usage"]
        assert got["choices"].keys() == want["choices"].keys()
        for index, w in want["choices"].items():
            g = got["choices"][index]
            assert (g["ids"], g["text"], g["finish"], g["lp"]) == (w["ids"], w["text"], w["finish"], w["lp"])
            assert_records_close(w["records"], g["records"])
    finishes = {c["finish"] for out in one_step_outputs for c in _completions(out)["choices"].values()}
    assert finishes == {"stop", "length"}  # both kinds of end were exercised
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks  # no sequence holds a block


def test_a_step_publishes_the_previous_steps_tokens_with_their_records(smollm_path):
    engine = _engine(smollm_path, True)
    launches = []
    run = engine.runner.run
    engine.runner.run = lambda *args: launches.append(len(args[0].input_ids)) or run(*args)
    params = {"temperature": 0.0, "max_tokens": 2, "ignore_eos": True}
    plain = engine.add_request("Hello", params=params)
    captured = engine.add_request("Hello", params=params, capture={"mode": "fingerprint"})
    assert engine.step() == []  # the prefill is launched; nothing is read yet
    second = {out.request_id: out for out in engine.step()}  # decode launched, first tokens read
    assert second.keys() == {plain, captured}
    delta = second[captured].deltas[0]
    assert len(delta.token_ids) == 1 and [r["decode_step"] for r in delta.attention_tokens] == [0]
    assert not second[plain].finished and engine.has_unfinished()
    last = engine.step()  # both reached max_tokens with the pending token: nothing new is launched
    assert {out.request_id for out in last} == {plain, captured} and all(out.finished for out in last)
    assert [r["decode_step"] for out in last if out.request_id == captured
            for r in out.deltas[0].attention_tokens] == [1]
    assert all(out.usage.completion_tokens == 2 for out in last)
    assert len(launches) == 2 and not engine.has_unfinished() and engine.step() == []


def test_abort_while_a_step_is_in_flight(smollm_path):
    engine = _engine(smollm_path, True)
    params = {"temperature": 0.0, "max_tokens": 10, "ignore_eos": True}
    alone = _run(engine, [("Count from one to ten:", params, None)])
    want = _completions(next(iter(alone.values())))["choices"][0]["ids"]
    kept = engine.add_request("Count from one to ten:", params=params)
    dropped = engine.add_request("Name three colours of the rainbow.", params=params, capture={"mode": "fingerprint"})
    outputs = {kept: [], dropped: []}
    for _ in range(3):
        for out in engine.step():
            outputs[out.request_id].append(out)
    engine.abort(dropped)  # a decode step that includes it is launched and not yet read
    received = len(outputs[dropped])
    assert 0 < received < 10
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].append(out)
    assert len(outputs[dropped]) == received  # the launched step's token for it is dropped, not published
    assert _completions(outputs[kept])["choices"][0]["ids"] == want
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks  # no sequence holds a block


def test_overlapped_steps_under_preemption_give_the_same_tokens(smollm_path):
    """A cache too small for the batch: sequences with a pending token are preempted and recomputed."""
    requests = [(prompt, {"temperature": 0.0, "max_tokens": 24, "ignore_eos": True}, None)
                for prompt, _, _ in REQUESTS[:4]]
    runs = []
    for overlap in (False, True):
        engine = _engine(smollm_path, overlap, num_kv_blocks=8, block_size=16)
        outputs = _run(engine, requests)
        runs.append([_completions(out)["choices"][0]["ids"] for out in outputs.values()])
        assert engine.scheduler.num_preemptions > 0
    assert runs[1] == runs[0] and all(len(ids) == 24 for ids in runs[0])


def test_think_phases_are_tagged_from_the_generated_tokens(smollm_path, one_step_outputs):
    """Think tags chosen among the tokens a greedy run generates: overlapped and one-at-a-time runs tag every
    captured row like a scan of the tokens up to the row's query (its own token included)."""
    ids = _completions(one_step_outputs[0])["choices"][0]["ids"]  # REQUESTS[0], greedy, 12 tokens
    start, end = ids[2], ids[6]
    prompt, params, _ = REQUESTS[0]
    capture = {"mode": "fingerprint", "include_prompt": True}
    phases = []
    for overlap in (False, True):
        engine = _engine(smollm_path, overlap, max_num_batched_tokens=48, think_start_token_ids=[start],
                         think_end_token_ids=[end])
        out = next(iter(_run(engine, [(prompt, params, capture)]).values()))
        got = _completions(out)["choices"][0]
        assert got["ids"] == ids
        tokens = engine.tokenize_prompt(prompt) + ids
        inside, expected = False, {}
        for position, token in enumerate(tokens):
            inside = True if token == start else False if token == end else inside
            expected[position] = "think" if inside else "output"
        phases.append([(r["query_position"], r["think_phase"]) for r in got["records"]])
        assert all(phase == expected[position] for position, phase in phases[-1])
    assert phases[0] == phases[1] and {"think", "output"} <= {phase for _, phase in phases[0]}
