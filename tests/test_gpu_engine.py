"""The engine on a CUDA GPU (bf16, Triton kernels) against itself on the CPU (float32 torch twins).

Skipped without a GPU. A tiny random Llama with a small BPE tokenizer trained here, so
nothing needs downloading: the GPU run's captures must match the CPU run's on the same
token sequence within bf16 tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from records import full_matrices  # tests/records.py

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CORPUS = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine",
          "all that glitters is not gold", "the early bird catches the worm"] * 50


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random-weight Llama-shaped checkpoint folder with a trained byte-level BPE tokenizer."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=512, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=256, intermediate_size=512,
                                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                                      max_position_embeddings=2048, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.06) if p.dim() > 1 else p.fill_(1.0)
    model.save_pretrained(folder)
    return folder


def _engine(folder, device):
    from attnscope.engine.engine_config import EngineConfig
    from attnscope.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(model=str(folder), device=device, num_kv_blocks=256))


def test_gpu_decode_capture_matches_cpu(tiny_llama):
    gpu, cpu = _engine(tiny_llama, "cuda"), _engine(tiny_llama, "cpu")
    assert gpu.dtype == torch.bfloat16
    prompt = " ".join(CORPUS[:6])
    capture = {"mode": "raw", "top_k": 8, "layers": "auto", "include_prompt": True}
    out = gpu.generate([prompt], {"temperature": 0.0, "max_tokens": 24, "ignore_eos": True}, capture=capture)[0]
    tokens = out.prompt_token_ids + out.completions[0].token_ids
    ref = cpu.generate(prompt_token_ids=[tokens], params={"max_tokens": 1}, capture=capture)[0]
    ref_rows = {e["query_position"]: e for e in ref.completions[0].attention_tokens}
    for entry in out.completions[0].attention_tokens:
        expected = ref_rows[entry["query_position"]]
        for layer, data in entry["layers"].items():
            want = expected["layers"][layer]
            probs = dict(zip(want["token_positions"], want["true_probs"]))
            top = [p for p, v in zip(data["token_positions"], data["true_probs"]) if v > want["true_probs"][-1] + 0.02]
            assert set(top) <= set(probs), (entry["query_position"], layer)
            for p in top:
                assert abs(dict(zip(data["token_positions"], data["true_probs"]))[p] - probs[p]) < 0.02


def test_gpu_fingerprint_matches_cpu(tiny_llama):
    gpu, cpu = _engine(tiny_llama, "cuda"), _engine(tiny_llama, "cpu")
    capture = {"mode": "fingerprint", "layers": "auto", "include_prompt": True, "fingerprint_max_steps": None}
    out = gpu.generate([" ".join(CORPUS[:8])], {"temperature": 0.0, "max_tokens": 16, "ignore_eos": True},
                       capture=capture)[0]
    tokens = out.prompt_token_ids + out.completions[0].token_ids
    ref = cpu.generate(prompt_token_ids=[tokens], params={"max_tokens": 1}, capture=capture)[0]
    ref_rows = {e["query_position"]: e["fingerprint"] for e in ref.completions[0].attention_tokens}
    got = out.completions[0].attention_tokens
    assert len(got) == len(out.prompt_token_ids) - 1 + 16
    for entry in got:
        assert np.allclose(entry["fingerprint"], ref_rows[entry["query_position"]], atol=1.5e-2)


def test_full_mode_on_cuda_matches_cpu(tiny_llama):
    """Full matrices (``attn_capture_data``) from the CUDA engine in bf16 match the CPU engine's float32 ones on the
    same tokens: a de-rotated request with a privacy mask batched beside a rotated one (one step's rows of both)."""
    gpu, cpu = _engine(tiny_llama, "cuda"), _engine(tiny_llama, "cpu")
    prompts = [" ".join(CORPUS[:3]), " ".join(CORPUS[1:3])]
    captures = [{"mode": "full", "layers": [1, 3], "derotate": True, "mask_prefix": 3},
                {"mode": "full", "layers": [3]}]
    params = {"temperature": 0.0, "max_tokens": 6, "ignore_eos": True}
    rids = [gpu.add_request(p, params=params, capture=c) for p, c in zip(prompts, captures)]
    tokens = {rid: [] for rid in rids}
    data = {}
    while gpu.has_unfinished():
        for out in gpu.step():
            for delta in out.deltas:
                tokens[out.request_id].extend(delta.token_ids)
                data[out.request_id] = delta.attn_capture_data or data.get(out.request_id)
    for prompt, capture, rid in zip(prompts, captures, rids):
        ids = gpu.tokenizer.encode(prompt) + tokens[rid]
        ref = cpu.generate(prompt_token_ids=[ids], params={"max_tokens": 1}, capture=capture)[0]
        want = full_matrices(ref.completions[0].attn_capture_data)
        got = full_matrices(data[rid])
        assert sorted(got) == capture["layers"]
        for layer, (matrix, meta) in got.items():
            t = len(ids) - 1 - capture.get("mask_prefix", 0)
            assert matrix.shape == (t, 8, t) and meta["mask_prefix"] == capture.get("mask_prefix", 0)
            np.testing.assert_allclose(matrix, want[layer][0][:t, :, :t], atol=2e-2)


def _step_all(engine, prompts, max_tokens, captures, penalties=None):
    """Greedy outputs of requests added together and stepped to the end: (tokens, records) per request."""
    penalties = penalties or [{}] * len(prompts)
    rids = [engine.add_request(p, params={"temperature": 0.0, "max_tokens": n, "ignore_eos": True, **extra},
                               capture=c)
            for p, n, c, extra in zip(prompts, max_tokens, captures, penalties)]
    tokens = {rid: [] for rid in rids}
    records = {rid: [] for rid in rids}
    while engine.has_unfinished():
        for out in engine.step():
            for delta in out.deltas:
                tokens[out.request_id].extend(delta.token_ids)
                records[out.request_id].extend(delta.attention_tokens or [])
    return [(tokens[r], records[r]) for r in rids]


def test_cuda_graph_decode_matches_eager(tiny_llama):
    from attnscope.engine.engine_config import EngineConfig
    from attnscope.engine.llm_engine import LLMEngine

    graphed = _engine(tiny_llama, "cuda")  # graphs, steps overlapped (the CUDA defaults)
    eager = LLMEngine(EngineConfig(model=str(tiny_llama), device="cuda", num_kv_blocks=256, cuda_graphs=False,
                                   overlap_steps=False))
    assert eager.runner.graphs is None and graphed.overlap_steps and not eager.overlap_steps
    prompts = [" ".join(CORPUS[i : 2 * i + 3]) for i in range(4)]
    captures = [{"mode": "fingerprint", "layers": "auto", "fingerprint_max_steps": None},
                {"mode": "raw", "top_k": 8, "layers": [1, 3], "head_ids": [0, 5], "window": 40},
                None,
                {"mode": "raw", "top_k": 6, "layers": [1, 3], "derotate": True}]  # layer 3: a second, standalone group
    max_tokens = [14, 9, 5, 7]  # the batch shrinks: buckets 4, 2, 1 with padding rows
    penalties = [{}, {"repetition_penalty": 1.5, "frequency_penalty": 0.5}, {"presence_penalty": 1.0}, {}]
    got = _step_all(graphed, prompts, max_tokens, captures, penalties)  # penalties count pending tokens on the GPU
    assert graphed.runner.graphs.replays >= max_tokens[0] - 1
    want = _step_all(eager, prompts, max_tokens, captures, penalties)
    for (tokens, records), (want_tokens, want_records) in zip(got, want):
        assert tokens == want_tokens
        assert [r["query_position"] for r in records] == [r["query_position"] for r in want_records]
        for entry, expected in zip(records, want_records):
            if "fingerprint" in entry:
                assert np.allclose(entry["fingerprint"], expected["fingerprint"], atol=1e-2)
                continue
            for layer, data in entry["layers"].items():
                ref = expected["layers"][layer]
                probs = dict(zip(ref["token_positions"], ref["true_probs"]))
                clear = [p for p, v in zip(data["token_positions"], data["true_probs"]) if v > ref["true_probs"][-1] + 0.01]
                assert set(clear) <= set(probs)
                for p in clear:
                    assert abs(dict(zip(data["token_positions"], data["true_probs"]))[p] - probs[p]) < 0.01


def test_layer_kernels_on_cuda_match_their_twins():
    from attnscope.kernels.layer_ops import rms_norm, rotate_and_store, silu_and_mul
    from attnscope.kernels.layer_ops_reference import rms_norm_ref, rotate_and_store_ref, silu_and_mul_ref

    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device="cuda").to(torch.bfloat16)

    x, res, w = rand(37, 4096), rand(37, 4096), rand(4096)
    normed, summed = rms_norm(x, w, 1e-5, res)
    ref, ref_sum = rms_norm_ref(x, w, 1e-5, res)
    assert torch.equal(summed, ref_sum)
    torch.testing.assert_close(normed, ref, rtol=1.6e-2, atol=1.6e-2)
    qkv = rand(37, (32 + 16) * 128)
    q, k, v = (t.view(37, -1, 128) for t in qkv.split([32 * 128, 8 * 128, 8 * 128], dim=-1))
    angles = torch.rand(37, 64, generator=gen, device="cuda") * 1000
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(torch.bfloat16) for f in (torch.cos, torch.sin))
    slots = torch.randperm(64 * 16, generator=gen, device="cuda")[:37]
    caches = [torch.zeros(64, 16, 8, 128, dtype=torch.bfloat16, device="cuda") for _ in range(4)]
    got = rotate_and_store(q, k, v, cos, sin, caches[0], caches[1], slots)
    want = rotate_and_store_ref(q, k, v, cos, sin, caches[2], caches[3], slots)
    for a, b in zip(list(got) + caches[:2], list(want) + caches[2:]):
        torch.testing.assert_close(a, b, rtol=1.6e-2, atol=1.6e-2)
    gate_up = rand(37, 2 * 14336)
    torch.testing.assert_close(silu_and_mul(gate_up), silu_and_mul_ref(gate_up), rtol=1.6e-2, atol=1.6e-2)


