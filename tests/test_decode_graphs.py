"""Decode steps through the CUDA-graph staging path give the same tokens and captures as eager steps.

On the CPU ``DecodeGraphs(replay=False)`` runs the exact forward a graph records (static
staging buffer, padded batch and capture rows, column-major block tables, one fused
capture launch per layer) without recording it; the GPU test file replays real graphs.
"""

from __future__ import annotations

import pytest

from attnscope.engine.decode_graphs import DecodeGraphs
from attnscope.engine.launch_shapes import BATCH_BUCKETS, LaunchShapes, bucket
from records import assert_records_close  # tests/records.py

PROMPTS = ["Name three colours of the rainbow.", "Count from one to ten in words:",
           "Write one sentence about rivers and the sea."]
CAPTURES = [
    {"mode": "fingerprint", "layers": "auto", "fingerprint_max_steps": None},
    {"mode": "raw", "top_k": 5, "layers": [3, 29], "mask_prefix": 2, "window": 6, "head_ids": [1, 4]},
    None,
]


def _generate(engine, max_tokens: list[int], captures: list | None = None) -> list:
    rids = [engine.add_request(p, params={"temperature": 0.0, "max_tokens": n, "ignore_eos": True}, capture=c)
            for p, n, c in zip(PROMPTS, max_tokens, captures or CAPTURES)]
    outputs = {rid: [] for rid in rids}
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].append(out)
    return [[d for out in outputs[rid] for d in out.deltas] for rid in rids]


