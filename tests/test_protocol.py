"""The OpenAI wire protocol: requests into engine parameters, engine deltas into response shapes."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from attnscope.protocol import (
    ChatCompletionRequest,
    ChoiceDelta,
    CompletionRequest,
    RequestFieldError,
    TokenLogprobEntry,
    TopLogprobEntry,
    UsageCounts,
    capture_params,
    chat_chunk,
    chat_response,
    completion_chunk,
    merge_deltas,
)

MESSAGES = [{"role": "user", "content": "Hi"}]


def test_chat_sampling_fields_map_onto_sampling_params():
    req = ChatCompletionRequest(messages=MESSAGES, max_tokens=9, max_completion_tokens=4, top_k=-1, temperature=0,
                                stop="END", logprobs=True, top_logprobs=3, seed=5, n=2, service_tier="auto")
    params = req.sampling_params(default_max_tokens=100)
    assert (params.max_tokens, params.top_k, params.temperature, params.stop) == (4, 0, 0.0, ["END"])
    assert (params.logprobs, params.seed, params.n) == (3, 5, 2)
    assert ChatCompletionRequest(messages=MESSAGES).sampling_params(100).max_tokens == 100
    assert ChatCompletionRequest(messages=MESSAGES, logprobs=True).sampling_params(100).logprobs == 0


@pytest.mark.parametrize(("fields", "param"), [
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"stop": [""]}, "stop"),
    ({"logit_bias": {"1": 2.0}}, "logit_bias"),
])
def test_invalid_sampling_values_name_the_wire_field(fields, param):
    with pytest.raises(RequestFieldError) as err:
        ChatCompletionRequest(messages=MESSAGES, **fields).sampling_params(100)
    assert err.value.field == param


def test_chat_content_parts_and_prompt_forms():
    req = ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                         {"type": "text", "text": "b"}]}])
    assert req.engine_messages() == [{"role": "user", "content": "ab"}]
    with pytest.raises(RequestFieldError) as err:
        ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "image_url"}]}]).engine_messages()
    assert err.value.field == "messages.0.content"
    assert CompletionRequest(prompt=[[1, 2]]).engine_prompt() == {"prompt_token_ids": [1, 2]}
    assert CompletionRequest(prompt="x").engine_prompt() == {"prompt": "x"}
    with pytest.raises(RequestFieldError, match="echo"):
        CompletionRequest(prompt="x", echo=True).engine_prompt()
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=[])


def test_capture_fields_of_both_families():
    req = CompletionRequest(prompt="x", return_attention_tokens=True, top_k_attention=3, attn_capture_layers="all")
    assert req.capture_fields() == {"return_attention_tokens": True, "top_k_attention": 3, "attn_capture_layers": "all"}
    assert capture_params(req.capture_fields(), 30).top_k == 3
    full = capture_params({"attn_capture": 1, "attn_capture_layers": "all"}, 4)
    assert full.mode == "full" and full.layers == (0, 1, 2, 3)
    assert capture_params({}, 30) is None
    with pytest.raises(RequestFieldError) as err:
        capture_params({"return_attention_tokens": True, "attention_tokens_window": -1}, 30)
    assert err.value.field == "attention_tokens_window"


def _delta(index: int, text: str, **kw) -> ChoiceDelta:
    return ChoiceDelta(index=index, text=text, token_ids=[len(text)], **kw)


def test_merged_deltas_make_whole_choices():
    lp = [TokenLogprobEntry(token_id=1, token="a", logprob=-0.5, top=[TopLogprobEntry(token_id=1, token="a", logprob=-0.5)])]
    deltas = [_delta(0, "Hel", logprobs=lp, attention_tokens=[{"decode_step": 0}]), _delta(1, "x"),
              _delta(0, "lo", logprobs=lp, attention_tokens=[{"decode_step": 1}], finish_reason="stop")]
    whole = merge_deltas(deltas, 2)
    assert whole[0].text == "Hello" and whole[0].finish_reason == "stop" and len(whole[0].logprobs) == 2
    assert [r["decode_step"] for r in whole[0].attention_tokens] == [0, 1]
    assert whole[1].text == "x" and whole[1].attention_tokens is None
    body = json.loads(chat_response("id", 1, "m", whole, UsageCounts(prompt_tokens=3, completion_tokens=3)).model_dump_json())
    assert body["usage"]["total_tokens"] == 6 and body["choices"][0]["logprobs"]["content"][0]["bytes"] == [97]
    assert "attention_tokens" not in body["choices"][1] and "attn_capture_data" not in body


def test_chunks_carry_their_records_and_non_finite_floats_become_null():
    chunk = json.loads(chat_chunk("id", 1, "m", _delta(0, "a", attention_tokens=[{"topk_logits": [float("-inf")]}])).model_dump_json())
    assert chunk["object"] == "chat.completion.chunk" and chunk["choices"][0]["finish_reason"] is None
    assert chunk["choices"][0]["delta"] == {"content": "a", "attention_tokens": [{"topk_logits": [None]}]}
    lp = [TokenLogprobEntry(token_id=1, token="ab", logprob=-1.0, top=[])] * 2
    text = json.loads(completion_chunk("id", 1, "m", _delta(0, "abab", logprobs=lp), offset=5).model_dump_json())
    assert text["choices"][0]["logprobs"]["text_offset"] == [5, 7]