def test_decode_matmuls_on_cuda_match_their_twins():
    """Every launch shape ``tile_config`` picks for Llama-8B/1B projections at decode batch sizes, in bf16."""
    from attnscope.kernels.decode_matmul import decode_matmul, decode_matmul_ref, decode_matmul_silu, decode_matmul_silu_ref

    gen = torch.Generator(device="cuda").manual_seed(0)
    for rows in (2, 7, 32, 64):
        for columns, depth in ((6144, 4096), (2048, 8192), (3 * 1000, 2048), (2 * 14336, 4096)):
            x = torch.randn(rows, depth, generator=gen, device="cuda").bfloat16()
            w = (torch.randn(columns, depth, generator=gen, device="cuda") / depth ** 0.5).bfloat16()
            bias = torch.randn(columns, generator=gen, device="cuda").bfloat16()
            torch.testing.assert_close(decode_matmul(x, w, bias), decode_matmul_ref(x, w, bias), rtol=1.6e-2, atol=1.6e-2)
            torch.testing.assert_close(decode_matmul_silu(x, w), decode_matmul_silu_ref(x, w), rtol=1.6e-2, atol=1.6e-2)


def test_paged_prefill_on_cuda_matches_its_twin():
    from attnscope.kernels.paged_prefill import paged_prefill_attention
    from attnscope.kernels.reference import paged_prefill_attention_ref

    gen = torch.Generator(device="cuda").manual_seed(0)
    chunks = [(1000, 300), (16, 1), (4000, 65)]  # (cached, length)
    caches = [torch.randn(800, 16, 8, 128, generator=gen, device="cuda").to(torch.bfloat16) for _ in range(2)]
    order = torch.randperm(800, generator=gen, device="cuda").int()
    tables = torch.stack([order[i * 260 : i * 260 + 260] for i in range(3)])  # 260 blocks hold 4160 tokens
    q = torch.randn(sum(n for _, n in chunks) + 7, 32, 128, generator=gen, device="cuda").to(torch.bfloat16)
    starts = torch.tensor([7, 307, 308], dtype=torch.int32, device="cuda")
    lens, cached = (torch.tensor(c, dtype=torch.int32, device="cuda") for c in zip(*[(n, c) for c, n in chunks]))
    got = paged_prefill_attention(q, *caches, tables, starts, lens, cached, 128**-0.5, 300)
    want = paged_prefill_attention_ref(q, *caches, tables, starts, lens, cached, 128**-0.5)
    torch.testing.assert_close(got[7:], want[7:], rtol=2e-2, atol=2e-2)


