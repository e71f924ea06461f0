"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2) in plain torch.

Every linear layer is tensor-parallel ready (see ``attnscope.engine.layers``); with one
rank it is an ordinary dense model. Attention runs over the paged KV cache described by
an ``AttentionBatch``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from attnscope.engine.attention import AttentionBatch, paged_attention
from attnscope.engine.config import ModelConfig
from attnscope.engine.layers import (
    GateUpParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from attnscope.engine.parallel import SINGLE_DEVICE, TensorParallel, partition_heads
from attnscope.engine.rope import RotaryEmbedding
from attnscope.engine.weights import expected_tensor_shapes
from attnscope.kernels.layer_ops import rotate_and_store


class Attention(nn.Module):
    """Self-attention of one layer over this rank's heads."""

    def __init__(self, config: ModelConfig, layer: int, tp: TensorParallel, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer = layer
        self.heads = partition_heads(config.num_heads, config.num_kv_heads, tp.size, tp.rank)
        self.head_dim = config.head_dim
        self.scale = config.head_dim ** -0.5
        self.qkv_proj = QKVParallelLinear(config.hidden_size, config.head_dim, self.heads, config.attention_bias, dtype)
        q_cols = (self.heads.q_heads.start * config.head_dim, self.heads.q_heads.stop * config.head_dim)
        self.o_proj = RowParallelLinear(config.num_heads * config.head_dim, config.hidden_size, tp, dtype, q_cols)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype) if config.qk_norm else None

    def forward(self, rotary: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """Project, rotate by the tokens' ``(cos, sin)`` and store keys and values in the cache (one
        kernel), attend over the cache, project back."""
        n = x.shape[0]
        q, k, v = self.qkv_proj(x)
        q = q.view(n, -1, self.head_dim)
        k = k.view(n, -1, self.head_dim)
        v = v.view(n, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        k_cache, v_cache = batch.kv_caches[self.layer]
        q_rot, k_rot = rotate_and_store(q, k, v, *rotary, k_cache, v_cache, batch.slot_mapping)
        out = paged_attention(q_rot, k_rot, v, self.layer, batch, self.scale, q)
        return self.o_proj(out.reshape(n, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward block."""

    def __init__(self, config: ModelConfig, tp: TensorParallel, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_up_proj = GateUpParallelLinear(config.hidden_size, config.intermediate_size, tp, dtype)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, tp, dtype,
                                           (self.gate_up_proj.start, self.gate_up_proj.end))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``down(silu(gate(x)) * up(x))``."""
        return self.down_proj(self.gate_up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP with residual connections."""

    def __init__(self, config: ModelConfig, layer: int, tp: TensorParallel, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, layer, tp, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, tp, dtype)

    def forward(self, rotary: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, residual: torch.Tensor | None,
                batch: AttentionBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """One transformer block: ``(mlp output, residual stream)``, the previous block's output ``x`` not yet
        added to ``residual`` (``None`` for the first block, whose ``x`` is the embedding); each add
        is fused into the norm after it."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h, residual = self.post_attention_layernorm.add_forward(self.self_attn(rotary, h, batch), residual)
        return self.mlp(h), residual


_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")


class LlamaForCausalLM(nn.Module):
    """The decoder plus LM head; ``forward`` returns hidden states, ``logits`` projects chosen rows."""

    def __init__(self, config: ModelConfig, tp: TensorParallel = SINGLE_DEVICE,
                 dtype: torch.dtype = torch.float32, max_positions: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        self.heads = partition_heads(config.num_heads, config.num_kv_heads, tp.size, tp.rank)
        self.rope = RotaryEmbedding(config.head_dim, max_positions or config.max_position_embeddings,
                                    config.rope_theta, config.rope_scaling, dtype)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp, dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, i, tp, dtype) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp, dtype)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """Final normalised hidden states ``[N, hidden]`` of a step's flattened tokens."""
        x, residual = self.embed_tokens(input_ids), None
        rotary = self.rope.angles(positions)
        for layer in self.layers:
            x, residual = layer(rotary, x, residual, batch)
        return self.norm.add_forward(x, residual)[0]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 vocabulary logits of the given hidden rows."""
        return self.lm_head(hidden)

    @torch.inference_mode()
    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fill this rank's shards from full checkpoint tensors named as in HF Llama checkpoints.

        Raises ``ValueError`` for a missing or unexpected tensor, so a wrong checkpoint
        never produces a silently half-initialised model.
        """
        loaded: set[str] = set()
        for name, tensor in tensors:
            self._load_one(name, tensor)
            loaded.add(name)
            if name == "model.embed_tokens.weight" and self.config.tie_word_embeddings:
                self.lm_head.load(tensor)
                loaded.add("lm_head.weight")
        missing = set(expected_tensor_shapes(self.config)) - loaded
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")

    def _load_one(self, name: str, tensor: torch.Tensor) -> None:
        """Route one named checkpoint tensor to the layer that shards it."""
        top = {
            "model.embed_tokens.weight": self.embed_tokens,
            "model.norm.weight": self.norm,
            "lm_head.weight": self.lm_head,
        }
        if name in top:
            top[name].load(tensor)
            return
        match = _LAYER_NAME.fullmatch(name)
        if match is None or int(match.group(1)) >= len(self.layers):
            raise ValueError(f"unexpected tensor {name!r} in checkpoint")
        layer = self.layers[int(match.group(1))]
        attn, mlp = layer.self_attn, layer.mlp
        rest = match.group(2)
        proj = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if proj:
            attn.qkv_proj.load(proj.group(1), tensor, bias=proj.group(2) == "bias")
            return
        gate_up = re.fullmatch(r"mlp\.(gate|up)_proj\.weight", rest)
        if gate_up:
            mlp.gate_up_proj.load(gate_up.group(1), tensor)
            return
        simple = {
            "input_layernorm.weight": layer.input_layernorm,
            "post_attention_layernorm.weight": layer.post_attention_layernorm,
            "self_attn.o_proj.weight": attn.o_proj,
            "self_attn.q_norm.weight": attn.q_norm,
            "self_attn.k_norm.weight": attn.k_norm,
            "mlp.down_proj.weight": mlp.down_proj,
        }
        target = simple.get(rest)
        if target is None:
            raise ValueError(f"unexpected tensor {name!r} in checkpoint")
        target.load(tensor)
