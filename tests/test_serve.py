"""The OpenAI-compatible Serve endpoint, driven over real HTTP on loopback by the openai SDK and raw requests.

Three applications share one Serve instance on the session's Ray cluster, each with its
own engine on the embedded model (CPU, 64 KV blocks): ``open`` (no guardrails),
``guarded`` (API key, one concurrent capture, system-prompt masking, capture on by
default with top-k 3, one CORS origin) and ``prod`` (capture disabled in production).
Three more live only for their test: ``lease`` (an ingress replica is killed), ``yaml``
(deployed by ``serve deploy`` from the shipped ``deploy/serve-config.yaml``) and ``affinity``
(two engine replicas behind the prefix-affinity router).
"""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import openai
import pytest
import ray
import yaml
from ray import serve

from attnscope.deployments.application import build_app
from attnscope.engine.tokenizer import Tokenizer
from attnscope.engine.weights import load_checkpoint
from loopback import free_port

pytestmark = pytest.mark.slow

ENGINE = {"device": "cpu", "num_kv_blocks": 64, "engine_num_cpus": 0.5, "num_threads": 2}
ROOT = Path(__file__).resolve().parent.parent
KEY = "attn-secret"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0.0, "max_tokens": 6}



@pytest.fixture(scope="module")
def serve_port(ray_cluster):
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


def _deploy(port: int, name: str, prefix: str, **guardrails) -> str:
    serve.run(build_app({**ENGINE, **guardrails}), name=name, route_prefix=prefix)
    return f"http://127.0.0.1:{port}{prefix.rstrip('/')}"


@pytest.fixture(scope="module")
def open_url(serve_port):
    return _deploy(serve_port, "open", "/")


@pytest.fixture(scope="module")
def guarded_url(serve_port):
    return _deploy(serve_port, "guarded", "/guarded", attention_api_key=KEY, attention_max_concurrent_capture=1,
                   attention_mask_system_prompt=True, return_attention_tokens=True, attention_tokens_top_k=3,
                   attention_cors_origins="http://allowed.example")


@pytest.fixture(scope="module")
def prod_url(serve_port):
    return _deploy(serve_port, "prod", "/prod", attention_disable_in_production=True, attention_fingerprint_mode=True)


@pytest.fixture(scope="module")
def model(open_url):
    return _client(open_url).models.list().data[0].id


def _client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def _http(url: str, path: str, body: dict | bytes | None = None, headers: dict | None = None,
          method: str | None = None) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            raw, status, hdrs = resp.read(), resp.status, dict(resp.headers)
    except urllib.error.HTTPError as err:
        raw, status, hdrs = err.read(), err.code, dict(err.headers)
    assert b"Traceback" not in raw
    hdrs = {k.lower(): v for k, v in hdrs.items()}
    return status, hdrs, json.loads(raw) if hdrs.get("content-type", "").startswith("application/json") else {}


def _open_stream(url: str, path: str, body: dict, headers: dict | None = None) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    conn.request("POST", parts.path + path, body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json", **(headers or {})})
    return conn, conn.getresponse()


def _events(resp: http.client.HTTPResponse):
    """Payloads of server-sent events, '[DONE]' included."""
    while line := resp.readline():
        line = line.strip()
        if line.startswith(b"data: "):
            payload = line[6:].decode()
            yield payload if payload == "[DONE]" else json.loads(payload)


def _engine(app: str):
    return serve.get_deployment_handle("EngineDeployment", app_name=app)


def _engine_stats(app: str) -> dict:
    return _engine(app).stats.remote().result().model_dump()


def _open_capture_sessions(app: str) -> int:
    return serve.get_deployment_handle("CaptureLimiter", app_name=app).count.remote().result()


def _await_no_capture_sessions(app: str, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while _open_capture_sessions(app):
        assert time.monotonic() < deadline
        time.sleep(0.1)


# ------------------------------------------------------------------- plain generation

def test_models_health_and_openapi(open_url, model):
    status, _, models = _http(open_url, "/v1/models")
    assert status == 200 and models["data"][0]["id"] == model and models["data"][0]["max_model_len"] == 1024
    status, _, health = _http(open_url, "/health")
    assert status == 200 and health["num_running"] == 0
    status, _, schema = _http(open_url, "/openapi.json")
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/attention/capabilities",
            "/health"} <= set(schema["paths"])
    body = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"return_attention_tokens", "top_k_attention", "attn_capture", "max_completion_tokens"} <= set(body)