def _static_graphs(engine) -> DecodeGraphs:
    """Graph decode steps without replay on the engine's runner (removed again by the caller)."""
    runner = engine.runner
    width = -(-engine.max_model_len // engine.config.block_size)
    runner.graphs = DecodeGraphs(runner.model, runner.kv_caches, 8, width, runner.device, replay=False,
                                 prompt_launch_rows=8)
    return runner.graphs


def _assert_same_outputs(eager: list, static: list) -> None:
    """Same tokens and capture records, request by request."""
    for want, got in zip(eager, static):
        assert [t for d in got for t in d.token_ids] == [t for d in want for t in d.token_ids]
        assert_records_close([r for d in want for r in (d.attention_tokens or [])],
                             [r for d in got for r in (d.attention_tokens or [])])


def test_buckets_round_up_and_cap():
    assert [bucket(n) for n in (1, 3, 5, 17, 33, 256)] == [1, 4, 8, 24, 48, 256]
    assert bucket(257) is None
    assert bucket(7, limit=6) is None and bucket(5, limit=6) == 6
    assert list(BATCH_BUCKETS) == sorted(BATCH_BUCKETS)


def test_launch_shapes_pad_rows_to_a_bucket_or_to_whole_launches():
    shapes = LaunchShapes(max_batch=24, width=5, prompt_rows=40)
    assert [shapes.rows(n) for n in (1, 3, 17, 24, 25, 40, 41, 100)] == [1, 4, 24, 24, 40, 40, 80, 120]
    assert shapes.launch_rows == 40
    assert LaunchShapes(max_batch=64, width=5, prompt_rows=40).launch_rows == 64


@pytest.mark.parametrize("overlap", [False, True], ids=["one-step", "overlapped"])
def test_static_decode_steps_match_eager_steps(smollm_engine, overlap):
    """Overlapped: every decode input is the previous step's sampled token, read on the device by the graph."""
    engine = smollm_engine
    max_tokens = [9, 6, 3]  # the batch shrinks 3 -> 2 -> 1: buckets 4, 2, 1, with padding rows
    eager = _generate(engine, max_tokens)
    graphs = _static_graphs(engine)
    engine.overlap_steps = overlap
    try:
        static = _generate(engine, max_tokens)
        assert graphs.replays >= max_tokens[0] - 1  # every decode step ran the static path
    finally:
        engine.runner.graphs = None
        engine.overlap_steps = False
    _assert_same_outputs(eager, static)


def test_derotated_captures_ride_the_graph_path(smollm_engine):
    """De-rotated captures run in graph steps: one beside a rotated capture of the same layer (two groups there,
    the decode kernel's and a standalone one on the un-rotated queries) and one alone in another layer give the
    same tokens and records as eager steps, every decode step through the graph path."""
    engine = smollm_engine
    captures = [{"mode": "raw", "top_k": 5, "layers": [7, 29], "derotate": True},
                {"mode": "sketch", "layers": "last"},
                {"mode": "fingerprint", "layers": [7], "derotate": True, "fingerprint_max_steps": None}]
    max_tokens = [6, 5, 4]
    eager = _generate(engine, max_tokens, captures)
    graphs = _static_graphs(engine)
    try:
        static = _generate(engine, max_tokens, captures)
        assert graphs.replays >= max_tokens[0] - 1
        assert any(len(groups) == 2 for graph in graphs._layouts.values() for groups in graph.plan.layers.values())
    finally:
        engine.runner.graphs = None
    _assert_same_outputs(eager, static)
    assert all(len([r for d in deltas for r in d.attention_tokens or []]) == n for deltas, n in zip(static, max_tokens))


def test_capture_warm_up_keeps_no_graph_and_changes_no_output(smollm_engine):
    """The start-up warm-up runs a padded capture forward per batch bucket, capturing-row bucket, layer set and
    need (batch buckets 1 and 2: 3 x 2 x 3), a standalone capture per batch bucket, need and rotation (2 x 3 x 2)
    and one per need and rotation of a prompt-attention launch (8 rows: 3 x 2), keeps none of them, and decode
    steps after it match eager ones."""
    engine = smollm_engine
    max_tokens = [5, 4, 2]
    eager = _generate(engine, max_tokens)
    graphs = _static_graphs(engine)
    graphs.max_batch = 2
    try:
        assert engine.runner._warm_capture() == 36
        assert graphs.replays == 0 and not graphs._layouts
        graphs.max_batch = 8
        static = _generate(engine, max_tokens)
    finally:
        engine.runner.graphs = None
    _assert_same_outputs(eager, static)


class _ShippedPlanRunner:
    """The engine's runner fed the plan a tensor-parallel rank gets (``shipped``: no sequences, settings padded to
    the graphs' launch shapes), results copied back."""

    def __init__(self, runner) -> None:
        self.runner = runner

    def run(self, inputs, capture, previous_tokens=None):
        shipped = capture.shipped(self.runner.graphs.shapes) if capture is not None else None
        logits = self.runner.run(inputs, shipped, previous_tokens)
        if capture is not None:
            for layer, groups in capture.layers.items():
                for group, done in zip(groups, shipped.layers[layer]):
                    group.result = done.result
            capture.packed = shipped.packed
        return logits

    def __getattr__(self, name):
        return getattr(self.runner, name)


def test_static_decode_steps_from_shipped_plans_match_eager_steps(smollm_engine):
    """Row settings taken from a shipped plan (what a rank's graphs read; its eager steps, the first tokens, launch
    at the padded shapes) give the same tokens and captures."""
    engine = smollm_engine
    max_tokens = [7, 5, 3]
    eager = _generate(engine, max_tokens)
    runner = engine.runner
    graphs = _static_graphs(engine)
    engine.runner = _ShippedPlanRunner(runner)
    try:
        static = _generate(engine, max_tokens)
        assert graphs.replays >= max_tokens[0] - 1
    finally:
        engine.runner = runner
        runner.graphs = None
    _assert_same_outputs(eager, static)


def test_eager_steps_padded_to_the_graph_shapes_match_unpadded_ones(smollm_engine):
    """With decode graphs, eager steps pad a layer's captured rows to a bucket and their block tables to the
    graphs' width (``LaunchShapes``): three first tokens (a bucket of 4) and a prompt arriving mid-decode (its
    first token beside three decode rows in one eager step) give the same tokens and captures as without graphs;
    the late prompt's own rows (prompt attention: more rows than the graphs' largest bucket) run padded to whole
    launches of that bucket's size."""
    engine = smollm_engine
    captures = [{"mode": "raw", "top_k": 6, "layers": "last"}, {"mode": "sketch", "layers": "last"},
                {"mode": "fingerprint", "layers": "last", "fingerprint_max_steps": None},
                {"mode": "raw", "top_k": 4, "layers": "last", "window": 5, "include_prompt": True}]

    def generate() -> list:
        params = {"temperature": 0.0, "max_tokens": 6, "ignore_eos": True}
        rids = [engine.add_request(p, params=params, capture=c) for p, c in zip(PROMPTS, captures)]
        outputs = {rid: [] for rid in rids}
        for _ in range(3):
            for out in engine.step():
                outputs[out.request_id].append(out)
        late = engine.add_request("Write two sentences about the history of old stone bridges over rivers.",
                                  params=params, capture=captures[3])
        outputs[late] = []
        while engine.has_unfinished():
            for out in engine.step():
                outputs[out.request_id].append(out)
        return [[d for out in outputs[rid] for d in out.deltas] for rid in outputs]

    eager = generate()
    _static_graphs(engine)
    try:
        static = generate()
    finally:
        engine.runner.graphs = None
    _assert_same_outputs(eager, static)
    counts = [len([r for d in deltas for r in d.attention_tokens or []]) for deltas in static]
    assert counts[:3] == [6, 6, 6] and counts[3] > 6 + 8  # the late request's prompt rows, then its 6 tokens


def test_staging_fields_start_on_16_bytes():
    """Every field of a graph's staging buffer starts on 16 bytes whatever the batch and row sets, so the kernels
    reading them see aligned pointers (Triton compiles a variant per alignment it meets)."""
    from attnscope.engine.decode_graphs import _Staging

    for batch, width, heads, row_sets in ((1, 3, 9, (1,)), (5, 7, 3, (3, 2)), (24, 33, 32, (24, 1, 16))):
        staging = _Staging(batch, width, heads, row_sets)
        assert all(field.start % 4 == 0 for field in staging.fields.values())
        assert staging.size == staging.fields["tables"].stop


def test_eager_warm_up_steps_write_nothing_and_fit_a_short_context(smollm_path):
    """The start-up's throwaway eager steps (run on CUDA with graphs; the same forward here) leave the KV cache as it
    was, so the first requests see no trace of them, and run on an engine whose context is shorter than their
    longest prompt (positions wrap at the rope tables); the engine then serves as before."""
    import torch

    from attnscope.engine.engine_config import EngineConfig
    from attnscope.engine.llm_engine import LLMEngine
    from attnscope.kernels.decode_matmul import MAX_ROWS

    engine = LLMEngine(EngineConfig(model=str(smollm_path), device="cpu", max_model_len=MAX_ROWS // 2,
                                    kv_cache_memory_gib=0.05))
    params = {"temperature": 0.0, "max_tokens": 6, "ignore_eos": True}
    before = engine.generate([PROMPTS[0]], params)[0].completions[0].token_ids
    caches = [tensor.clone() for layer in engine.runner.kv_caches for tensor in layer]
    engine.runner._warm_eager_steps()
    assert all(torch.equal(a, b) for a, b in zip(caches, (t for layer in engine.runner.kv_caches for t in layer)))
    assert engine.generate([PROMPTS[0]], params)[0].completions[0].token_ids == before
