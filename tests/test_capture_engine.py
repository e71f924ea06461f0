"""Attention capture through the engine, checked against HF transformers' eager attention maps."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from attnscope.engine.llm_engine import InvalidRequestError
from attnscope.zones import ZONES
from records import full_matrices  # tests/records.py

GREEDY = {"temperature": 0.0, "max_tokens": 12}
PROMPT = "The old lighthouse keeper climbed the stairs every evening to light the lamp, because"


def hf_attentions(hf_model, token_ids: list[int]) -> list[torch.Tensor]:
    """Per layer ``[heads, T, T]`` eager attention probabilities of HF transformers."""
    with torch.inference_mode():
        out = hf_model(torch.tensor([token_ids]), output_attentions=True)
    return [a[0].float() for a in out.attentions]


def generate(engine, capture, prompt=PROMPT, params=GREEDY):
    return engine.generate([prompt], params, capture=capture)[0]


def test_raw_topk_matches_transformers_head_mean(smollm_engine, hf_smollm):
    out = generate(smollm_engine, {"mode": "raw", "top_k": 8, "layers": "auto"})
    choice = out.completions[0]
    tokens = out.prompt_token_ids + choice.token_ids
    attn = hf_attentions(hf_smollm, tokens)
    entries = choice.attention_tokens
    assert [e["decode_step"] for e in entries] == list(range(len(choice.token_ids)))
    layers = [7, 15, 22, 29]
    for entry in entries:
        pos = entry["query_position"]
        assert pos == len(out.prompt_token_ids) + entry["decode_step"] - 1
        assert sorted(int(k) for k in entry["layers"]) == layers
        for layer in layers:
            data = entry["layers"][str(layer)]
            ref = attn[layer][:, pos, : pos + 1].mean(0)
            assert sum(data["true_probs"]) <= 1 + 1e-6
            assert data["topk_mass"] == pytest.approx(sum(data["true_probs"]))
            assert np.allclose(data["true_probs"], ref[data["token_positions"]].numpy(), atol=2e-5)
            kth = sorted(ref.tolist(), reverse=True)[len(data["true_probs"]) - 1]
            assert min(data["true_probs"]) >= kth - 2e-5
            assert sum(data["attention_scores"]) == pytest.approx(1.0, abs=1e-5)
            assert data["logsumexp_candidates"] == 0.0
            assert np.allclose(np.exp(data["topk_logits"]), data["true_probs"], rtol=1e-5)


def test_single_head_capture_gives_real_logits(smollm_engine, hf_smollm):
    out = generate(smollm_engine, {"mode": "raw", "top_k": 5, "layers": [18], "head_ids": [6]})
    choice = out.completions[0]
    attn = hf_attentions(hf_smollm, out.prompt_token_ids + choice.token_ids)
    for entry in choice.attention_tokens:
        pos = entry["query_position"]
        ref = attn[18][6, pos, : pos + 1]
        assert entry["layer_id"] == 18
        assert entry["token_positions"][0] == int(ref.argmax())
        assert np.allclose(entry["true_probs"], ref[entry["token_positions"]].numpy(), atol=2e-5)
        assert entry["logsumexp_candidates"] != 0.0
        assert np.allclose(np.exp(np.array(entry["topk_logits"]) - entry["logsumexp_candidates"]),
                           entry["true_probs"], rtol=1e-4)


def _hist_reference(rows: torch.Tensor, pos: int, sink: int) -> tuple[np.ndarray, float]:
    """Mean over heads of the per-head distance histogram and entropy over positions >= sink."""
    hists, ents = [], []
    for head in rows:
        p = head[sink : pos + 1].double()
        p = p / p.sum()
        d = pos - torch.arange(sink, pos + 1)
        bins = torch.where(d < 2, 0, torch.floor(torch.log2(d.clamp(min=1).double())).long()).clamp(max=15)
        hists.append(torch.zeros(16, dtype=torch.float64).index_add_(0, bins, p).numpy())
        ents.append(float(-(p[p > 0] * p[p > 0].log()).sum()))
    return np.mean(hists, axis=0), float(np.mean(ents))


def test_fingerprint_matches_transformers_and_respects_stride_and_max(smollm_engine, hf_smollm):
    out = generate(smollm_engine, {"mode": "fingerprint", "layers": [20], "stride": 3, "max_steps": 3},
                   params={"temperature": 0.0, "max_tokens": 12, "ignore_eos": True})
    choice = out.completions[0]
    entries = choice.attention_tokens
    assert [e["step"] for e in entries] == [0, 3, 6]
    attn = hf_attentions(hf_smollm, out.prompt_token_ids + choice.token_ids)
    for entry in entries:
        fp = entry["fingerprint"]
        pos = entry["query_position"]
        assert len(fp) == 20 and entry["schema_version"] == 1
        assert entry["manifold"] in ZONES
        hist, ent = _hist_reference(attn[20][:, pos, :], pos, sink=1)
        assert np.allclose(fp[4:], hist, atol=2e-5)
        assert fp[0] == pytest.approx(hist[0:3].sum(), abs=2e-5)
        assert fp[1] == pytest.approx(hist[3:8].sum(), abs=2e-5)
        assert fp[2] == pytest.approx(hist[8:].sum(), abs=2e-5)
        assert fp[3] == pytest.approx(ent / math.log(pos), abs=2e-5)
        assert entry["sink_mass"] == pytest.approx(float(attn[20][:, pos, 0].mean()), abs=2e-5)


def test_raw_and_fingerprint_requests_sharing_a_layer_both_match_transformers(smollm_engine, hf_smollm):
    """A raw request (which needs no distance statistics) batched with a fingerprint request on the same
    layer: the shared capture still computes the fingerprint's statistics, and both match HF."""
    params = {"temperature": 0.0, "max_tokens": 5, "ignore_eos": True}
    captures = [{"mode": "raw", "top_k": 6, "layers": [20]}, {"mode": "fingerprint", "layers": [20]}]
    prompts = [smollm_engine.tokenizer.encode(p) for p in (PROMPT, "Count from one to ten in words:")]
    rids = [smollm_engine.add_request(prompt_token_ids=p, params=params, capture=c) for p, c in zip(prompts, captures)]
    entries = {rid: [] for rid in rids}
    tokens = {rid: list(p) for rid, p in zip(rids, prompts)}
    while smollm_engine.has_unfinished():
        for out in smollm_engine.step():
            for delta in out.deltas:
                tokens[out.request_id] += delta.token_ids
                entries[out.request_id] += delta.attention_tokens or []
    raw_rid, fp_rid = rids
    attn = hf_attentions(hf_smollm, tokens[raw_rid])
    assert len(entries[raw_rid]) == 5
    for entry in entries[raw_rid]:
        ref = attn[20][:, entry["query_position"], : entry["query_position"] + 1].mean(0)
        assert np.allclose(entry["true_probs"], ref[entry["token_positions"]].numpy(), atol=2e-5)
        assert "fingerprint" not in entry
    attn = hf_attentions(hf_smollm, tokens[fp_rid])
    assert len(entries[fp_rid]) == 5
    for entry in entries[fp_rid]:
        pos = entry["query_position"]
        hist, ent = _hist_reference(attn[20][:, pos, :], pos, sink=1)
        assert np.allclose(entry["fingerprint"][4:], hist, atol=2e-5)
        assert entry["fingerprint"][3] == pytest.approx(ent / math.log(pos), abs=2e-5)
        assert entry["sink_mass"] == pytest.approx(float(attn[20][:, pos, 0].mean()), abs=2e-5)


