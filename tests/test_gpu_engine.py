"""The engine on a CUDA GPU (bf16, Triton kernels) against itself on the CPU (float32 torch twins).

Skipped without a GPU. A tiny random Llama with a small BPE tokenizer trained here, so
nothing needs downloading: the GPU run's captures must match the CPU run's on the same
token sequence within bf16 tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CORPUS = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine",
          "all that glitters is not gold", "the early bird catches the worm"] * 50


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random-weight Llama-shaped checkpoint folder with a trained byte-level BPE tokenizer."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=512, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=256, intermediate_size=512,
                                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                                      max_position_embeddings=2048, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.06) if p.dim() > 1 else p.fill_(1.0)
    model.save_pretrained(folder)
    return folder


def _engine(folder, device):
    from attnscope.engine.engine_config import EngineConfig
    from attnscope.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(model=str(folder), device=device, num_kv_blocks=256))


def test_gpu_decode_capture_matches_cpu(tiny_llama):
    gpu, cpu = _engine(tiny_llama, "cuda"), _engine(tiny_llama, "cpu")
    assert gpu.dtype == torch.bfloat16
    prompt = " ".join(CORPUS[:6])
    capture = {"mode": "raw", "top_k": 8, "layers": "auto", "include_prompt": True}
    out = gpu.generate([prompt], {"temperature": 0.0, "max_tokens": 24, "ignore_eos": True}, capture=capture)[0]
    tokens = out.prompt_token_ids + out.completions[0].token_ids
    ref = cpu.generate(prompt_token_ids=[tokens], params={"max_tokens": 1}, capture=capture)[0]
    ref_rows = {e["query_position"]: e for e in ref.completions[0].attention_tokens}
    for entry in out.completions[0].attention_tokens:
        expected = ref_rows[entry["query_position"]]
        for layer, data in entry["layers"].items():
            want = expected["layers"][layer]
            probs = dict(zip(want["token_positions"], want["true_probs"]))
            top = [p for p, v in zip(data["token_positions"], data["true_probs"]) if v > want["true_probs"][-1] + 0.02]
            assert set(top) <= set(probs), (entry["query_position"], layer)
            for p in top:
                assert abs(dict(zip(data["token_positions"], data["true_probs"]))[p] - probs[p]) < 0.02


def test_gpu_fingerprint_matches_cpu(tiny_llama):
    gpu, cpu = _engine(tiny_llama, "cuda"), _engine(tiny_llama, "cpu")
    capture = {"mode": "fingerprint", "layers": "auto", "include_prompt": True, "fingerprint_max_steps": None}
    out = gpu.generate([" ".join(CORPUS[:8])], {"temperature": 0.0, "max_tokens": 16, "ignore_eos": True},
                       capture=capture)[0]
    tokens = out.prompt_token_ids + out.completions[0].token_ids
    ref = cpu.generate(prompt_token_ids=[tokens], params={"max_tokens": 1}, capture=capture)[0]
    ref_rows = {e["query_position"]: e["fingerprint"] for e in ref.completions[0].attention_tokens}
    got = out.completions[0].attention_tokens
    assert len(got) == len(out.prompt_token_ids) - 1 + 16
    for entry in got:
        assert np.allclose(entry["fingerprint"], ref_rows[entry["query_position"]], atol=1.5e-2)