def test_prefix_cache_hits_and_prompt_chunks_give_the_same_tokens_on_cuda(tiny_llama):
    """The paged prefill kernel runs the second request's uncached tail and the later chunks of a chunked prompt
    (float32, so greedy tokens cannot flip on rounding between the kernel paths)."""
    from attnscope.engine.engine_config import EngineConfig
    from attnscope.engine.llm_engine import LLMEngine

    def engine(**extra):
        return LLMEngine(EngineConfig(model=str(tiny_llama), device="cuda", dtype="float32", num_kv_blocks=256,
                                      **extra))

    prompt = " ".join(CORPUS[:40])
    longer = prompt + " the early bird"
    params = {"temperature": 0.0, "max_tokens": 12, "ignore_eos": True}
    cached = engine()
    first = cached.generate([prompt], params)[0]
    again = cached.generate([longer], params)[0]
    assert again.usage.cached_prompt_tokens >= 16
    fresh = engine(enable_prefix_caching=False).generate([longer], params)[0]
    assert again.completions[0].token_ids == fresh.completions[0].token_ids
    chunked = engine(max_num_batched_tokens=48).generate([prompt], params)[0]
    assert chunked.completions[0].token_ids == first.completions[0].token_ids


@pytest.mark.parametrize("fused", [False, True], ids=["standalone", "fused-into-decode"])
def test_rank_partials_on_cuda_match_their_twin(fused: bool):
    """A tensor-parallel rank's bf16 partial capture (its 12 of 32 heads, global weights) against the float32 twin."""
    from dataclasses import replace

    from attnscope.kernels.capture import partial_capture
    from attnscope.kernels.capture_reference import CaptureRequest, partial_capture_ref
    from attnscope.kernels.paged_decode import paged_decode_attention

    gen = torch.Generator(device="cuda").manual_seed(1)
    lens = [3000, 17, 1200]
    k_cache, v_cache = (torch.randn(600, 16, 3, 128, generator=gen, device="cuda").to(torch.bfloat16) for _ in range(2))
    tables = torch.randperm(600, generator=gen, device="cuda").int()[:570].view(3, 190)
    q = torch.randn(3, 12, 128, generator=gen, device="cuda").to(torch.bfloat16)
    ints = lambda values: torch.tensor(values, dtype=torch.int32, device="cuda")  # noqa: E731
    req = CaptureRequest(q=q, block_tables=tables, query_pos=ints([n - 1 for n in lens]),
                         head_weights=torch.full((3, 12), 1 / 32, device="cuda"), mask_prefix=ints([0, 0, 5]),
                         window=ints([0, 0, 500]), sink_tokens=ints([4, 0, 1]), top_k=32)
    stats = None
    if fused:
        _, _, stats = paged_decode_attention(q, k_cache, v_cache, tables, ints(lens), 128**-0.5,
                                             capture=replace(req, top_k=0), capture_rows=ints([0, 1, 2]))
    got = partial_capture(k_cache, req, 128**-0.5, stats=stats)
    want = partial_capture_ref(k_cache.float(), replace(req, q=q.float()), 128**-0.5)
    torch.testing.assert_close(got.stats.lse, want.stats.lse, rtol=1e-2, atol=1e-2)
    for name in ("hist", "entropy", "sink_mass"):
        torch.testing.assert_close(getattr(got.stats, name), getattr(want.stats, name), rtol=2e-2, atol=2e-3)
    assert torch.equal(torch.isinf(got.p_bar), torch.isinf(want.p_bar))
    torch.testing.assert_close(got.p_bar, want.p_bar, rtol=2e-2, atol=1e-4)


