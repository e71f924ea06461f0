"""Application settings: from flags, builder arguments and the environment, validated when the app is built."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from ray.serve import Application

from attnscope.deployments import app as env_app
from attnscope.deployments.application import AppArgs, build_app
from attnscope.deployments.cli import _app_args, build_parser


def test_the_package_exports_an_application_built_from_the_environment():
    assert isinstance(env_app, Application)
    args = AppArgs.from_env({"ATTNSCOPE_ATTENTION_API_KEY": "k", "ATTNSCOPE_ATTENTION_MAX_CONCURRENT_CAPTURE": "3",
                             "ATTNSCOPE_RETURN_ATTENTION_TOKENS": "true", "ATTNSCOPE_ATTENTION_CORS_ORIGINS": "http://a, http://b",
                             "UNRELATED": "x"})
    assert (args.attention_api_key, args.attention_max_concurrent_capture, args.return_attention_tokens) == ("k", 3, True)
    assert args.attention_cors_origins == ["http://a", "http://b"]


def test_builder_arguments_are_validated():
    assert isinstance(build_app({"num_kv_blocks": "64", "attention_capture_layers": "0,5"}), Application)
    for bad in ({"attention_capture_layers": "0,x"}, {"attention_tokens_top_k": 65}, {"no_such_flag": 1},
                {"attention_max_concurrent_capture": 0}):
        with pytest.raises(ValidationError):
            build_app(bad)


def test_serve_flags_become_app_args():
    args = build_parser().parse_args([
        "serve", "--port", "9000", "--num-cpus", "4", "--num-replicas", "2", "--return-attention-tokens",
        "--attention-tokens-top-k", "5", "--attention-capture-layers", "auto", "--attention-fingerprint-mode",
        "--attention-api-key", "s", "--attention-max-concurrent-capture", "8", "--attention-cors-origins", "http://x",
        "--attention-disable-in-production", "--attention-mask-system-prompt", "--device", "cpu"])
    settings = _app_args(args)
    assert (settings.port, settings.num_replicas, settings.engine_num_cpus) == (9000, 2, 2.0)
    assert settings.return_attention_tokens and settings.attention_fingerprint_mode and settings.attention_mask_system_prompt
    assert (settings.attention_tokens_top_k, settings.attention_capture_layers) == (5, "auto")
    assert (settings.attention_api_key, settings.attention_max_concurrent_capture) == ("s", 8)
    assert settings.attention_cors_origins == ["http://x"] and settings.attention_disable_in_production
    assert settings.engine_config().num_threads == 2 and settings.gpus_per_replica() == 0.0
    assert not _app_args(build_parser().parse_args(["serve"])).return_attention_tokens
    assert settings.engine_config().cuda_graphs and settings.engine_config().warm_capture
    assert not _app_args(build_parser().parse_args(["serve", "--enforce-eager"])).engine_config().cuda_graphs
    assert not _app_args(build_parser().parse_args(["serve", "--skip-capture-warmup"])).engine_config().warm_capture


def test_engine_options_for_autoscaling_tensor_parallel_and_pinned_replicas():
    plain = AppArgs(device="cpu", num_replicas=3).engine_options()
    assert plain["num_replicas"] == 3 and "autoscaling_config" not in plain
    scaled = AppArgs(device="cpu", num_replicas=2, autoscaling_max_replicas=5,
                     autoscaling_target_ongoing_requests=4).engine_options()
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 5, "target_ongoing_requests": 4}
    with pytest.raises(ValidationError, match="autoscaling_max_replicas"):
        AppArgs(num_replicas=3, autoscaling_max_replicas=2)
    tp = AppArgs(device="cpu", tensor_parallel_size=3, engine_num_cpus=0.5, rank_num_cpus=2,
                 engine_resources='{"engine_slot": 1}').engine_options()
    assert tp["placement_group_bundles"] == [{"CPU": 2.5, "engine_slot": 1}, {"CPU": 2}, {"CPU": 2}]
    assert tp["placement_group_strategy"] == "STRICT_PACK" and tp["ray_actor_options"] == {"num_cpus": 0.5}
    with pytest.raises(ValidationError, match="engine_resources"):
        AppArgs(engine_resources="{not json")
