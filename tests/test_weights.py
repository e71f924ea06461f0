"""Checkpoint loading: HF safetensors folders and GGUF files give HF-named float tensors."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from attnscope.engine.config import RopeScaling
from attnscope.engine.weights import ModelLoadError, default_model_path, load_checkpoint

TINY = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


Tensors = dict[str, torch.Tensor]


def _assert_same_tensors(yielded: Tensors, expected: Tensors) -> None:
    """Same names, shapes and values (bit for bit)."""
    assert sorted(yielded) == sorted(expected)
    for name, tensor in expected.items():
        assert yielded[name].dtype == torch.float32, name
        assert torch.equal(yielded[name], tensor.float()), name


def _tiny_model(kind: str, **overrides: object) -> transformers.PreTrainedModel:
    """A random tiny model of the given HF family."""
    torch.manual_seed(0)
    families = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }
    config_class, model_class = families[kind]
    model = model_class(config_class(**{**TINY, **overrides}))
    with torch.no_grad():  # norms start at exactly 1 and biases at 0: make them distinguishable
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.normal_()
    return model


def _saved(model: transformers.PreTrainedModel, folder: Path, **kwargs: object) -> Path:
    model.save_pretrained(folder, **kwargs)
    return folder


# --- the embedded default model ------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm(smollm_path):
    return load_checkpoint(smollm_path)


def test_default_model_path_is_the_embedded_smollm2_gguf():
    path = default_model_path()
    assert path.is_file()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_embedded_gguf_config(smollm, smollm_path):
    assert smollm.format == "gguf"
    assert smollm.path == smollm_path
    c = smollm.config
    assert (c.num_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (9, 3, 64)
    assert c.rope_theta == 100000.0
    assert c.rope_scaling is None
    assert c.tie_word_embeddings
    assert c.vocab_size == 49152
    assert c.max_position_embeddings == 8192
    assert c.rms_norm_eps == pytest.approx(1e-5)
    assert (c.bos_token_id, c.eos_token_ids) == (1, (2,))
    assert not c.attention_bias and not c.qk_norm


def test_embedded_gguf_tensors_match_transformers(smollm, hf_smollm):
    expected = hf_smollm.state_dict()
    del expected["lm_head.weight"]  # tied to the embedding, so not yielded
    seen = set()
    for name, tensor in smollm.tensors():
        reference = expected[name]
        assert tensor.dtype == torch.float32 and tensor.shape == reference.shape, name
        torch.testing.assert_close(tensor, reference, rtol=0, atol=1e-6, msg=name)
        seen.add(name)
    assert seen == set(expected)


# --- HF safetensors folders ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "overrides", "flags"),
    [
        ("llama", {}, (False, False, False)),
        ("mistral", {"head_dim": 32}, (False, False, False)),
        ("qwen2", {"tie_word_embeddings": True}, (True, False, True)),
        ("qwen3", {"head_dim": 32}, (False, True, False)),
    ],
)
def test_hf_folder_round_trips(tmp_path, kind, overrides, flags):
    model = _tiny_model(kind, **overrides)
    checkpoint = load_checkpoint(_saved(model, tmp_path))
    assert checkpoint.format == "hf" and checkpoint.path == tmp_path
    c = checkpoint.config
    assert c.architecture == type(model).__name__
    assert (c.attention_bias, c.qk_norm, c.tie_word_embeddings) == flags
    assert c.head_dim == overrides.get("head_dim", 16)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.vocab_size) == (2, 4, 2, 96)
    expected = model.state_dict()
    if c.tie_word_embeddings:
        del expected["lm_head.weight"]
    _assert_same_tensors(dict(checkpoint.tensors()), expected)


def test_hf_sharded_folder_and_dtype(tmp_path):
    model = _tiny_model("llama")
    _saved(model, tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert (tmp_path / "model.safetensors.index.json").is_file()
    checkpoint = load_checkpoint(tmp_path)
    _assert_same_tensors(dict(checkpoint.tensors()), model.state_dict())
    halves = dict(checkpoint.tensors(torch.bfloat16))
    assert all(tensor.dtype == torch.bfloat16 for tensor in halves.values())
    assert torch.equal(halves["model.norm.weight"], model.model.norm.weight.bfloat16())


def _rewrite_config(folder: Path, **changes: object) -> None:
    raw = json.loads((folder / "config.json").read_text())
    raw.update(changes)
    (folder / "config.json").write_text(json.dumps(raw))


LLAMA3 = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@pytest.mark.parametrize("layout", ["transformers4", "transformers5"])
def test_hf_llama3_rope_scaling_and_eos_list(tmp_path, layout):
    folder = _saved(_tiny_model("llama"), tmp_path)
    if layout == "transformers4":
        changes = {
            "rope_parameters": None,
            "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", **LLAMA3},
        }
    else:
        changes = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3}}
    _rewrite_config(folder, eos_token_id=[5, 7], **changes)
    config = load_checkpoint(folder).config
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert config.eos_token_ids == (5, 7)


def test_hf_unsupported_rope_scaling_is_named(tmp_path):
    folder = _saved(_tiny_model("llama"), tmp_path)
    _rewrite_config(folder, rope_scaling={"type": "yarn", "factor": 4.0})
    with pytest.raises(ModelLoadError, match="yarn"):
        load_checkpoint(folder)


# --- GGUF files written like llama.cpp's converter -----------------------------------------------
GGUF_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf_name: str) -> str:
    base, kind = hf_name.rsplit(".", 1)
    if base.startswith("model.layers."):
        _, _, layer, part = base.split(".", 3)
        return f"blk.{layer}.{GGUF_NAMES[part]}.{kind}"
    return f"{GGUF_NAMES[base]}.{kind}"


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.LlamaModel.permute."""
    halves = w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
    return halves.swapaxes(1, 2).reshape(w.shape)


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_gguf(model: transformers.PreTrainedModel, path: Path, arch: str) -> Tensors:
    """Write ``model`` as llama.cpp would (layer 1 in Q8_0); return what should load back."""
    cfg = model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    expected = {}
    for name, tensor in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        values = tensor.numpy()
        if arch == "llama" and ".q_proj." in name:
            values = _llama_cpp_permute(values, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            values = _llama_cpp_permute(values, cfg.num_key_value_heads)
        if values.ndim == 2 and "layers.1." in name:
            qtype = gguf.GGMLQuantizationType.Q8_0
            quantised = gguf.quants.quantize(values, qtype)
            writer.add_tensor(_gguf_name(name), quantised, raw_dtype=qtype)
            # Q8_0 blocks lie within a row, so quantising commutes with the Q/K row permutation.
            roundtrip = gguf.quants.dequantize(gguf.quants.quantize(tensor.numpy(), qtype), qtype)
            expected[name] = torch.from_numpy(roundtrip)
        else:
            writer.add_tensor(_gguf_name(name), values)
            expected[name] = tensor
    _finish(writer)
    return expected


@pytest.mark.parametrize(
    ("arch", "kind", "overrides"),
    [
        ("llama", "llama", {}),
        ("qwen2", "qwen2", {"tie_word_embeddings": True}),
        ("qwen3", "qwen3", {"head_dim": 32}),
    ],
)
def test_written_gguf_loads_back_to_the_original_weights(tmp_path, arch, kind, overrides):
    model = _tiny_model(kind, **overrides)
    path = tmp_path / "tiny.gguf"
    expected = _write_gguf(model, path, arch)
    checkpoint = load_checkpoint(path)
    c = checkpoint.config
    assert checkpoint.format == "gguf"
    assert c.architecture == type(model).__name__
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == (2, 64, 4, 2)
    assert (c.head_dim, c.vocab_size, c.rms_norm_eps, c.eos_token_ids) == (
        overrides.get("head_dim", 16), 96, pytest.approx(1e-6), (2,)
    )  # fmt: skip
    assert (c.attention_bias, c.qk_norm) == (kind == "qwen2", kind == "qwen3")
    assert c.tie_word_embeddings == bool(overrides.get("tie_word_embeddings"))
    _assert_same_tensors(dict(checkpoint.tensors()), expected)


# --- user-facing errors --------------------------------------------------------------------------
def test_nonexistent_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="no-such-model.*does not exist"):
        load_checkpoint(missing)


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_checkpoint(tmp_path)


