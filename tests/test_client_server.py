"""``attnscope.client`` and the examples CLI against a real Serve app on loopback.

One application (``client``, route ``/``) on its own Serve instance and free port, started
on the session's Ray cluster like ``tests/test_serve.py`` does (its module fixture shuts
Serve down at the end, so the two modules never share a port or an app name).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import openai
import pytest
from ray import serve

from attnscope.client import capture_body, extract_attention_from_response, stream_attention
from attnscope.deployments.application import build_app
from loopback import free_port

pytestmark = pytest.mark.slow

APP = "client"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
ENGINE = {"device": "cpu", "num_kv_blocks": 64, "engine_num_cpus": 0.5, "num_threads": 2}



@pytest.fixture(scope="module")
def base_url(ray_cluster):
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(ENGINE), name=APP, route_prefix="/")
    yield f"http://127.0.0.1:{port}/v1"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def test_stream_attention_text_matches_the_whole_completion(client, model):
    kwargs = {"model": model, "messages": CHAT, "max_tokens": 8, "temperature": 0.0}
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    pieces = list(stream_attention(client, **kwargs, extra_body=capture_body("raw", top_k=4, layers="last")))
    assert all(isinstance(text, str) and isinstance(entries, list) for text, entries in pieces)
    assert "".join(text for text, _ in pieces) == whole and whole
    entries = [e for _, batch in pieces for e in batch]
    assert len(entries) == 8
    first = entries[0]
    fields = first["layers"][next(iter(first["layers"]))] if "layers" in first else first
    assert len(fields["token_positions"]) == 4 and len(fields["topk_logits"]) == 4


def test_extract_attention_from_raw_response_rows_sum_to_one(client, model):
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=CHAT, max_tokens=4, temperature=0.0,
        extra_body=capture_body("full", layers=[0, 18]))
    assert raw.http_response.status_code == 200
    attention = extract_attention_from_response(raw)
    assert sorted(attention) == [0, 18]
    for layer, data in attention.items():
        scores = data["scores"]
        t, heads, t2 = scores.shape
        assert t == t2 and heads > 0 and data["layer"] == layer and data["model"] == model
        assert data["token_meta"]["prompt_len"] < t
        np.testing.assert_allclose(scores.sum(axis=-1), 1.0, atol=2e-2)
        assert np.all(np.triu(scores.mean(axis=1), k=1) == 0)  # causal: nothing above the diagonal


def test_needle_example_against_the_server(base_url):
    proc = subprocess.run(
        [sys.executable, "-m", "attnscope.examples", "needle", "--base-url", base_url, "--layers", "18",
         "--max-tokens", "12"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 0, proc.stderr
    assert "── L18 (" in proc.stdout and "◀" in proc.stdout, proc.stdout
