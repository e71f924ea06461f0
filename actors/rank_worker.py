"""One tensor-parallel rank of an engine: a Ray actor holding its shard of the model and of the KV cache.

The driver (the ``LLMEngine`` that owns the scheduler and the block tables) starts one
worker per rank in a placement group, has rank 0 pick a rendezvous address, joins all of
them into one ``torch.distributed`` group (gloo on CPUs, NCCL on GPUs), then sends every
step's ``StepInputs`` and shipped capture plan to all ranks at once. The ranks run the
forward together (one all-reduce per attention and MLP block), sum their partial captures
onto rank 0 in one collective (``reduce_captures``), and rank 0 returns the logits and the
finished captures.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from attnscope.engine.capture_plan import StepCapture
from attnscope.engine.engine_config import EngineConfig
from attnscope.engine.kv_cache import kv_cache_blocks
from attnscope.engine.launch_shapes import LaunchShapes
from attnscope.engine.model import LlamaForCausalLM
from attnscope.engine.model_runner import ModelRunner, StepInputs
from attnscope.engine.parallel import TensorParallel
from attnscope.engine.rank_capture import RankCaptures, reduce_captures
from attnscope.engine.weights import default_model_path, load_checkpoint


@dataclass
class RankOutput:
    """What one rank returns from a step: rank 0 the logits and the step's finished captures, others nothing."""

    logits: torch.Tensor | None
    captures: RankCaptures | None


class RankWorker:
    """A model shard and its KV cache on one device, driven step by step (run as ``ray.remote(RankWorker)``).

    Left undecorated so that Ray pickles the class by reference to this module.
    """

    def __init__(self, config: EngineConfig, rank: int) -> None:
        self.config = config
        self.rank = rank
        self.device = config.resolved_device()
        if self.device.type == "cuda":
            self.device = torch.device("cuda", 0)  # Ray shows each rank only its own GPU
        threads = config.host_threads(self.device)
        if threads is not None:
            torch.set_num_threads(threads)
        self.model: LlamaForCausalLM | None = None
        self.runner: ModelRunner | None = None

    def rendezvous_address(self) -> str:
        """A free TCP address on this node for the process group (asked of rank 0)."""
        import ray  # imported here so that the worker class also runs outside Ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def start(self, address: str) -> int:
        """Join the process group and load this rank's shard of the weights (all ranks call this together).

        Returns how many KV blocks this rank has room for.
        """
        size = self.config.tensor_parallel_size
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=address, rank=self.rank, world_size=size)
        tp = TensorParallel(self.rank, size, dist.group.WORLD)
        checkpoint = load_checkpoint(self.config.model or default_model_path(), self.config.load_format)
        dtype = self.config.resolved_dtype(self.device)
        config = checkpoint.config
        max_positions = min(self.config.max_model_len or config.max_position_embeddings,
                            config.max_position_embeddings)
        with torch.device(self.device):
            model = LlamaForCausalLM(config, tp, dtype=dtype, max_positions=max_positions)
        model.load_weights(checkpoint.tensors(dtype, self.device))
        self.model = model.eval()
        return kv_cache_blocks(self.config, config.num_layers, len(model.heads.kv_heads), config.head_dim, dtype,
                               self.device)

    def allocate(self, num_blocks: int) -> LaunchShapes | None:
        """Allocate this rank's share of ``num_blocks`` KV blocks (the same count on every rank).

        On CUDA (``cuda_graphs``) this records the no-capture decode graphs, their
        all-reduces included, runs the throwaway eager steps that compile the prefill path,
        and (``warm_capture``) compiles the capture kernels, on every rank at once, in the
        same order. Returns the graphs' launch shapes (``None`` without graphs), to which the
        driver pads the capture plans it ships (``StepCapture.shipped``), so eager steps launch
        the kernel variants compiled here.
        """
        dtype = self.config.resolved_dtype(self.device)
        self.runner = ModelRunner(self.model, num_blocks, self.config.block_size, dtype, self.device,
                                  self.config.cuda_graphs, self.config.max_num_seqs, self.config.warm_capture)
        return self.runner.graphs.shapes if self.runner.graphs is not None else None

    def run(self, inputs: StepInputs, capture: StepCapture | None) -> RankOutput:
        """Run one step on this rank's shard."""
        logits = self.runner.run(inputs, capture)
        captures = None
        if capture is not None:
            model = self.model
            captures = reduce_captures(capture, model.heads.q_heads, model.config.num_heads, model.tp)
        return RankOutput(logits.cpu() if self.rank == 0 else None, captures)

    def stop(self) -> None:
        """Leave the process group."""
        if dist.is_initialized():
            dist.destroy_process_group()