def test_unknown_architecture(tmp_path):
    folder = _saved(_tiny_model("llama"), tmp_path)
    _rewrite_config(folder, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ModelLoadError, match="unsupported architecture GPT2LMHeadModel"):
        load_checkpoint(folder)


def test_folder_with_a_corrupt_safetensors_file(tmp_path):
    folder = _saved(_tiny_model("llama"), tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelLoadError, match="model.safetensors is not a valid safetensors file"):
        load_checkpoint(folder)


def test_truncated_gguf(tmp_path, smollm_path):
    truncated = tmp_path / "truncated.gguf"
    with smollm_path.open("rb") as source:
        truncated.write_bytes(source.read(1 << 20))
    with pytest.raises(ModelLoadError, match="truncated.gguf.*corrupt or truncated GGUF"):
        load_checkpoint(truncated)


def test_random_bytes(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelLoadError, match="junk.gguf.*not a GGUF file"):
        load_checkpoint(junk)


def test_gguf_with_unsupported_architecture_or_tensor_type(tmp_path):
    other = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(other, "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    _finish(writer)
    with pytest.raises(ModelLoadError, match="unsupported GGUF architecture 'gpt2'"):
        load_checkpoint(other)
    doubles = tmp_path / "doubles.gguf"
    writer = gguf.GGUFWriter(doubles, "llama")
    writer.add_tensor("output_norm.weight", np.ones(64, np.float64))
    _finish(writer)
    with pytest.raises(ModelLoadError, match="output_norm.weight has unsupported GGUF type F64"):
        load_checkpoint(doubles)


# --- random weights for benchmarks ---------------------------------------------------------------
def test_dummy_format_needs_only_the_config(tmp_path):
    folder = _saved(_tiny_model("llama"), tmp_path)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_checkpoint(folder)
    checkpoint = load_checkpoint(folder, "dummy")
    first, again = dict(checkpoint.tensors()), dict(checkpoint.tensors(torch.bfloat16))
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).state_dict()
    reference = {k: v for k, v in reference.items() if not k.endswith("inv_freq")}
    assert sorted(first) == sorted(reference)
    for name, tensor in first.items():
        assert tensor.shape == reference[name].shape, name
        assert torch.equal(again[name], tensor.to(torch.bfloat16)), name  # the same draw every time
    q = first["model.layers.0.self_attn.q_proj.weight"]
    assert 0.015 < float(q.std()) < 0.025 and not torch.equal(q, first["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(first["model.norm.weight"], torch.ones(TINY["hidden_size"]))


def test_dummy_format_refuses_a_gguf_file(smollm_path):
    with pytest.raises(ModelLoadError, match="need a folder with config.json"):
        load_checkpoint(smollm_path, "dummy")