def test_sketch_mode_shapes_and_hubs(smollm_engine, hf_smollm):
    out = generate(smollm_engine, {"mode": "sketch", "layers": [10, 29]})
    choice = out.completions[0]
    attn = hf_attentions(hf_smollm, out.prompt_token_ids + choice.token_ids)
    for entry in choice.attention_tokens:
        assert entry["mode"] == "sketch"
        assert set(entry["layer_sketches"]) == {"10", "29"}
        pos = entry["query_position"]
        for layer, sketch in entry["layer_sketches"].items():
            assert len(sketch["dist_hist"]) == 16
            assert sum(sketch["dist_hist"]) == pytest.approx(1.0, abs=1e-5)
            hubs = sketch["top_hubs"]
            assert len(hubs) == min(32, pos + 1)
            ref = attn[int(layer)][:, pos, : pos + 1].mean(0)
            assert np.allclose([m for _, m in hubs], ref[[p for p, _ in hubs]].numpy(), atol=2e-5)
            assert sketch["mass_captured"] == pytest.approx(sum(m for _, m in hubs))


def test_mask_prefix_window_and_include_prompt(smollm_engine, hf_smollm):
    n = 5
    out = generate(smollm_engine, {"mode": "raw", "top_k": 6, "mask_prefix": n, "window": 4, "include_prompt": True},
                   params={"temperature": 0.0, "max_tokens": 4})
    choice = out.completions[0]
    prompt_len = len(out.prompt_token_ids)
    entries = choice.attention_tokens
    prompt_entries = [e for e in entries if e.get("prompt")]
    assert [e["query_position"] for e in prompt_entries] == list(range(n, prompt_len - 1))  # masked queries: none
    assert [e["decode_step"] for e in entries if not e.get("prompt")] == list(range(len(choice.token_ids)))
    attn = hf_attentions(hf_smollm, out.prompt_token_ids + choice.token_ids)
    for entry in entries:
        pos = entry["query_position"]
        assert len(entry["token_positions"]) <= 4
        assert all(0 <= p and p + n > pos - 4 for p in entry["token_positions"])
        heads = attn[29][:, pos, : pos + 1]
        renorm = (heads[:, n:] / heads[:, n:].sum(-1, keepdim=True)).mean(0)
        assert np.allclose(entry["true_probs"], renorm[entry["token_positions"]].numpy(), atol=2e-5)


