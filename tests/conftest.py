"""Shared fixtures: the embedded default model is loaded once per test session, and so is the Ray cluster."""

from __future__ import annotations

import os
import secrets

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from attnscope.engine.engine_config import EngineConfig  # noqa: E402
from attnscope.engine.llm_engine import LLMEngine  # noqa: E402
from attnscope.engine.weights import default_model_path  # noqa: E402
from loopback import free_port  # noqa: E402


@pytest.fixture(scope="session")
def smollm_path():
    """Path of the embedded SmolLM2-135M-Instruct GGUF."""
    return default_model_path()


@pytest.fixture(scope="session")
def smollm_engine(smollm_path) -> LLMEngine:
    """One engine on the default model with room for many concurrent sequences."""
    return LLMEngine(EngineConfig(model=str(smollm_path), device="cpu", kv_cache_memory_gib=0.5))


@pytest.fixture(scope="session")
def hf_smollm(smollm_path):
    """HF transformers' SmolLM2 loaded from the same GGUF, float32, eager attention."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm_path.parent), gguf_file=smollm_path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (2 CPUs, a small object store, the dashboard on a free port).

    Yields the dashboard's address (``serve deploy --address`` needs it).
    """
    import ray

    context = ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=True,
                       dashboard_host="127.0.0.1", dashboard_port=free_port(), log_to_driver=False)
    yield f"http://{context.dashboard_url}"
    ray.shutdown()


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (or ATTNSCOPE_TEST_SEED), printed so failures are reproducible."""
    value = int(os.environ.get("ATTNSCOPE_TEST_SEED", secrets.randbits(31)))
    print(f"seed={value}  (rerun with ATTNSCOPE_TEST_SEED={value})")
    return value