def test_chat_answers_and_streams_the_same_tokens(open_url, model):
    client = _client(open_url)
    whole = client.chat.completions.create(model=model, messages=CHAT, **GREEDY)
    assert "Paris" in whole.choices[0].message.content
    assert whole.usage.completion_tokens == 6 and whole.choices[0].finish_reason == "length"
    assert not (whole.choices[0].model_extra or {}).get("attention_tokens")
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_chat_options_n_seed_logprobs_and_max_completion_tokens(open_url, model):
    client = _client(open_url)
    kwargs = {"model": model, "messages": CHAT, "temperature": 1.0, "seed": 7, "n": 2, "max_completion_tokens": 5}
    first, again = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    assert len(first.choices) == 2 and [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert first.usage.completion_tokens == 10
    lp = client.chat.completions.create(model=model, messages=CHAT, logprobs=True, top_logprobs=2, **GREEDY)
    content = lp.choices[0].logprobs.content
    assert len(content) == 6 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert "".join(t.token for t in content) == lp.choices[0].message.content


def test_completions_from_text_and_token_ids(open_url, model):
    client = _client(open_url)
    text = client.completions.create(model=model, prompt="The capital of France is", logprobs=1, **GREEDY)
    assert "Paris" in text.choices[0].text and len(text.choices[0].logprobs.tokens) == 6
    ids = client.completions.create(model=model, prompt=[504, 3575, 282, 4649, 314], **GREEDY)
    assert ids.usage.prompt_tokens == 5
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt="The capital of France is", stream=True, **GREEDY) if c.choices)
    assert streamed == text.choices[0].text


def test_raw_sse_ends_with_done(open_url, model):
    conn, resp = _open_stream(open_url, "/v1/completions", {"model": model, "prompt": "Hello", **GREEDY})
    events = list(_events(resp))
    conn.close()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert all(e["object"] == "text_completion" for e in events[:-1])


def test_commonly_sent_unknown_fields_are_ignored(open_url, model):
    status, _, body = _http(open_url, "/v1/chat/completions", {
        "model": model, "messages": CHAT, **GREEDY, "store": False, "service_tier": "auto",
        "metadata": {"a": "b"}, "parallel_tool_calls": True, "logit_bias": {}, "user": "u1"})
    assert status == 200 and body["object"] == "chat.completion"


# ----------------------------------------------------------------------------- capture

def _check_record(mode: str, record: dict) -> None:
    assert record["think_phase"] == "output" and isinstance(record["query_position"], int)
    if mode == "raw":
        assert len(record["token_positions"]) == 4 and record["layer_id"] == 29
        assert sum(record["attention_scores"]) == pytest.approx(1.0, abs=1e-5)
        assert sum(record["true_probs"]) == pytest.approx(record["topk_mass"], abs=1e-5)
    elif mode == "sketch":
        assert record["mode"] == "sketch" and set(record["layer_sketches"]) == {"29"}
        assert len(record["layer_sketches"]["29"]["dist_hist"]) == 16
    else:
        assert len(record["fingerprint"]) == 20 and record["schema_version"] == 1 and "manifold" in record


MODES = {"raw": {"top_k_attention": 4}, "sketch": {"attention_sketch_mode": True},
         "fingerprint": {"attention_fingerprint_mode": True}}


@pytest.mark.parametrize("mode", list(MODES))
def test_capture_modes_non_streaming_and_streaming(open_url, model, mode):
    client = _client(open_url)
    extra = {"return_attention_tokens": True, **MODES[mode]}
    whole = client.chat.completions.create(model=model, messages=CHAT, extra_body=extra, **GREEDY)
    records = whole.choices[0].model_extra["attention_tokens"]
    steps = [r.get("decode_step", r.get("step")) for r in records]
    assert steps == list(range(6))
    for r in records:
        _check_record(mode, r)
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, stream=True, extra_body=extra, **GREEDY))
    assert "attention_tokens" not in chunks[0].choices[0].delta.model_extra
    streamed = [r for c in chunks[1:] for r in c.choices[0].delta.model_extra["attention_tokens"]]
    assert [r.get("decode_step", r.get("step")) for r in streamed] == steps
    if mode == "raw":
        assert [r["token_positions"] for r in streamed] == [r["token_positions"] for r in records]