def test_full_mode_decodes_to_causal_rows(smollm_engine):
    out = generate(smollm_engine, {"mode": "full", "layers": "2,18"}, params={"temperature": 0.0, "max_tokens": 5})
    choice = out.completions[0]
    data = choice.attn_capture_data
    assert [d["layer_idx"] for d in data] == [2, 18]
    prompt_len = len(out.prompt_token_ids)
    t = prompt_len + len(choice.token_ids) - 1
    for m, meta in full_matrices(data).values():
        assert m.shape == (t, 9, t)
        assert np.allclose(m.sum(-1), 1.0, atol=5e-3)
        assert np.all(m[np.triu_indices(t, 1)[0], :, np.triu_indices(t, 1)[1]] == 0)
        assert meta == {"prompt_len": prompt_len, "total_len": t, "vision_ranges": [],
                                   "lang_ranges": [{"start": 0, "end": prompt_len}], "mask_prefix": 0}


@pytest.mark.parametrize("mode", ["raw", "sketch", "fingerprint"])
def test_rows_inside_the_privacy_mask_are_not_captured(smollm_engine, mode):
    """A query before ``mask_prefix`` attends to masked keys only: no record for it, prompt row or decode step (a mask
    past the prompt drops the first decode step too), while every row after it is captured."""
    prompt_len = len(smollm_engine.tokenizer.encode(PROMPT))
    for n in (4, prompt_len + 1):
        out = generate(smollm_engine, {"mode": mode, "include_prompt": True, "mask_prefix": n, "top_k": 3},
                       params={"temperature": 0.0, "max_tokens": 4})
        positions = [r["query_position"] for r in out.completions[0].attention_tokens]
        assert positions == list(range(n, prompt_len + 3))


def test_full_mode_honours_the_privacy_mask(smollm_engine):
    """With ``mask_prefix = n`` full matrices lose the first n query rows and key columns (the server's system-prompt
    mask sets it), every row renormalised over the keys left: the unmasked matrix's rows from n on, rescaled."""
    n = 6
    params = {"temperature": 0.0, "max_tokens": 4}
    whole, whole_meta = full_matrices(generate(smollm_engine, {"mode": "full", "layers": [18]},
                                               params=params).completions[0].attn_capture_data)[18]
    out = generate(smollm_engine, {"mode": "full", "layers": [18], "mask_prefix": n}, params=params)
    masked, meta = full_matrices(out.completions[0].attn_capture_data)[18]
    t = whole.shape[0]
    assert masked.shape == (t - n, 9, t - n)
    kept = whole[n:, :, n:]
    total = kept.sum(-1, keepdims=True)
    exact = np.broadcast_to(total > 0.01, kept.shape)  # float16 keeps too little of a row whose sink took it all
    assert exact.mean() > 0.5
    assert np.allclose(masked[exact], (kept / np.maximum(total, 1e-30))[exact], atol=2e-3)
    assert np.allclose(masked.sum(-1), 1.0, atol=5e-3)
    assert meta == {**whole_meta, "prompt_len": whole_meta["prompt_len"] - n, "total_len": t - n,
                    "lang_ranges": [{"start": 0, "end": whole_meta["prompt_len"] - n}], "mask_prefix": n}


def test_full_mode_derotated_rows_agree_with_the_derotated_raw_capture(smollm_engine):
    """``derotate`` applies to full matrices too: each generated token's row, averaged over the heads, puts the raw
    de-rotated capture's top-5 positions at its true probabilities (and differs from the rotated matrix)."""
    params = {"temperature": 0.0, "max_tokens": 4}
    raw = generate(smollm_engine, {"mode": "raw", "top_k": 5, "layers": [3], "derotate": True}, params=params)
    full = generate(smollm_engine, {"mode": "full", "layers": [3], "derotate": True}, params=params)
    rotated, _ = full_matrices(generate(smollm_engine, {"mode": "full", "layers": [3]}, params=params)
                               .completions[0].attn_capture_data)[3]
    matrix, _ = full_matrices(full.completions[0].attn_capture_data)[3]
    assert full.completions[0].token_ids == raw.completions[0].token_ids
    assert not np.allclose(matrix, rotated, atol=1e-2)
    for entry in raw.completions[0].attention_tokens:
        mean = matrix[entry["query_position"]].mean(0)
        assert np.allclose(mean[entry["token_positions"]], entry["true_probs"], atol=2e-3)


