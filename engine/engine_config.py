"""Engine settings: the pydantic model the CLI, the Serve config and tests all build the engine from."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field


class EngineConfig(BaseModel):
    """How to load the model and size the engine. Defaults suit a laptop CPU and scale on a GPU."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="HF checkpoint folder or .gguf file; None = embedded SmolLM2-135M-Instruct.")
    load_format: Literal["auto", "dummy"] = Field(
        "auto", description="auto = the checkpoint's weights; dummy = random weights of the model folder's config.json (benchmarks).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto = float32 on CPU, bfloat16 on CUDA.")
    max_model_len: int | None = Field(None, ge=2, description="Context limit (prompt + output); default the model's, capped by the KV cache.")
    block_size: int = Field(16, ge=1, le=256, description="Tokens per KV-cache block.")
    num_kv_blocks: int | None = Field(None, ge=1, description="KV-cache blocks; overrides the memory-based sizing.")
    kv_cache_memory_gib: float = Field(2.0, gt=0, description="CPU: memory given to the KV cache.")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=0.98, description="CUDA: fraction of free memory (after weights) for the KV cache.")
    max_num_batched_tokens: int = Field(2048, ge=1, description="Token budget of one step (prefill chunks + decodes).")
    cuda_graphs: bool = Field(True, description="CUDA: replay decode steps from CUDA graphs recorded per batch-size bucket and capture layout.")
    warm_capture: bool = Field(True, description="CUDA graphs: compile the attention-capture kernels for every batch bucket at start-up, so the first requests with capture do not wait seconds for Triton compiles.")
    overlap_steps: bool | None = Field(
        None, description="Launch step N+1 before reading step N's sampled tokens (its inputs read them on the device), "
        "so host work hides behind device work; None = on for one CUDA device, off on the CPU (where a launch "
        "computes the step, so overlapping would only delay outputs) and with tensor parallelism.")
    max_num_seqs: int = Field(64, ge=1, description="Most sequences running at once.")
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of shared prompt prefixes.")
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads of the process: on the CPU the model's math (default: torch's choice), on CUDA the host-side work of each step (default 1: its many tiny ops gain nothing from more, whose idle threads slowed the capture records 1.2-1.4x on an H100 host).")
    think_start_token_ids: list[int] | None = Field(None, description="Tokens opening a reasoning block (default: the vocabulary's '<think>').")
    think_end_token_ids: list[int] | None = Field(None, description="Tokens closing a reasoning block (default: the vocabulary's '</think>').")
    max_full_capture_tokens: int = Field(1024, ge=1, description="Full-matrix capture: most tokens (prompt + max_tokens) per request.")
    tensor_parallel_size: int = Field(1, ge=1, description="Ranks the model's heads and MLP are split over (Ray actors, gloo on CPU, NCCL on GPUs).")
    tensor_parallel_backend: Literal["ray", "processes"] = Field(
        "ray", description="Rank workers as Ray actors in a placement group, or as child processes of this one (one machine, no Ray).")
    rank_num_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves for each rank worker (tensor_parallel_size > 1).")
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "STRICT_PACK", description="Ray placement of the rank workers' bundles (tensor_parallel_size > 1).")

    def resolved_device(self) -> torch.device:
        """The device the engine runs on."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def host_threads(self, device: torch.device) -> int | None:
        """torch intra-op threads for a process computing on ``device`` (``None``: torch's choice); see ``num_threads``."""
        return self.num_threads or (1 if device.type == "cuda" else None)

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype of weights, activations and the KV cache."""
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return getattr(torch, self.dtype)