def test_capture_on_completions_with_several_layers(open_url, model):
    out = _client(open_url).completions.create(model=model, prompt="1, 2, 3, 4,", extra_body={
        "return_attention_tokens": True, "attention_capture_layers": "auto", "attention_tokens_stride": 2}, **GREEDY)
    records = out.choices[0].model_extra["attention_tokens"]
    assert [r["decode_step"] for r in records] == [0, 2, 4]
    assert set(records[0]["layers"]) == {"7", "15", "22", "29"}


def _decode(entry: dict) -> np.ndarray:
    raw = gzip.decompress(base64.b64decode(entry["data"]))
    return np.frombuffer(raw, dtype=np.float16).reshape(entry["shape"]).astype(np.float32)


def test_vllm_family_full_matrices(open_url, model):
    raw = _client(open_url).chat.completions.with_raw_response.create(
        model=model, messages=CHAT, max_tokens=4, temperature=0.0,
        extra_body={"attn_capture": 1, "attn_capture_layers": "0,29"})
    body = json.loads(raw.content)
    data = body["attn_capture_data"]
    prompt, completion = body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]
    assert [d["layer_idx"] for d in data] == [0, 29]
    for entry in data:
        t = prompt + completion - 1
        assert entry["shape"] == [t, 9, t] and entry["token_meta"]["prompt_len"] == prompt
        scores = _decode(entry).transpose(1, 0, 2)  # [heads, query, key]
        future = ~np.tril(np.ones((t, t), dtype=bool))
        assert np.all(scores[:, future] == 0)
        np.testing.assert_allclose(scores.sum(axis=-1), 1.0, atol=2e-2)


def test_vllm_family_streams_matrices_on_the_last_chunk(open_url, model):
    conn, resp = _open_stream(open_url, "/v1/chat/completions", {
        "model": model, "messages": CHAT, "max_tokens": 3, "temperature": 0.0, "attn_capture": 1})
    events = list(_events(resp))
    conn.close()
    with_data = [i for i, e in enumerate(events[:-1]) if "attn_capture_data" in e]
    assert len(with_data) == 1 and events[with_data[0]]["choices"][0]["finish_reason"] == "length"
    assert _decode(events[with_data[0]]["attn_capture_data"][0]).shape[1] == 9


