"""Our SmolLM2 against HF transformers on the same GGUF weights: logits, greedy text, retrieval."""

from __future__ import annotations

import random

import pytest
import torch

from attnscope.engine.attention import AttentionBatch, PrefillChunk
from attnscope.engine.kv_cache import allocate_kv_cache

PARITY_PROMPTS = [
    "The Eiffel Tower is located in",
    "def add(a, b):\n    return",
    "In 1969, Neil Armstrong became the first person to",
    "<|im_start|>user\nWrite a haiku about rain.<|im_end|>\n<|im_start|>assistant\n",
]

WORDS = ["apple", "river", "candle", "mirror", "falcon", "garden", "pencil", "thunder", "velvet", "anchor",
         "meadow", "lantern", "copper", "harbor", "violet", "saddle", "glacier", "walnut", "ember", "quartz"]
SECRETS = ["banana", "orchid", "pyramid", "tornado", "saxophone", "dolphin", "volcano", "cactus", "lighthouse",
           "avalanche", "kangaroo", "marble"]


def prefill_logits(engine, ids: list[int]) -> torch.Tensor:
    """Logits at every prompt position from one prefill through our model (fresh KV cache)."""
    model = engine.runner.model
    cfg = model.config
    block = engine.config.block_size
    blocks = (len(ids) + block - 1) // block
    caches = allocate_kv_cache(cfg.num_layers, blocks, block, cfg.num_kv_heads, cfg.head_dim, torch.float32,
                               torch.device("cpu"))
    batch = AttentionBatch(
        slot_mapping=torch.arange(len(ids)),
        prefills=[PrefillChunk(0, len(ids), 0, torch.arange(blocks))],
        decode_start=len(ids),
        decode_block_tables=torch.zeros(0, 1, dtype=torch.int32),
        decode_context_lens=torch.zeros(0, dtype=torch.int32),
        kv_caches=caches,
    )
    hidden = model(torch.tensor(ids), torch.arange(len(ids)), batch)
    return model.logits(hidden)


@pytest.mark.parametrize("prompt", PARITY_PROMPTS)
def test_logits_match_transformers(smollm_engine, hf_smollm, prompt):
    ids = smollm_engine.tokenizer.encode(prompt)
    ours = prefill_logits(smollm_engine, ids)
    with torch.inference_mode():
        theirs = hf_smollm(torch.tensor([ids])).logits[0].float()
    diff = (ours - theirs).abs().max().item()
    assert diff < 2e-3, f"max |Δlogit| = {diff:.2e}"
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize("prompt", PARITY_PROMPTS[:3])
def test_greedy_continuation_matches_transformers_for_32_tokens(smollm_engine, hf_smollm, prompt):
    ids = smollm_engine.tokenizer.encode(prompt)
    ours = smollm_engine.generate(prompt_token_ids=[ids], params={"temperature": 0.0, "max_tokens": 32,
                                                                  "ignore_eos": True})[0]
    with torch.inference_mode():
        theirs = hf_smollm.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, min_new_tokens=32)
    assert ours.completions[0].token_ids == theirs[0, len(ids):].tolist()


def haystack(rng: random.Random, secret: str) -> str:
    """40 lines of 'key-N: word' with the secret line at a random depth, then the question."""
    lines = [f"key-{i}: {rng.choice(WORDS)}" for i in range(40)]
    lines.insert(rng.randrange(len(lines) + 1), f"The secret word is {secret}.")
    return "\n".join(lines) + "\n\nWhat is the secret word?"


def test_secret_word_retrieval_at_least_as_good_as_transformers(smollm_engine, hf_smollm):
    rng = random.Random(7)
    tok = smollm_engine.tokenizer
    ours_right = theirs_right = 0
    for secret in SECRETS:
        messages = [{"role": "user", "content": haystack(rng, secret)}]
        ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
        ours = smollm_engine.generate(prompt_token_ids=[ids], params={"temperature": 0.0, "max_tokens": 12})[0]
        with torch.inference_mode():
            theirs = hf_smollm.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
        ours_right += secret in ours.completions[0].text.lower()
        theirs_right += secret in tok.decode(theirs[0, len(ids):].tolist()).lower()
    print(f"secret word found: ours {ours_right}/{len(SECRETS)}, transformers {theirs_right}/{len(SECRETS)}")
    assert ours_right >= theirs_right
    assert ours_right >= len(SECRETS) // 2
