"""The driver side of a tensor-parallel engine: rank workers in a placement group, one step at a time.

``TensorParallelRunner.run`` has ``ModelRunner.run``'s contract: it ships the step's
inputs and the sequence-free capture plan to every ``RankWorker`` at once, returns rank
0's logits (every rank holds the full logits after the LM head's all-gather), and fills
the plan's capture results with rank 0's, which the ranks merged exactly in one collective
(``attnscope.engine.rank_capture``: head sums and ``p̄`` shares added, then ranked). A rank that
dies makes ``run`` raise, which fails the engine loop: the requests in flight get an
error and a Serve replica reports itself unhealthy, so Serve replaces it.
"""

from __future__ import annotations

import uuid

import ray
import torch
from ray.util.placement_group import PlacementGroup, get_current_placement_group, placement_group, \
    remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from attnscope.actors.rank_worker import RankWorker
from attnscope.engine.capture_plan import StepCapture
from attnscope.engine.engine_config import EngineConfig
from attnscope.engine.model_runner import StepInputs

PLACEMENT_TIMEOUT_S = 120
HEALTH_TIMEOUT_S = 30
RANK_NAMESPACE = "attnscope"


class TensorParallelRunner:
    """Starts, drives and stops the rank workers of one engine; ``num_blocks`` is the KV capacity every rank holds,
    ``shapes`` the launch shapes of the ranks' decode graphs (``None`` without), to which shipped plans are padded."""

    def __init__(self, config: EngineConfig) -> None:
        size = config.tensor_parallel_size
        gpus = 1.0 if config.resolved_device().type == "cuda" else 0.0
        cpus = config.rank_num_cpus
        self._owned: PlacementGroup | None = None
        group = get_current_placement_group()
        if group is None or len(group.bundle_specs) < size:
            group = self._owned = placement_group([{"CPU": cpus, **({"GPU": gpus} if gpus else {})}] * size,
                                                  strategy=config.placement_strategy)
            ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        worker_class = ray.remote(RankWorker)
        self.name = f"attnscope-ranks-{uuid.uuid4().hex[:12]}"
        self.workers = [
            worker_class.options(
                name=f"{self.name}-{rank}", namespace=RANK_NAMESPACE, num_cpus=cpus, num_gpus=gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank),
            ).remote(config, rank)
            for rank in range(size)
        ]
        address = ray.get(self.workers[0].rendezvous_address.remote())
        capacities = ray.get([w.start.remote(address) for w in self.workers])
        self.num_blocks = min(capacities)
        self.shapes = ray.get([w.allocate.remote(self.num_blocks) for w in self.workers])[0]

    def run(self, inputs: StepInputs, capture: StepCapture | None) -> torch.Tensor:
        """Run one step on every rank; rank 0's logits, and the merged captures filled into ``capture``."""
        shipped = capture.shipped(self.shapes) if capture is not None else None
        outputs = ray.get([w.run.remote(inputs, shipped) for w in self.workers])
        if capture is not None:
            capture.fill_from_ranks(outputs[0].captures)
        return outputs[0].logits

    def check_health(self) -> None:
        """Raise if a rank worker is gone or does not answer within ``HEALTH_TIMEOUT_S``."""
        ray.get([w.__ray_ready__.remote() for w in self.workers], timeout=HEALTH_TIMEOUT_S)

    def shutdown(self) -> None:
        """Stop the rank workers and release the placement group this runner created."""
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []
        if self._owned is not None:
            remove_placement_group(self._owned)
            self._owned = None
