"""Every supported HF model family runs exactly like transformers: logits, greedy tokens, load errors.

Each family is a tiny random-weight checkpoint written by transformers itself (safetensors +
config.json) next to the SmolLM2 tokenizer, so the engine loads it through its ordinary HF
folder path. Weights are drawn with a fixed seed and scaled so logits are far from degenerate.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from attnscope.engine.engine_config import EngineConfig
from attnscope.engine.llm_engine import InvalidRequestError, LLMEngine
from attnscope.engine.tokenizer import Tokenizer
from attnscope.engine.weights import ModelLoadError
from test_hf_parity import prefill_logits

VOCAB = 49152  # the SmolLM2 tokenizer's, so its tokenizer.json serves every family
LLAMA3_ORIGINAL_POSITIONS = 64
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
# head_dim 16 and theta 1e4 give rotary wavelengths 6, 20, 63, 199, 628, ... positions: with 64
# original positions, the 20 and 63 bands are interpolated and every longer one is divided by 8.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": LLAMA3_ORIGINAL_POSITIONS,
}
PROMPT = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a brass lantern "
    "and a notebook in which he recorded the colour of the sea, the direction of the wind, and the names "
    "of the ships that passed the rocky point. In 1887 a storm tore the roof from the cottage below, yet "
    "the light never failed. Years later, his granddaughter found the notebooks in a trunk and began to "
    "read them aloud to the children of the village, who asked"
)
MAX_NEW_TOKENS = 20


@dataclass(frozen=True)
class Family:
    """One HF architecture, the config that makes it distinctive, and what that should exercise."""

    name: str
    config_class: type[transformers.PretrainedConfig]
    model_class: type[transformers.PreTrainedModel]
    overrides: dict[str, Any]


FAMILIES = [
    # Llama 2: full multi-head attention, plain RoPE.
    Family("llama2", transformers.LlamaConfig, transformers.LlamaForCausalLM,
           {"num_key_value_heads": 4, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    # Llama 3.1+: GQA and llama3 RoPE frequency scaling.
    Family("llama3", transformers.LlamaConfig, transformers.LlamaForCausalLM,
           {"rope_parameters": LLAMA3_ROPE}),
    # Mistral: GQA, large theta; its 4096-token default sliding window is beyond these prompts.
    Family("mistral", transformers.MistralConfig, transformers.MistralForCausalLM,
           {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    # Qwen2/2.5: q/k/v projection biases and a tied LM head.
    Family("qwen2", transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
           {"tie_word_embeddings": True, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    # Qwen3: per-head q/k RMSNorm and head_dim 32 != hidden / heads = 16.
    Family("qwen3", transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
           {"head_dim": 32, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    # SmolLM2: a tied Llama with theta 1e5 and three query heads per KV head.
    Family("smollm2", transformers.LlamaConfig, transformers.LlamaForCausalLM,
           {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2, "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}),
]
FAMILY_NAMES = [family.name for family in FAMILIES]


def _randomise(model: transformers.PreTrainedModel, seed: int) -> None:
    """Fixed-seed weights: matrices ~ N(0, 0.08²), norm scales ~ 1 ± 0.1, biases ~ N(0, 0.1²)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1 + 0.1 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            else:
                param.copy_(0.08 * noise)


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory, smollm_path: Path) -> Path:
    """The embedded SmolLM2 tokenizer written as a HF tokenizer.json."""
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    Tokenizer.from_gguf(gguf.GGUFReader(smollm_path)).backend.save(str(path))
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, tokenizer_json: Path) -> dict[str, Path]:
    """One saved HF checkpoint folder per family, with the shared tokenizer.json."""
    result = {}
    for seed, family in enumerate(FAMILIES):
        model = family.model_class(family.config_class(**{**COMMON, **family.overrides}))
        _randomise(model, seed)
        folder = tmp_path_factory.mktemp(family.name)
        model.save_pretrained(folder)
        (folder / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
        result[family.name] = folder
    return result


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request: pytest.FixtureRequest, folders: dict[str, Path]) -> tuple[LLMEngine, transformers.PreTrainedModel]:
    """Our engine and transformers (float32, eager attention) on the same family folder."""
    folder = folders[request.param]
    engine = LLMEngine(EngineConfig(model=str(folder), device="cpu", kv_cache_memory_gib=0.05))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return engine, hf


@pytest.fixture(scope="module")
def prompt_ids(family: tuple[LLMEngine, transformers.PreTrainedModel]) -> list[int]:
    """The shared prompt, tokenised by the engine from the folder's tokenizer.json."""
    engine, _ = family
    ids = engine.tokenizer.encode(PROMPT)
    assert 90 <= len(ids) <= 150
    return ids


def _hf_logits(hf: transformers.PreTrainedModel, ids: list[int]) -> torch.Tensor:
    """Transformers' float32 logits at every position of ``ids``."""
    with torch.inference_mode():
        return hf(torch.tensor([ids])).logits[0].float()


def test_prefill_logits_match_transformers(family, prompt_ids):
    engine, hf = family
    ours = prefill_logits(engine, prompt_ids)
    theirs = _hf_logits(hf, prompt_ids)
    assert theirs.std() > 0.3, "degenerate logits would make the comparison meaningless"
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-4, f"max |Δlogit| = {diff:.2e}"