def _capture_workload(engine, launch_rows: int, compiled) -> None:
    """Capture requests that reach every eager and graph path, checking after each batch that ``compiled()``
    (the kernel variants compiled so far) holds nothing new: two batches of prefill steps capturing the first
    tokens of four requests and of one, decode steps with fingerprint, raw, de-rotated raw and sketch capture,
    an eager step where a new prompt is prefilled beside captured decode rows (``LaunchShapes``), that prompt's
    own attention (sketch, then raw: more rows than the largest batch bucket, run in launches of
    ``launch_rows``), and a prompt continuing a cached prefix (the paged prefill kernel)."""
    before = compiled()
    captures = [{"mode": "fingerprint", "layers": "auto", "fingerprint_max_steps": None},
                {"mode": "raw", "top_k": 7, "layers": "last"}, {"mode": "sketch", "layers": "auto"},
                {"mode": "raw", "top_k": 5, "layers": "last", "derotate": True}]
    params = {"max_tokens": 12, "ignore_eos": True}
    late_prompt = " ".join(CORPUS[5:70])
    assert len(engine.tokenizer.encode(late_prompt)) > launch_rows
    usage = {}
    for batch, late in ((captures, captures[2]), (captures[1:2], captures[1])):
        rids = [engine.add_request(" ".join(CORPUS[i : i + 4]), params=params, capture=c)
                for i, c in enumerate(batch)]
        records, steps = [], 0
        while engine.has_unfinished():
            if steps == 4:
                rids.append(engine.add_request(late_prompt, params=params, capture={**late, "include_prompt": True}))
            if steps == 6 and late is captures[1]:  # the late prompt's blocks are cached by now
                cached = engine.add_request(late_prompt + " and again", params=params)
            outputs = engine.step()
            records += [r for out in outputs for d in out.deltas for r in d.attention_tokens or []]
            usage.update({out.request_id: out.usage for out in outputs})
            steps += 1
        assert compiled() - before == set()
        assert len(records) >= 10 * len(rids)
    assert usage[cached].cached_prompt_tokens >= engine.config.block_size


