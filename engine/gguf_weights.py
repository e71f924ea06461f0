"""Read llama.cpp GGUF checkpoints: metadata to ``ModelConfig``, tensors to HF Llama names.

Problems are raised as ``ValueError`` with a user-facing message; the public loader in
``attnscope.engine.weights`` prefixes the path and re-raises them as ``ModelLoadError``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, ReaderTensor
from gguf.quants import dequantize

from attnscope.engine.config import ModelConfig

#: GGUF ``general.architecture`` values we read, and the HF architecture each stands for.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

#: Tensor storage types that ``gguf.quants.dequantize`` turns into float32.
DEQUANTISABLE = frozenset(
    GGMLQuantizationType[name]
    for name in (
        "F32", "F16", "BF16",
        "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    )
)  # fmt: skip

_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def open_gguf(path: Path) -> GGUFReader:
    """Parse a GGUF file's header, turning any corruption into a readable ``ValueError``.

    ``GGUFReader`` memory-maps the file and fails with raw ``IndexError``/``ValueError``
    tracebacks on truncated or garbled input; callers get one clear message instead.
    Every tensor's storage type is checked here so streaming never fails half-way.
    """
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError(
                "not a GGUF file (bad magic); expected a .gguf file or a folder with "
                "config.json and *.safetensors"
            )
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, OverflowError) as exc:
        raise ValueError(f"corrupt or truncated GGUF file ({exc})") from exc
    for tensor in reader.tensors:
        if tensor.tensor_type not in DEQUANTISABLE:
            raise ValueError(
                f"tensor {tensor.name} has unsupported GGUF type {tensor.tensor_type.name}"
            )
    return reader


def _field(reader: GGUFReader, key: str) -> str | int | float | bool | None:
    """One scalar metadata value (the first element for arrays), or None when absent."""
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.parts[field.data[0]]
    if field.types[-1] == GGUFValueType.STRING:
        return bytes(value).decode("utf-8")
    return value[0].item()


def _required(reader: GGUFReader, key: str) -> str | int | float | bool:
    """A metadata value the config cannot do without."""
    value = _field(reader, key)
    if value is None:
        raise ValueError(f"GGUF metadata lacks {key}")
    return value


def gguf_config(reader: GGUFReader) -> ModelConfig:
    """Build the ``ModelConfig`` from GGUF metadata (``{arch}.*`` and ``tokenizer.ggml.*`` keys).

    Head size comes from ``attention.key_length`` or ``rope.dimension_count`` (else hidden/heads);
    embeddings are tied when the file has no ``output.weight``. RoPE scaling is refused: GGUF
    stores Llama-3 scaling only as a precomputed ``rope_freqs`` tensor, not as parameters.
    """
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}"
        )
    names = {tensor.name for tensor in reader.tensors}
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if "rope_freqs.weight" in names or scaling not in (None, "none"):
        raise ValueError(
            "GGUF RoPE scaling (rope_freqs / rope.scaling) is not supported; "
            "load the model's HF safetensors folder instead"
        )
    hidden = int(_required(reader, f"{arch}.embedding_length"))
    heads = int(_required(reader, f"{arch}.attention.head_count"))
    head_dim = (
        _field(reader, f"{arch}.attention.key_length")
        or _field(reader, f"{arch}.rope.dimension_count")
        or hidden // heads
    )
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab_size = _field(reader, f"{arch}.vocab_size") or (len(tokens.data) if tokens else None)
    if vocab_size is None:
        raise ValueError(f"GGUF metadata lacks {arch}.vocab_size and tokenizer.ggml.tokens")
    end_ids = (_field(reader, f"tokenizer.ggml.{kind}_token_id") for kind in ("eos", "eot"))
    optional = {
        "rms_norm_eps": _field(reader, f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": _field(reader, f"{arch}.rope.freq_base"),
        "max_position_embeddings": _field(reader, f"{arch}.context_length"),
    }
    return ModelConfig(
        architecture=ARCHITECTURES[arch],
        vocab_size=int(vocab_size),
        hidden_size=hidden,
        intermediate_size=int(_required(reader, f"{arch}.feed_forward_length")),
        num_layers=int(_required(reader, f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv") or heads),
        head_dim=int(head_dim),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(int(i) for i in end_ids if i is not None)),
        **{key: value for key, value in optional.items() if value is not None},
    )


def hf_name(gguf_name: str) -> str | None:
    """The HF Llama name of a GGUF tensor, or None if the name is not one we know.

    ``blk.3.attn_q.weight`` becomes ``model.layers.3.self_attn.q_proj.weight``.
    """
    match = _BLOCK_TENSOR.fullmatch(gguf_name)
    if match:
        layer, part, kind = match.groups()
        hf_part = _PER_LAYER.get(part)
        return f"model.layers.{layer}.{hf_part}.{kind}" if hf_part else None
    base, _, kind = gguf_name.rpartition(".")
    hf_base = _TOP_LEVEL.get(base)
    return f"{hf_base}.{kind}" if hf_base else None


def tensor_names(reader: GGUFReader) -> list[str]:
    """HF names of every tensor in the file; unknown tensors keep their GGUF name."""
    return [hf_name(tensor.name) or tensor.name for tensor in reader.tensors]


def tensor_shapes(reader: GGUFReader) -> dict[str, tuple[int, ...]]:
    """HF name → HF shape (``[out, in]``; GGUF lists dimensions innermost first) of every tensor."""
    return {name: _hf_shape(tensor) for name, tensor in zip(tensor_names(reader), reader.tensors, strict=True)}


def _hf_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    """The row-major shape of a GGUF tensor."""
    return tuple(int(dim) for dim in reversed(tensor.shape))


def _unpermute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row permutation (``convert_hf_to_gguf.LlamaModel.permute``).

    The converter regroups each head's rows from HF's rotate-half layout into interleaved
    pairs; this restores the HF order so the decoder can use HF's RoPE convention.
    """
    pairs = weight.reshape(n_head, weight.shape[0] // n_head // 2, 2, *weight.shape[1:])
    return pairs.swapaxes(1, 2).reshape(weight.shape)


def iter_tensors(
    reader: GGUFReader, config: ModelConfig, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every tensor dequantised, with its HF name and shape ``[out, in]``, one at a time."""
    permuted = _field(reader, "general.architecture") == "llama"
    for name, tensor in zip(tensor_names(reader), reader.tensors, strict=True):
        values = dequantize(tensor.data, tensor.tensor_type).reshape(_hf_shape(tensor))
        part = tensor.name.split(".")[-2]
        if permuted and part in ("attn_q", "attn_k"):
            n_head = config.num_heads if part == "attn_q" else config.num_kv_heads
            values = _unpermute_rows(values, n_head)
        # A copy only where needed: F32 data is a read-only view into the memory map.
        values = np.require(values, np.float32, ["C_CONTIGUOUS", "WRITEABLE"])
        yield name, torch.from_numpy(values).to(dtype)
