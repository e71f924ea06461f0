"""The Serve application: its settings (``AppArgs``) and builder (``build_app``).

``build_app`` is a Serve app builder: ``serve run attnscope.deployments:build_app key=value …``,
or ``import_path: attnscope.deployments:build_app`` with ``args:`` in a Serve config.
``attnscope.deployments:app`` is the application built from the defaults and
``ATTNSCOPE_<FIELD>`` environment variables (``serve run attnscope.deployments:app``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from attnscope.actors.capture_limiter import CaptureLimiter
from attnscope.capture import MAX_TOP_K, CaptureParams
from attnscope.deployments.engine_deployment import EngineDeployment
from attnscope.deployments.ingress import OpenAIIngress
from attnscope.engine.engine_config import EngineConfig
from attnscope.engine.weights import default_model_path

ENV_PREFIX = "ATTNSCOPE_"
ROUTER = "attnscope.deployments.routing.PrefixAffinityRouter"


class AppArgs(BaseModel):
    """Everything that configures one attnscope application: engine, replicas, capture and guardrails."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(None, description="HF checkpoint folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    served_model_name: str | None = Field(None, description="model name clients send (default: the checkpoint's file or folder name)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the engine runs")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="float32 on CPU, bfloat16 on CUDA when auto")
    max_model_len: int | None = Field(None, ge=2, description="context limit in tokens (default: the model's, capped by the KV cache)")
    kv_cache_memory_gib: float = Field(2.0, gt=0, description="CPU: memory for the KV cache in GiB")
    num_kv_blocks: int | None = Field(None, ge=1, description="KV-cache blocks of 16 tokens; overrides the memory-based sizing")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=0.98, description="CUDA: fraction of free memory for the KV cache")
    max_num_seqs: int = Field(64, ge=1, description="sequences running at once per engine")
    enforce_eager: bool = Field(False, description="CUDA: run every step eagerly, without CUDA graphs")
    skip_capture_warmup: bool = Field(False, description="CUDA graphs: do not compile the capture kernels at start-up "
                                      "(a faster start; the first capture step of each batch shape then waits seconds "
                                      "for Triton compiles)")
    num_threads: int | None = Field(None, ge=1, description="torch threads per engine: the CPU model's math, or a CUDA engine's host-side work (default: its reserved CPUs)")
    num_replicas: int = Field(1, ge=1, description="engine replicas (one model copy each) when not autoscaling")
    autoscaling_max_replicas: int | None = Field(None, ge=1, description="autoscale the engine replicas up to this many "
                                                                          "(between num_replicas and it)")
    autoscaling_target_ongoing_requests: float = Field(16.0, gt=0, description="autoscaling: ongoing requests per "
                                                                                "replica to aim for")
    tensor_parallel_size: int = Field(1, ge=1, description="ranks each replica's model is split over (one GPU each with device cuda)")
    rank_num_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves per tensor-parallel rank")
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "STRICT_PACK", description="placement of a replica's rank bundles (STRICT_PACK: one node)")
    routing_max_imbalance: int = Field(8, ge=0, description="requests a replica holding the prompt's prefix may be "
                                                              "queued beyond the least loaded and still get it")
    ingress_resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per HTTP "
                                                "ingress replica as JSON, to keep the ingress on chosen (e.g. head) nodes")
    num_ingress_replicas: int = Field(1, ge=1, description="HTTP ingress replicas")
    engine_num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves per engine replica")
    engine_resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per engine "
                                               "replica as JSON, e.g. '{\"engine_slot\": 1}', to pin replicas to nodes")
    engine_num_gpus: float | None = Field(None, ge=0, description="GPUs per engine replica (default: 1 for device cuda, "
                                                                   "or auto where CUDA is visible to the builder; else 0)")
    return_attention_tokens: bool = Field(False, description="capture attention on every request unless it opts out")
    attention_tokens_top_k: int = Field(10, ge=1, le=MAX_TOP_K, description="top_k_attention of requests that set none")
    attention_capture_layers: str = Field("last", description="capture layers of requests that set none: last, auto or ids like 0,10,20")
    attention_fingerprint_mode: bool = Field(False, description="capture 20-float fingerprints when a request names no mode")
    attention_sketch_mode: bool = Field(False, description="capture per-layer sketches when a request names no mode")
    attention_mask_system_prompt: bool = Field(False, description="hide the system prompt's positions from every capture")
    attention_api_key: str | None = Field(None, description="API key required for capture (plain generation stays open)")
    attention_max_concurrent_capture: int | None = Field(None, ge=1, description="cluster-wide limit on open capture sessions (none when unset)")
    attention_capture_lease_s: float = Field(30.0, gt=0, description="seconds a dead ingress replica's capture "
                                                                      "sessions keep their slots")
    attention_cors_origins: list[str] = Field(default_factory=lambda: ["*"], description="allowed CORS origins, comma-separated")
    attention_disable_in_production: bool = Field(False, description="refuse all capture requests (production deployments)")
    host: str = Field("127.0.0.1", description="HTTP host (attnscope serve)")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port (attnscope serve)")

    @field_validator("attention_capture_layers")
    @classmethod
    def _valid_layers(cls, value: str) -> str:
        """Reject a malformed layer list when the app is built, not on the first request."""
        CaptureParams(layers=value)
        return value

    @model_validator(mode="after")
    def _autoscaling_range(self) -> AppArgs:
        """The autoscaling ceiling cannot be below the replica floor."""
        if self.autoscaling_max_replicas is not None and self.autoscaling_max_replicas < self.num_replicas:
            raise ValueError(f"autoscaling_max_replicas ({self.autoscaling_max_replicas}) is below num_replicas "
                             f"({self.num_replicas})")
        return self

    @field_validator("engine_resources", "ingress_resources", mode="before")
    @classmethod
    def _parse_resources(cls, value: Any) -> Any:
        """Accept a JSON object string (flags, environment, ``key=value`` builder args)."""
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON object: {exc}") from exc
        return value

    @field_validator("attention_cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        """Accept a comma-separated string (flags, environment, ``key=value`` builder args)."""
        if isinstance(value, str):
            return [o.strip() for o in value.split(",") if o.strip()]
        return value

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AppArgs:
        """Defaults overridden by ``ATTNSCOPE_<FIELD>`` environment variables (e.g. ``ATTNSCOPE_ATTENTION_API_KEY``)."""
        environ = os.environ if environ is None else environ
        return cls.model_validate({name: environ[ENV_PREFIX + name.upper()] for name in cls.model_fields
                                   if ENV_PREFIX + name.upper() in environ})

    def model_name(self) -> str:
        """The name clients use for the served model."""
        if self.served_model_name:
            return self.served_model_name
        path = Path(self.model) if self.model else default_model_path()
        return path.name.removesuffix(".gguf")

    def engine_config(self) -> EngineConfig:
        """The engine settings of every replica."""
        threads = self.num_threads or max(1, round(self.rank_num_cpus if self.tensor_parallel_size > 1
                                                   else self.engine_num_cpus))
        return EngineConfig(model=self.model, device=self.device, dtype=self.dtype, max_model_len=self.max_model_len,
                            kv_cache_memory_gib=self.kv_cache_memory_gib, num_kv_blocks=self.num_kv_blocks,
                            gpu_memory_utilization=self.gpu_memory_utilization, max_num_seqs=self.max_num_seqs,
                            num_threads=threads, tensor_parallel_size=self.tensor_parallel_size,
                            rank_num_cpus=self.rank_num_cpus, placement_strategy=self.placement_strategy,
                            cuda_graphs=not self.enforce_eager, warm_capture=not self.skip_capture_warmup)

    def engine_options(self) -> dict[str, Any]:
        """Serve options of the engine deployment: replicas, their resources and the prefix-affinity router.

        With tensor parallelism a replica owns a placement group of one bundle per rank;
        bundle 0 also holds the replica (the driver, which reserves no GPU), and the rank
        workers are scheduled into the bundles in order.
        """
        gpus = self.gpus_per_replica()
        options: dict[str, Any] = {"request_router_config": RequestRouterConfig(
            request_router_class=ROUTER, request_router_kwargs={"max_imbalance": self.routing_max_imbalance})}
        if self.autoscaling_max_replicas is None:
            options["num_replicas"] = self.num_replicas
        else:
            options["autoscaling_config"] = {"min_replicas": self.num_replicas,
                                             "max_replicas": self.autoscaling_max_replicas,
                                             "target_ongoing_requests": self.autoscaling_target_ongoing_requests}
        if self.tensor_parallel_size == 1:
            options["ray_actor_options"] = {"num_cpus": self.engine_num_cpus, "num_gpus": gpus,
                                            "resources": dict(self.engine_resources)}
            return options
        rank = {"CPU": self.rank_num_cpus, **({"GPU": gpus} if gpus else {})}
        options["ray_actor_options"] = {"num_cpus": self.engine_num_cpus}
        options["placement_group_bundles"] = [{**rank, **self.engine_resources,
                                               "CPU": self.rank_num_cpus + self.engine_num_cpus}] + \
            [rank] * (self.tensor_parallel_size - 1)
        options["placement_group_strategy"] = self.placement_strategy
        return options

    def gpus_per_replica(self) -> float:
        """GPUs Ray reserves for each engine replica (without one, Ray hides the GPUs from it)."""
        if self.engine_num_gpus is not None:
            return self.engine_num_gpus
        if self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available()):
            return 1.0
        return 0.0


def build_app(args: dict[str, Any]) -> Application:
    """The attnscope application: the OpenAI ingress in front of ``num_replicas`` engine replicas.

    With ``attention_max_concurrent_capture`` set, a ``CaptureLimiter`` deployment keeps
    the cluster-wide count of open capture sessions.
    """
    settings = AppArgs.model_validate(args)
    engine = EngineDeployment.options(**settings.engine_options()).bind(settings.engine_config())
    limiter = None
    if settings.attention_max_concurrent_capture is not None:
        limiter = CaptureLimiter.bind(settings.attention_capture_lease_s)
    ingress = OpenAIIngress.options(num_replicas=settings.num_ingress_replicas,
                                    ray_actor_options={"num_cpus": 0, "resources": dict(settings.ingress_resources)})
    return ingress.bind(settings, engine, limiter)