@pytest.mark.parametrize(("path", "fields", "param"), [
    ("/v1/chat/completions", {"return_attention_tokens": True, "top_k_attention": 65}, "top_k_attention"),
    ("/v1/chat/completions", {"return_attention_tokens": True, "attention_capture_layers": "3,99"}, "attention_capture_layers"),
    ("/v1/chat/completions", {"return_attention_tokens": True, "attention_capture_head_ids": [9]}, "attention_capture_head_ids"),
    ("/v1/chat/completions", {"return_attention_tokens": True, "attention_tokens_stride": 0}, "attention_tokens_stride"),
    ("/v1/chat/completions", {"attn_capture": 1, "attn_capture_layers": "30"}, "attn_capture_layers"),
    ("/v1/chat/completions", {"attn_capture": 1, "max_tokens": 2000}, "attn_capture"),
    ("/v1/chat/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"max_completion_tokens": -3}, "max_completion_tokens"),
    ("/v1/chat/completions", {"temperature": -0.5}, "temperature"),
    ("/v1/chat/completions", {"temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {"top_p": 0}, "top_p"),
    ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs"),
    ("/v1/chat/completions", {"logit_bias": {"42": 5}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/completions", {"prompt": "word " * 1100}, "prompt"),
    ("/v1/completions", {"prompt": "word " * 1100, "stream": True}, "prompt"),
    ("/v1/chat/completions", {"attn_capture": 1, "max_tokens": 2000, "stream": True}, "attn_capture"),
    ("/v1/completions", {"prompt": [10**7]}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"stop": 5}, "stop"),
    ("/v1/completions", {"stream_options": {"include_usage": "maybe"}}, "stream_options.include_usage"),
])
def test_bad_input_is_400_naming_the_field(open_url, model, path, fields, param):
    base = {"model": model, **({"messages": CHAT} if "chat" in path else {"prompt": "Hi"}), "max_tokens": 2}
    status, _, body = _http(open_url, path, {**base, **fields})
    assert status == 400, body
    assert body["error"]["param"] == param and body["error"]["type"] == "invalid_request_error"
    assert _engine_stats("open")["num_requests"] == 0


def test_malformed_json_unknown_model_and_unknown_route(open_url, model):
    status, _, body = _http(open_url, "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as err:
        _client(open_url).chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=2)
    assert err.value.body["param"] == "model" and err.value.body["code"] == "model_not_found"
    status, _, body = _http(open_url, "/v1/nothing-here")
    assert status == 404 and "error" in body


def test_disconnect_mid_stream_aborts_and_frees_blocks(open_url, model):
    baseline = _engine_stats("open")
    assert baseline["num_requests"] == 0
    conn, resp = _open_stream(open_url, "/v1/chat/completions", {
        "model": model, "messages": CHAT, "max_tokens": 900, "temperature": 0.0, "ignore_eos": True,
        "return_attention_tokens": True})
    events = _events(resp)
    for _ in range(4):
        next(events)
    busy = _engine_stats("open")
    assert busy["num_running"] == 1 and busy["capture_sessions"] == 1 and busy["kv_usage"] > baseline["kv_usage"]
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 5  # far less than the 900 tokens would take
    while (stats := _engine_stats("open"))["num_requests"] or stats["kv_usage"] != baseline["kv_usage"]:
        assert time.monotonic() < deadline, stats
        time.sleep(0.2)


def test_engine_abort_ends_the_stream(open_url, model):
    conn, resp = _open_stream(open_url, "/v1/chat/completions", {
        "model": model, "messages": CHAT, "max_tokens": 900, "temperature": 0.0, "ignore_eos": True})
    events = _events(resp)
    rid = next(events)["id"]
    _engine("open").abort.remote(rid).result()
    rest = list(events)
    conn.close()
    assert rest[-1] == "[DONE]" and rest[-2]["choices"][0]["finish_reason"] == "abort"
    assert _engine_stats("open")["num_requests"] == 0


# ---------------------------------------------------------------------------- guardrails

def test_capabilities_reflect_flags(open_url, guarded_url, prod_url):
    _, _, caps = _http(open_url, "/v1/attention/capabilities")
    assert caps["supported"] and caps["max_top_k"] == 64 and caps["max_layers"] == 30
    assert caps["modes"] == ["raw", "sketch", "fingerprint"] and caps["features"]["full_matrix"]
    assert caps["guardrails"] == {"max_concurrent_capture": None, "requires_api_key": False,
                                  "system_prompt_masked": False, "disabled_in_production": False}
    _, _, caps = _http(guarded_url, "/v1/attention/capabilities")
    assert caps["guardrails"] == {"max_concurrent_capture": 1, "requires_api_key": True,
                                  "system_prompt_masked": True, "disabled_in_production": False}
    assert caps["defaults"] == {"return_attention_tokens": True, "top_k_attention": 3,
                                "attention_capture_layers": "last", "mode": "raw"}
    _, _, caps = _http(prod_url, "/v1/attention/capabilities")
    assert not caps["supported"] and caps["guardrails"]["disabled_in_production"]
    assert caps["defaults"]["mode"] == "fingerprint"


def test_capture_needs_the_api_key_but_generation_does_not(guarded_url, model):
    with pytest.raises(openai.AuthenticationError) as err:
        _client(guarded_url).chat.completions.create(model=model, messages=CHAT, extra_body={"return_attention_tokens": True}, **GREEDY)
    assert err.value.status_code == 401 and err.value.body["param"] == "return_attention_tokens"
    status, _, body = _http(guarded_url, "/v1/chat/completions", {"model": model, "messages": CHAT, "attn_capture": 1, **GREEDY},
                            {"Authorization": "Bearer wrong"})
    assert status == 401 and body["error"]["param"] == "attn_capture"
    plain = _client(guarded_url).chat.completions.create(model=model, messages=CHAT, **GREEDY)
    assert "Paris" in plain.choices[0].message.content and not (plain.choices[0].model_extra or {}).get("attention_tokens")
    keyed = _client(guarded_url, KEY).chat.completions.create(model=model, messages=CHAT, **GREEDY)
    records = keyed.choices[0].model_extra["attention_tokens"]
    assert len(records) == 6 and all(len(r["token_positions"]) == 3 for r in records)
    status, _, body = _http(guarded_url, "/v1/chat/completions",
                            {"model": model, "messages": CHAT, "return_attention_tokens": False, **GREEDY},
                            {"X-Attention-Api-Key": KEY})
    assert status == 200 and "attention_tokens" not in body["choices"][0]
    status, _, body = _http(guarded_url, "/v1/completions", {"model": model, "prompt": "Hi", **GREEDY},
                            {"X-Attention-Api-Key": KEY})
    assert status == 200 and len(body["choices"][0]["attention_tokens"]) == 6


def test_system_prompt_is_masked(guarded_url, model, smollm_path):
    tokenizer = Tokenizer.from_gguf(load_checkpoint(smollm_path).gguf_reader)
    system = {"role": "system", "content": "You are Bond. The launch code is 0000."}
    masked = len(tokenizer.encode(tokenizer.apply_chat_template([system], add_generation_prompt=False),
                                  add_special_tokens=False))
    out = _client(guarded_url, KEY).chat.completions.create(
        model=model, messages=[system, {"role": "user", "content": "Hi"}], **GREEDY,
        extra_body={"top_k_attention": 64})
    first = out.choices[0].model_extra["attention_tokens"][0]
    assert first["query_position"] == out.usage.prompt_tokens - 1
    assert sorted(first["token_positions"]) == list(range(first["query_position"] + 1 - masked))
    larger = _client(guarded_url, KEY).chat.completions.create(
        model=model, messages=[system, {"role": "user", "content": "Hi"}], **GREEDY,
        extra_body={"top_k_attention": 64, "attention_mask_prefix": masked + 5})
    assert len(larger.choices[0].model_extra["attention_tokens"][0]["token_positions"]) == len(first["token_positions"]) - 5
    full = json.loads(_client(guarded_url, KEY).chat.completions.with_raw_response.create(
        model=model, messages=[system, {"role": "user", "content": "Hi"}], **GREEDY,
        extra_body={"attn_capture": 1}).content)
    t = full["usage"]["prompt_tokens"] + full["usage"]["completion_tokens"] - 1 - masked
    (entry,) = full["attn_capture_data"]
    assert entry["shape"] == [t, 9, t] and entry["token_meta"]["mask_prefix"] == masked


def test_concurrent_capture_limit_is_429_with_retry_after(guarded_url, model):
    headers = {"X-Attention-Api-Key": KEY}
    request = {"model": model, "messages": CHAT, **GREEDY}
    conn, resp = _open_stream(guarded_url, "/v1/chat/completions",
                              {**request, "max_tokens": 900, "ignore_eos": True}, headers)
    events = _events(resp)
    next(events)
    try:
        status, hdrs, body = _http(guarded_url, "/v1/chat/completions", request, headers)
        assert status == 429 and int(hdrs["retry-after"]) >= 1
        assert body["error"]["code"] == "capture_limit_exceeded"
        with pytest.raises(openai.RateLimitError):
            _client(guarded_url, KEY).completions.create(model=model, prompt="Hi", max_tokens=2)
        status, _, _ = _http(guarded_url, "/v1/chat/completions", request)
        assert status == 200 and _open_capture_sessions("guarded") == 1
    finally:
        conn.close()
    _await_no_capture_sessions("guarded", within_s=5)  # far less than the 900 tokens would take
    assert _http(guarded_url, "/v1/chat/completions", request, headers)[0] == 200
    _await_no_capture_sessions("guarded", within_s=2)


def test_refused_capture_releases_its_slot(guarded_url, model):
    headers = {"X-Attention-Api-Key": KEY}
    for _ in range(2):
        status, _, body = _http(guarded_url, "/v1/completions", {"model": model, "prompt": "word " * 1100}, headers)
        assert status == 400 and body["error"]["param"] == "prompt"
    _await_no_capture_sessions("guarded", within_s=2)
    status, _, _ = _http(guarded_url, "/v1/completions", {"model": model, "prompt": "Hi", **GREEDY}, headers)
    assert status == 200


def test_cors_origins(guarded_url, open_url):
    preflight = {"Origin": "http://allowed.example", "Access-Control-Request-Method": "POST"}
    status, hdrs, _ = _http(guarded_url, "/v1/chat/completions", headers=preflight, method="OPTIONS")
    assert status == 200 and hdrs["access-control-allow-origin"] == "http://allowed.example"
    status, hdrs, _ = _http(guarded_url, "/v1/models", headers={"Origin": "http://evil.example"})
    assert status == 200 and "access-control-allow-origin" not in hdrs
    _, hdrs, _ = _http(open_url, "/v1/models", headers={"Origin": "http://anywhere.example"})
    assert hdrs["access-control-allow-origin"] == "*"


def test_capture_disabled_in_production(prod_url, model):
    for fields, param in (({"return_attention_tokens": True}, "return_attention_tokens"), ({"attn_capture": 1}, "attn_capture")):
        status, _, body = _http(prod_url, "/v1/chat/completions", {"model": model, "messages": CHAT, **GREEDY, **fields})
        assert status == 400 and body["error"]["param"] == param and body["error"]["code"] == "capture_disabled"
    plain = _client(prod_url).chat.completions.create(model=model, messages=CHAT, **GREEDY)
    assert "Paris" in plain.choices[0].message.content


def _named_actors(fragment: str) -> list[dict]:
    return [a for a in ray.util.list_named_actors(all_namespaces=True) if fragment in a["name"]]


def test_a_dead_ingress_replicas_capture_sessions_free_when_its_lease_lapses(serve_port, model):
    lease_s = 2.0
    url = _deploy(serve_port, "lease", "/lease", engine_num_cpus=0.25, attention_max_concurrent_capture=1,
                  attention_capture_lease_s=lease_s)
    request = {"model": model, "messages": CHAT, **GREEDY, "return_attention_tokens": True}
    try:
        conn, resp = _open_stream(url, "/v1/chat/completions", {**request, "max_tokens": 900, "ignore_eos": True})
        next(_events(resp))
        assert _open_capture_sessions("lease") == 1
        (ingress,) = _named_actors("lease#OpenAIIngress")
        ray.kill(ray.get_actor(ingress["name"], namespace=ingress["namespace"]), no_restart=False)
        conn.close()
        killed = time.monotonic()
        _await_no_capture_sessions("lease", within_s=lease_s + 5)
        assert time.monotonic() - killed > lease_s / 2  # freed by the lapsed lease, not by a release
        deadline = time.monotonic() + 60
        while (status := _http(url, "/v1/chat/completions", request)[0]) != 200:
            assert status in (500, 502, 503) and time.monotonic() < deadline  # the replica restarts
            time.sleep(0.5)
    finally:
        serve.delete("lease")


def test_serve_deploy_from_the_shipped_config(ray_cluster, serve_port, model, tmp_path):
    config = yaml.safe_load((ROOT / "deploy" / "serve-config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": serve_port}
    (app,) = config["applications"]
    app.update(name="yaml", route_prefix="/yaml")
    app["args"].update(device="cpu", num_kv_blocks=64, engine_num_cpus=0.25, num_threads=2)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    serve_cli = Path(sys.executable).with_name("serve")
    done = subprocess.run([str(serve_cli), "deploy", str(path), "--address", ray_cluster],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    try:
        deadline = time.monotonic() + 120
        while (state := serve.status().applications.get("yaml")) is None or state.status != "RUNNING":
            assert state is None or state.status in ("NOT_STARTED", "DEPLOYING"), state
            assert time.monotonic() < deadline
            time.sleep(0.5)
        url = f"http://127.0.0.1:{serve_port}/yaml"
        status, _, caps = _http(url, "/v1/attention/capabilities")
        assert status == 200 and caps["guardrails"]["max_concurrent_capture"] == 16
        out = _client(url).chat.completions.create(model=model, messages=CHAT, **GREEDY,
                                                   extra_body={"return_attention_tokens": True})
        assert out.choices[0].message.content and out.choices[0].model_extra["attention_tokens"]
    finally:
        serve.delete("yaml")


def test_requests_sharing_a_prompt_prefix_go_to_the_replica_that_caches_it(serve_port, model):
    url = _deploy(serve_port, "affinity", "/affinity", engine_num_cpus=0.25, num_replicas=2)
    system = {"role": "system", "content": "You are the assistant of a lighthouse museum. " * 8}
    questions = ["Who built it?", "When does it open?", "Is there a shop?", "Can I climb it?", "How tall is it?",
                 "Where do I park?"]
    try:
        cached = []
        for question in questions:
            out = _client(url).chat.completions.create(model=model, messages=[system, {"role": "user", "content": question}],
                                                       **GREEDY)
            cached.append(out.usage.prompt_tokens_details.cached_tokens)
        assert cached[0] == 0 and all(c >= 48 for c in cached[1:]), cached  # one replica holds the prefix
    finally:
        serve.delete("affinity")


def test_an_autoscaling_engine_deployment_serves(serve_port, model):
    url = _deploy(serve_port, "autoscale", "/autoscale", engine_num_cpus=0.25, num_replicas=1,
                  autoscaling_max_replicas=2)
    try:
        out = _client(url).chat.completions.create(model=model, messages=CHAT, **GREEDY)
        assert out.choices[0].message.content
        engine = serve.status().applications["autoscale"].deployments["EngineDeployment"]
        assert engine.status == "HEALTHY" and sum(engine.replica_states.values()) >= 1
    finally:
        serve.delete("autoscale")