def test_capture_steps_after_the_warm_up_compile_no_kernel(tiny_llama):
    """With ``warm_capture`` (the CUDA default) no Triton kernel compiles after start-up (``_capture_workload``)."""
    import triton

    from attnscope.kernels import capture, decode_matmul, layer_ops, paged_decode, paged_prefill

    kernels = [fn for module in (capture, decode_matmul, layer_ops, paged_decode, paged_prefill)
               for fn in vars(module).values() if isinstance(fn, triton.runtime.JITFunction)]

    def compiled() -> set[tuple[str, str]]:
        return {(fn.__name__, str(key)) for fn in kernels for caches in fn.device_caches.values() for key in caches[0]}

    for fn in kernels:  # forget the variants earlier tests launched: start-up alone must bring in what follows
        fn.device_caches.clear()
    engine = _engine(tiny_llama, "cuda")
    _capture_workload(engine, engine.runner.graphs.shapes.launch_rows, compiled)


def _cached_kernels(folder) -> set[tuple[str, str]]:
    """The entries of a Triton cache folder, each with the names of the files it holds (they name its kernel)."""
    return {(entry.name, " ".join(sorted(f.name for f in entry.iterdir()))) for entry in folder.iterdir()}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_tensor_parallel_capture_steps_after_the_warm_up_compile_no_kernel(tiny_llama, tmp_path, monkeypatch):
    """Two ranks (rank processes, one GPU each): after start-up no rank compiles a Triton kernel for the same
    workload (``_capture_workload``): not the ranks' partial captures of eager steps (padded to the ranks'
    launch shapes by the driver), nor rank 0's ranking of the summed ``p̄``. Every process writes the kernels it
    compiles to one fresh Triton cache folder, which gains no entry after start-up (8 sequences at most: the
    ranks compile on one thread each, in the same order, so fewer batch buckets keep start-up short)."""
    from attnscope.engine.engine_config import EngineConfig
    from attnscope.engine.llm_engine import LLMEngine

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), device="cuda", num_kv_blocks=256, max_num_seqs=8,
                                    tensor_parallel_size=2, tensor_parallel_backend="processes"))
    try:
        assert any(tmp_path.iterdir())  # the ranks compiled into this folder
        _capture_workload(engine, engine.runner.shapes.launch_rows, lambda: _cached_kernels(tmp_path))
    finally:
        engine.close()
