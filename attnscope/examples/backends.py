"""Where a demo runs: the embedded engine in this process, or a running attnscope server over HTTP.

Both read the answer and ``attn_capture_data`` (vLLM family, full matrices) from an
OpenAI-shaped response with ``attnscope.client.extract_attention_from_response``, and
know the text of every token position.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from attnscope.client import capture_body, extract_attention_from_response
from attnscope.engine.engine_config import EngineConfig
from attnscope.engine.llm_engine import LLMEngine
from attnscope.engine.tokenizer import Tokenizer
from attnscope.engine.weights import default_model_path, load_checkpoint
from attnscope.examples.demos import Demo

UNKNOWN_TOKEN = "?"
SMOLLM2_LAYERS = (17, 18, 29)


@dataclass
class DemoRun:
    """A finished demo request."""

    model: str
    answer: str
    attention: dict[int, dict] = field(repr=False)
    tokens: list[str] = field(repr=False)


def default_layers(num_layers: int) -> list[int]:
    """Layers 17 and 18 (where they exist) and the last one: SmolLM2's retrieval layers."""
    return sorted({layer for layer in SMOLLM2_LAYERS[:2] if layer < num_layers} | {num_layers - 1})


def run_embedded(demo: Demo, layers: list[int] | None, max_tokens: int, model: str | None) -> DemoRun:
    """Greedy chat completion on an in-process ``LLMEngine`` with full capture of ``layers``."""
    engine = LLMEngine(EngineConfig(model=model, kv_cache_memory_gib=0.5))
    layers = layers or default_layers(engine.model_config.num_layers)
    out = engine.generate(messages=[_messages(demo)], params={"temperature": 0.0, "max_tokens": max_tokens},
                          capture={"mode": "full", "layers": layers})[0]
    choice = out.completions[0]
    name = model or default_model_path().name
    response = {
        "id": out.request_id,
        "object": "chat.completion",
        "model": name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": choice.text},
                     "finish_reason": choice.finish_reason}],
        "attn_capture_data": choice.attn_capture_data,
    }
    ids = out.prompt_token_ids + choice.token_ids
    tokens = [engine.tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    return DemoRun(name, choice.text, extract_attention_from_response(response), tokens)


def run_remote(demo: Demo, base_url: str, model: str | None, layers: list[int] | None, max_tokens: int,
               tokenizer_path: str | None) -> DemoRun:
    """Greedy chat completion on an attnscope server through the ``openai`` SDK with ``attn_capture``.

    Prompt tokens are labelled with a local tokenizer (``tokenizer_path``, default the
    embedded model's), output tokens from the response's logprobs.
    """
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"))
    model = model or client.models.list().data[0].id
    completion = client.chat.completions.create(
        model=model, messages=_messages(demo), max_tokens=max_tokens, temperature=0.0, logprobs=True,
        extra_body=capture_body("full", layers=layers or list(SMOLLM2_LAYERS)),
    )
    choice = completion.choices[0]
    output = [lp.token for lp in (choice.logprobs.content or [])] if choice.logprobs else []
    attention = extract_attention_from_response(completion)
    prompt_len = next(iter(attention.values()))["token_meta"]["prompt_len"] if attention else None
    prompt = _prompt_tokens(demo, tokenizer_path)
    if prompt_len is not None and len(prompt) != prompt_len:
        prompt = [UNKNOWN_TOKEN] * prompt_len
    return DemoRun(model, choice.message.content or "", attention, prompt + output)


def _messages(demo: Demo) -> list[dict]:
    """The demo as one user message."""
    return [{"role": "user", "content": demo.prompt}]


def _prompt_tokens(demo: Demo, tokenizer_path: str | None) -> list[str]:
    """Texts of the chat-templated prompt's tokens under a local tokenizer."""
    checkpoint = load_checkpoint(tokenizer_path or default_model_path())
    if checkpoint.gguf_reader is not None:
        tokenizer = Tokenizer.from_gguf(checkpoint.gguf_reader)
    else:
        tokenizer = Tokenizer.from_pretrained_dir(checkpoint.path)
    ids = tokenizer.encode(tokenizer.apply_chat_template(_messages(demo)), add_special_tokens=False)
    return [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