def test_greedy_generation_matches_transformers(family, prompt_ids):
    """Same 20 greedy tokens, and each token's logprob agrees, so every decode step is checked numerically."""
    engine, hf = family
    ours = engine.generate(prompt_token_ids=[prompt_ids], params={
        "temperature": 0, "max_tokens": MAX_NEW_TOKENS, "ignore_eos": True, "logprobs": 0})[0].completions[0]
    with torch.inference_mode():
        theirs = hf.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                             min_new_tokens=MAX_NEW_TOKENS, output_logits=True, return_dict_in_generate=True)
    assert ours.token_ids == theirs.sequences[0, len(prompt_ids):].tolist()
    their_logprobs = [step[0].float().log_softmax(-1)[token].item()
                      for step, token in zip(theirs.logits, ours.token_ids)]
    assert [lp.logprob for lp in ours.logprobs] == pytest.approx(their_logprobs, abs=1e-4)


def test_llama3_scaling_is_exercised(folders):
    """The llama3 prompt runs past the original 64 positions, where scaling changes the logits."""
    folder = folders["llama3"]
    engine = LLMEngine(EngineConfig(model=str(folder), device="cpu", kv_cache_memory_gib=0.05))
    assert engine.model_config.rope_scaling is not None
    ids = engine.tokenizer.encode(PROMPT)
    assert len(ids) > LLAMA3_ORIGINAL_POSITIONS
    scaled = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, attn_implementation="eager").eval()
    plain_config = transformers.LlamaConfig.from_pretrained(
        str(folder), rope_parameters={"rope_type": "default", "rope_theta": LLAMA3_ROPE["rope_theta"]})
    plain = transformers.LlamaForCausalLM(plain_config).eval()
    plain.load_state_dict(scaled.state_dict())
    ours = prefill_logits(engine, ids)
    assert (ours - _hf_logits(scaled, ids)).abs().max().item() < 1e-4
    assert (ours - _hf_logits(plain, ids)).abs().max().item() > 1e-1


def _copy_folder_with_tensors(src: Path, dst: Path, edit: dict[str, torch.Tensor | None]) -> Path:
    """Copy a checkpoint folder, replacing (tensor) or dropping (None) the named safetensors entries."""
    dst.mkdir()
    for file in src.iterdir():
        if file.suffix != ".safetensors":
            (dst / file.name).write_bytes(file.read_bytes())
    for file in src.glob("*.safetensors"):
        tensors = load_file(file)
        for name, tensor in edit.items():
            if tensor is None:
                tensors.pop(name, None)
            else:
                tensors[name] = tensor
        save_file(tensors, dst / file.name, metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    ("family_name", "edit", "message"),
    [
        ("qwen2", {"model.layers.1.self_attn.k_proj.bias": None},
         r"missing tensors for Qwen2ForCausalLM: model\.layers\.1\.self_attn\.k_proj\.bias"),
        ("qwen3", {"model.layers.0.self_attn.q_norm.weight": None},
         r"missing tensors for Qwen3ForCausalLM: model\.layers\.0\.self_attn\.q_norm\.weight"),
        ("llama3", {"model.layers.0.self_attn.o_proj.bias": torch.zeros(64)},
         r"unexpected tensors for LlamaForCausalLM: model\.layers\.0\.self_attn\.o_proj\.bias"),
    ],
    ids=["missing-bias", "missing-qk-norm", "unexpected-bias"],
)
def test_checkpoint_with_wrong_tensors_is_refused_naming_the_tensor(folders, tmp_path, family_name, edit, message):
    folder = _copy_folder_with_tensors(folders[family_name], tmp_path / "broken", edit)
    with pytest.raises(ModelLoadError, match=message):
        LLMEngine(EngineConfig(model=str(folder), device="cpu", kv_cache_memory_gib=0.05))


@pytest.mark.parametrize(
    ("family_name", "name", "shape"),
    [
        ("llama3", "model.layers.0.self_attn.q_proj.weight", (32, 64)),
        ("qwen2", "model.embed_tokens.weight", (VOCAB + 8, 64)),
    ],
    ids=["short-q-proj", "oversized-embedding"],
)
def test_checkpoint_with_a_wrong_shaped_tensor_is_refused_naming_the_tensor(folders, tmp_path, family_name, name,
                                                                           shape):
    folder = _copy_folder_with_tensors(folders[family_name], tmp_path / "broken", {name: torch.zeros(shape)})
    with pytest.raises(ModelLoadError, match=re.escape(name)):
        LLMEngine(EngineConfig(model=str(folder), device="cpu", kv_cache_memory_gib=0.05))


def test_mistral_sliding_window_caps_the_context_and_is_exact_within_it(folders, tmp_path):
    folder = _copy_folder_with_tensors(folders["mistral"], tmp_path / "windowed", {})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "sliding_window": 32}))
    engine = LLMEngine(EngineConfig(model=str(folder), device="cpu", kv_cache_memory_gib=0.05))
    assert engine.max_model_len == 32
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, attn_implementation="eager").eval()
    ids = engine.tokenizer.encode(PROMPT)
    inside = ids[:30]
    diff = (prefill_logits(engine, inside) - _hf_logits(hf, inside)).abs().max().item()
    assert diff < 1e-4, f"max |Δlogit| = {diff:.2e}"
    with pytest.raises(InvalidRequestError, match="context limit"):
        engine.add_request(prompt_token_ids=ids, params={"max_tokens": 4})