def test_capture_does_not_change_tokens_and_others_pay_nothing(smollm_engine):
    plain = smollm_engine.generate([PROMPT, "Hello there"], GREEDY)
    rid_a = smollm_engine.add_request(PROMPT, params=GREEDY, capture={"mode": "raw", "layers": "auto"})
    rid_b = smollm_engine.add_request("Hello there", params=GREEDY)
    outs: dict[str, list] = {rid_a: [], rid_b: []}
    while smollm_engine.has_unfinished():
        for o in smollm_engine.step():
            outs[o.request_id].extend(o.deltas)
    assert [t for d in outs[rid_a] for t in d.token_ids] == plain[0].completions[0].token_ids
    assert [t for d in outs[rid_b] for t in d.token_ids] == plain[1].completions[0].token_ids
    assert all(d.attention_tokens is None for d in outs[rid_b])
    assert sum(len(d.attention_tokens) for d in outs[rid_a]) == len(plain[0].completions[0].token_ids)


def test_derotated_capture_differs_and_is_valid(smollm_engine):
    rotated = generate(smollm_engine, {"mode": "raw", "top_k": 5, "layers": [3]}).completions[0].attention_tokens
    derot = generate(smollm_engine, {"mode": "raw", "top_k": 5, "layers": [3], "derotate": True}).completions[0]
    assert len(derot.attention_tokens) == len(rotated)
    assert any(a["token_positions"] != b["token_positions"] for a, b in zip(rotated, derot.attention_tokens))
    assert all(sum(e["true_probs"]) <= 1 + 1e-6 for e in derot.attention_tokens)


@pytest.mark.parametrize(("capture", "field"), [
    ({"layers": [99]}, "capture.layers"),
    ({"head_ids": [9]}, "capture.head_ids"),
    ({"top_k": 65}, "capture.top_k"),
    ({"stride": 0}, "capture.stride"),
    ({"window": -1}, "capture.window"),
    ({"mode": "everything"}, "capture.mode"),
])
def test_bad_capture_parameters_name_the_field(smollm_engine, capture, field):
    with pytest.raises(InvalidRequestError) as err:
        smollm_engine.add_request(PROMPT, params=GREEDY, capture=capture)
    assert err.value.field == field
    assert not smollm_engine.has_unfinished()


def test_full_mode_refused_beyond_limit(smollm_engine):
    with pytest.raises(InvalidRequestError, match="full attention capture is limited") as err:
        smollm_engine.add_request(PROMPT, params={"max_tokens": 5000}, capture={"mode": "full"})
    assert err.value.field == "capture.mode"


WORDS = ["apple", "river", "candle", "mirror", "falcon", "garden", "pencil", "thunder", "velvet", "anchor"]


def test_copying_head_finds_the_needle(smollm_engine):
    """SmolLM2's layer 18 head 6 copies the secret word: top-1 on the needle when the answer is generated."""
    tok = smollm_engine.tokenizer
    rng = random.Random(3)
    checked = 0
    for secret in ["banana", "orchid", "pyramid", "dolphin", "volcano", "cactus"]:
        lines = [f"key-{i}: {rng.choice(WORDS)}" for i in range(40)]
        lines.insert(rng.randrange(41), f"The secret word is {secret}.")
        messages = [{"role": "user", "content": "\n".join(lines) + "\n\nWhat is the secret word?"}]
        ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
        needle_ids = tok.encode(f" {secret}", add_special_tokens=False)
        needle_pos = next(i for i in range(len(ids)) if ids[i : i + len(needle_ids)] == needle_ids)
        head = smollm_engine.generate(prompt_token_ids=[ids], params={"temperature": 0.0, "max_tokens": 12},
                                      capture={"mode": "raw", "top_k": 5, "layers": [18], "head_ids": [6]})[0]
        mean = smollm_engine.generate(prompt_token_ids=[ids], params={"temperature": 0.0, "max_tokens": 12},
                                      capture={"mode": "raw", "top_k": 5, "layers": [18]})[0]
        out_ids = head.completions[0].token_ids
        if needle_ids[0] not in out_ids:
            continue
        step = out_ids.index(needle_ids[0])
        checked += 1
        assert head.completions[0].attention_tokens[step]["token_positions"][0] == needle_pos
        assert needle_pos in mean.completions[0].attention_tokens[step]["token_positions"]
    assert checked >= 3
