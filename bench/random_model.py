"""Random-weight models for benchmarks: a folder the engine loads with ``load_format="dummy"``, and prompts."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers


def write_model_folder(folder: Path, shape: dict, max_len: int) -> None:
    """config.json of a Llama ``shape`` (HF config keys) and a word-level tokenizer.json covering its vocabulary.

    No weights: the engine draws them (``load_format="dummy"``), HF builds its own.
    """
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": max_len,
              "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
              "head_dim": head_dim, **shape}
    (folder / "config.json").write_text(json.dumps(config))
    vocab = {f"w{i}": i for i in range(shape["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """``count`` prompts of ``length`` random token ids (avoiding the bos/eos ids)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (count, length), generator=gen).tolist()
