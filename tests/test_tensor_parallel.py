"""Tensor parallelism on the CPU: rank workers as Ray actors over gloo, checked against one device.

SmolLM2 has 9 query and 3 KV heads: over 2 ranks the split is uneven (6 + 3 query heads,
2 + 1 KV heads), over 3 ranks each rank holds one KV head. Tokens must equal the single-
device engine's and every capture output must match it within float32 tolerance.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import openai
import pytest
import ray
from ray import serve

from attnscope.deployments.application import build_app
from attnscope.engine.engine_config import EngineConfig
from attnscope.engine.llm_engine import LLMEngine
from loopback import free_port

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of Italy is", "Once upon a time, in a small village by the sea, there lived"]
GREEDY = {"temperature": 0.0, "max_tokens": 8}
CAPTURES = [
    {"mode": "raw", "top_k": 6, "layers": "auto"},
    {"mode": "fingerprint", "layers": [3, 17]},
    {"mode": "raw", "top_k": 4, "layers": [18], "head_ids": [6, 7], "include_prompt": True},
]


def _tp_engine(smollm_path, size: int) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(smollm_path), device="cpu", num_kv_blocks=64, num_threads=1,
                                  tensor_parallel_size=size, rank_num_cpus=0.5))


def _layers(entry: dict) -> dict[str, dict]:
    return entry["layers"] if "layers" in entry else {str(entry.get("layer_id")): entry}


def _assert_same_capture(tp_entries: list[dict], one_entries: list[dict]) -> None:
    assert len(tp_entries) == len(one_entries)
    for tp, one in zip(tp_entries, one_entries):
        assert (tp.get("decode_step"), tp["query_position"]) == (one.get("decode_step"), one["query_position"])
        if "fingerprint" in one:
            assert np.allclose(tp["fingerprint"], one["fingerprint"], atol=1e-5)
            continue
        for layer, data in _layers(one).items():
            mine = _layers(tp)[layer]
            assert np.allclose(mine["true_probs"], data["true_probs"], atol=1e-5)
            assert np.allclose(mine["topk_logits"], data["topk_logits"], atol=1e-4)
            separated = np.diff(data["true_probs"]).__abs__().min(initial=1.0) > 1e-4
            if separated:
                assert mine["token_positions"] == data["token_positions"]


@pytest.mark.parametrize("size", [2, 3])
def test_tensor_parallel_matches_one_device(ray_cluster, smollm_engine, smollm_path, size: int):
    engine = _tp_engine(smollm_path, size)
    try:
        assert [o.completions[0].token_ids for o in engine.generate(PROMPTS, GREEDY)] == \
               [o.completions[0].token_ids for o in smollm_engine.generate(PROMPTS, GREEDY)]
        for capture in CAPTURES:
            tp = engine.generate(PROMPTS[:1], GREEDY, capture=capture)[0].completions[0]
            one = smollm_engine.generate(PROMPTS[:1], GREEDY, capture=capture)[0].completions[0]
            assert tp.token_ids == one.token_ids
            _assert_same_capture(tp.attention_tokens, one.attention_tokens)
        masked_derotated = {"mode": "full", "layers": [5], "mask_prefix": 3, "derotate": True}
        for full in ({"mode": "full", "layers": [5]}, masked_derotated):
            tp = engine.generate(PROMPTS[:1], {**GREEDY, "max_tokens": 3}, capture=full)[0].completions[0]
            one = smollm_engine.generate(PROMPTS[:1], {**GREEDY, "max_tokens": 3}, capture=full)[0].completions[0]
            assert tp.attn_capture_data[0]["shape"] == one.attn_capture_data[0]["shape"]
            assert tp.attn_capture_data[0]["data"] == one.attn_capture_data[0]["data"] or np.allclose(
                _decode(tp.attn_capture_data[0]), _decode(one.attn_capture_data[0]), atol=1e-3)
    finally:
        engine.close()


def _decode(record: dict) -> np.ndarray:
    import base64
    import gzip

    return np.frombuffer(gzip.decompress(base64.b64decode(record["data"])), dtype=np.float16).astype(np.float32)


def test_a_dead_rank_fails_the_engine_cleanly(ray_cluster, smollm_path):
    engine = _tp_engine(smollm_path, 2)
    engine.start()
    try:
        rid = engine.add_request("Count slowly:", params={"temperature": 0.0, "max_tokens": 400, "ignore_eos": True})
        deadline = time.monotonic() + 60
        while engine.stats().num_running == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ray.kill(engine.runner.workers[1])
        with pytest.raises(RuntimeError, match="engine loop failed"):
            while time.monotonic() < deadline:
                engine.raise_if_failed()
                time.sleep(0.05)
        assert rid
    finally:
        engine.close()



def test_serve_replica_with_rank_workers_answers_and_recovers_from_a_dead_rank(ray_cluster, smollm_engine):
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"device": "cpu", "num_kv_blocks": 64, "engine_num_cpus": 0.25, "rank_num_cpus": 0.5,
                             "num_threads": 1, "tensor_parallel_size": 2}), name="tp", route_prefix="/tp")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/tp/v1", api_key="none", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        expected = smollm_engine.generate(messages=[messages], params=GREEDY)[0].completions[0].text
        out = client.chat.completions.create(model=client.models.list().data[0].id, messages=messages, **GREEDY,
                                             extra_body={"return_attention_tokens": True, "top_k_attention": 4})
        assert out.choices[0].message.content == expected
        assert len(out.choices[0].model_extra["attention_tokens"]) == out.usage.completion_tokens
        (rank,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith("-1")
                   and a["name"].startswith("attnscope-ranks-")]
        ray.kill(ray.get_actor(rank["name"], namespace=rank["namespace"]))
        deadline = time.monotonic() + 150
        answered = None
        while answered != expected:
            assert time.monotonic() < deadline, "the replica did not recover"
            try:
                answered = client.chat.completions.create(model=out.model, messages=messages, **GREEDY
                                                          ).choices[0].message.content
            except openai.APIError:
                time.sleep(1.0)
    finally:
        serve.shutdown()


def test_rank_processes_without_ray_match_one_device(smollm_engine, smollm_path):
    engine = LLMEngine(EngineConfig(model=str(smollm_path), device="cpu", num_kv_blocks=64, num_threads=1,
                                    tensor_parallel_size=2, tensor_parallel_backend="processes"))
    try:
        capture = CAPTURES[0]
        tp = engine.generate(PROMPTS, GREEDY, capture=capture)
        one = smollm_engine.generate(PROMPTS, GREEDY, capture=capture)
        for mine, theirs in zip(tp, one):
            assert mine.completions[0].token_ids == theirs.completions[0].token_ids
            _assert_same_capture(mine.completions[0].attention_tokens, theirs.completions[0].attention_tokens)
        os.kill(engine.runner.pids[1], signal.SIGKILL)
        deadline = time.monotonic() + 30
        with pytest.raises(RuntimeError, match="rank 1"):
            while time.monotonic() < deadline:
                engine.check_health()
                time.sleep(0.05)
    finally:
        engine.close()
