"""Client helpers on real engine output: full-matrix decoding, the analyzer, raw records, request bodies, demos."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

try:  # the HTTP library under the openai SDK: httpx2 from openai 3, httpx before
    import httpx2 as httpx
except ImportError:
    import httpx

from attnscope.capture import CaptureFieldError, CaptureParams
from attnscope.client import (
    AttentionAnalyzer,
    attention_tokens,
    captured_mass,
    capture_body,
    extract_attention_from_response,
    true_probs,
)

MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]
GREEDY = {"temperature": 0.0, "max_tokens": 6}


def generate(engine, capture):
    """One greedy chat completion with ``capture``; its ``FinalOutput``."""
    return engine.generate(messages=[MESSAGES], params=GREEDY, capture=capture)[0]


def chat_completion(out, **choice_extra) -> dict:
    """An engine output wrapped as an OpenAI ``chat.completion`` body."""
    choice = out.completions[0]
    return {
        "id": out.request_id, "object": "chat.completion", "created": 0, "model": "smollm2",
        "choices": [{"index": 0, "finish_reason": choice.finish_reason,
                     "message": {"role": "assistant", "content": choice.text}, **choice_extra}],
    }


@pytest.fixture(scope="module")
def full_output(smollm_engine):
    return generate(smollm_engine, {"mode": "full", "layers": [2, 18]})


@pytest.fixture(scope="module")
def full_response(full_output) -> dict:
    return {**chat_completion(full_output), "attn_capture_data": full_output.completions[0].attn_capture_data}


def test_extract_decodes_every_response_form(full_output, full_response):
    prompt_len = len(full_output.prompt_token_ids)
    t = prompt_len + len(full_output.completions[0].token_ids) - 1
    in_choice = chat_completion(full_output, attn_capture_data=full_response["attn_capture_data"])
    forms = [full_response, json.dumps(full_response), json.dumps(full_response).encode(),
             ChatCompletion.model_validate(full_response), httpx.Response(200, json=full_response),
             in_choice, ChatCompletion.model_validate(in_choice)]
    decoded = [extract_attention_from_response(form) for form in forms]
    for layers in decoded:
        assert sorted(layers) == [2, 18]
        for layer, data in layers.items():
            scores = data["scores"]
            assert scores.dtype == np.float32 and scores.shape == (t, 9, t) == data["shape"]
            assert data["layer"] == layer and data["token_meta"]["prompt_len"] == prompt_len
            assert np.allclose(scores.sum(-1), 1.0, atol=5e-3)
            rows, keys = np.tril_indices(t)
            prefix = np.zeros((t, 9))
            np.add.at(prefix, rows, scores[rows, :, keys])
            assert np.allclose(prefix, 1.0, atol=5e-3)
            assert np.all(scores[np.triu_indices(t, 1)[0], :, np.triu_indices(t, 1)[1]] == 0)
            assert np.array_equal(scores, decoded[0][layer]["scores"])
    assert extract_attention_from_response(chat_completion(full_output)) == {}


def test_analyzer_top_tokens_are_the_argsort_of_the_matrix(full_output, full_response):
    layer = extract_attention_from_response(full_response)[18]
    scores, prompt_len = layer["scores"], len(full_output.prompt_token_ids)
    analyzer = AttentionAnalyzer(scores, layer["token_meta"])
    t = scores.shape[0]
    for query in (t - 1, prompt_len - 1, 7):
        for head in (None, *range(9)):
            weights = scores[query].mean(0) if head is None else scores[query, head]
            expected = np.argsort(-weights[: query + 1], kind="stable")[:6]
            top = analyzer.top_attended_tokens(query, top_k=6, head_idx=head)
            assert [k for k, _, _ in top] == expected.tolist()
            assert [w for _, w, _ in top] == pytest.approx(weights[expected].tolist())
            assert [kind for _, _, kind in top] == ["output" if k >= prompt_len else "prompt" for k in expected]
    assert analyzer.top_attended_tokens() == analyzer.top_attended_tokens(t - 1)
    assert analyzer.attention_for_token(3).shape == (9, t)
    assert np.array_equal(analyzer.attention_for_token(3, head_idx=4), scores[3, 4])
    with pytest.raises(ValueError):
        analyzer.top_attended_tokens(3, avg_heads=False)
    with pytest.raises(IndexError):
        analyzer.top_attended_tokens(t)


def test_cross_modal_attention(full_output, full_response):
    layer = extract_attention_from_response(full_response)[2]
    scores, prompt_len = layer["scores"], len(full_output.prompt_token_ids)
    assert AttentionAnalyzer(scores, layer["token_meta"]).cross_modal_attention() == 0.0
    meta = {**layer["token_meta"], "vision_ranges": [{"start": 2, "end": 6}],
            "lang_ranges": [{"start": 0, "end": 2}, {"start": 6, "end": prompt_len}]}
    analyzer = AttentionAnalyzer(scores, meta)
    rows = scores[2:6].mean(1)
    assert analyzer.cross_modal_attention() == pytest.approx(rows[:, :2].sum() / rows.sum(), rel=1e-5)
    head = scores[2:6, 3]
    assert analyzer.cross_modal_attention(head_idx=3) == pytest.approx(head[:, :2].sum() / head.sum(), rel=1e-5)
    assert analyzer.token_type(3) == "vision" and analyzer.token_type(prompt_len) == "output"


def test_true_probs_single_head_and_multi_layer(smollm_engine):
    single = generate(smollm_engine, {"mode": "raw", "top_k": 5, "layers": [18], "head_ids": [6]})
    entries = json.loads(json.dumps(single.completions[0].attention_tokens))
    assert entries and all(e["logsumexp_candidates"] != 0.0 for e in entries)
    for entry in entries:
        assert np.allclose(true_probs(entry), entry["true_probs"], rtol=1e-5, atol=1e-7)
        assert captured_mass(entry) == pytest.approx(entry["topk_mass"], rel=1e-5)
    multi = generate(smollm_engine, {"mode": "raw", "top_k": 5, "layers": [2, 18]})
    for entry in multi.completions[0].attention_tokens:
        probs, masses = true_probs(entry), captured_mass(entry)
        assert sorted(probs) == sorted(masses) == [2, 18]
        for layer, fields in entry["layers"].items():
            assert np.allclose(probs[int(layer)], fields["true_probs"], rtol=1e-5, atol=1e-7)
            assert masses[int(layer)] == pytest.approx(fields["topk_mass"], rel=1e-5)


def test_captured_mass_of_sketch_records(smollm_engine):
    out = generate(smollm_engine, {"mode": "sketch", "layers": [18]})
    for entry in out.completions[0].attention_tokens:
        assert captured_mass(entry) == {18: entry["layer_sketches"]["18"]["mass_captured"]}


def test_attention_tokens_reads_choices_deltas_and_sdk_objects(smollm_engine):
    out = generate(smollm_engine, {"mode": "raw", "top_k": 4, "layers": [18]})
    entries = out.completions[0].attention_tokens
    response = chat_completion(out, attention_tokens=entries)
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "smollm2",
             "choices": [{"index": 0, "delta": {"content": "Red", "attention_tokens": entries[:2]}}]}
    sdk_response = ChatCompletion.model_validate(response)
    sdk_chunk = ChatCompletionChunk.model_validate(chunk)
    assert attention_tokens(response) == entries
    assert attention_tokens(response["choices"][0]) == entries
    assert attention_tokens(json.dumps(response)) == entries
    assert attention_tokens(sdk_response) == entries
    assert attention_tokens(sdk_response.choices[0]) == entries
    assert attention_tokens(chunk) == entries[:2]
    assert attention_tokens(sdk_chunk) == entries[:2]
    assert attention_tokens(sdk_chunk.choices[0]) == entries[:2]
    assert attention_tokens(sdk_response, index=1) == []
    assert attention_tokens(chat_completion(out)) == []


def test_capture_body_speaks_both_families():
    raw = capture_body(top_k=8, layers=[2, 18], head_ids=[6], include_prompt=True)
    assert raw == {"return_attention_tokens": True, "top_k_attention": 8, "attention_capture_layers": "2,18",
                   "attention_capture_head_ids": [6], "include_prompt_attention": True}
    assert CaptureParams.from_wire(raw) == CaptureParams(top_k=8, layers=(2, 18), head_ids=(6,), include_prompt=True)
    assert CaptureParams.from_wire(capture_body("sketch", layers="auto")).mode == "sketch"
    fingerprint = capture_body("fingerprint", fingerprint_only=True, stride=2)
    assert CaptureParams.from_wire(fingerprint) == CaptureParams(mode="fingerprint", stride=2)
    assert capture_body("full", layers=[17, 18, 29]) == {"attn_capture": 1, "attn_capture_layers": "17,18,29"}
    assert CaptureParams.from_wire(capture_body("full")) == CaptureParams(mode="full")
    assert CaptureParams.from_wire(capture_body("full", mask_prefix=4)) == CaptureParams(mode="full", mask_prefix=4)
    with pytest.raises(ValueError, match="top_k"):
        capture_body("full", top_k=5)
    with pytest.raises(CaptureFieldError) as err:
        capture_body(top_k=99)
    assert err.value.field == "top_k_attention"


def test_needle_example_runs_in_process():
    result = subprocess.run([sys.executable, "-m", "attnscope.examples", "needle", "--layers", "18", "--max-tokens", "12"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.index("Answer:") < result.stdout.index("── L18 (")
    assert "◀" in result.stdout
