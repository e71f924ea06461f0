"""Capture parameters as both wire families send them, and their validation."""

from __future__ import annotations

import pytest

from attnscope.capture import CaptureFieldError, CaptureParams


def test_no_capture_fields_means_no_capture():
    assert CaptureParams.from_wire({"model": "m", "messages": []}) is None
    assert CaptureParams.from_wire({"return_attention_tokens": False, "attn_capture": 0}) is None


def test_sglang_family_fields_map_onto_params():
    params = CaptureParams.from_wire({
        "return_attention_tokens": True, "top_k_attention": 7, "attention_capture_layers": "3, 1,3",
        "attention_capture_head_ids": [4, 2], "attention_mask_prefix": 12, "attention_tokens_stride": 2,
        "attention_tokens_max": 9, "attention_tokens_window": 64, "include_prompt_attention": True,
    })
    assert params.mode == "raw" and params.top_k == 7
    assert params.layers == (1, 3) and params.head_ids == (2, 4)
    assert (params.mask_prefix, params.stride, params.max_steps, params.window) == (12, 2, 9, 64)
    assert params.include_prompt


@pytest.mark.parametrize(("fields", "mode"), [
    ({"attention_sketch_mode": True}, "sketch"),
    ({"attention_fingerprint_mode": True}, "fingerprint"),
    ({"attention_fingerprint_only": True}, "fingerprint"),
])
def test_sglang_mode_flags(fields, mode):
    assert CaptureParams.from_wire({"return_attention_tokens": True, **fields}).mode == mode


def test_vllm_family_asks_for_full_matrices():
    params = CaptureParams.from_wire({"attn_capture": 1, "attn_capture_layers": "2,18,27"})
    assert params.mode == "full" and params.layers == (2, 18, 27)
    assert CaptureParams.from_wire({"attn_capture": 1}).layers == "last"


def test_vllm_family_takes_the_privacy_mask_and_derotation_only():
    """Full matrices honour ``attention_mask_prefix`` and ``attention_derotate``; fields of the SGLang family's
    top-k are not read for them, and a bad mask is named by its wire field."""
    params = CaptureParams.from_wire({"attn_capture": 1, "attention_mask_prefix": 7, "attention_derotate": True,
                                      "top_k_attention": 3})
    assert (params.mode, params.mask_prefix, params.derotate, params.top_k) == ("full", 7, True, 10)
    with pytest.raises(CaptureFieldError) as err:
        CaptureParams.from_wire({"attn_capture": 1, "attention_mask_prefix": -1})
    assert err.value.field == "attention_mask_prefix"


def test_fingerprint_max_steps_zero_means_unlimited():
    params = CaptureParams.from_wire({"return_attention_tokens": True, "attention_fingerprint_max_steps": 0})
    assert params.fingerprint_max_steps is None


@pytest.mark.parametrize(("fields", "wire"), [
    ({"top_k_attention": 65}, "top_k_attention"),
    ({"top_k_attention": 0}, "top_k_attention"),
    ({"attention_capture_layers": "1,x"}, "attention_capture_layers"),
    ({"attention_capture_layers": []}, "attention_capture_layers"),
    ({"attention_capture_head_ids": [-1]}, "attention_capture_head_ids"),
    ({"attention_tokens_stride": 0}, "attention_tokens_stride"),
    ({"attention_tokens_window": -2}, "attention_tokens_window"),
    ({"attention_mask_prefix": -1}, "attention_mask_prefix"),
])
def test_invalid_wire_values_name_the_wire_field(fields, wire):
    with pytest.raises(CaptureFieldError) as err:
        CaptureParams.from_wire({"return_attention_tokens": True, **fields})
    assert err.value.field == wire


def test_layer_resolution_against_a_model():
    assert CaptureParams(layers="last").resolve_layers(30) == [29]
    assert CaptureParams(layers="auto").resolve_layers(30) == [7, 15, 22, 29]
    assert CaptureParams(layers="auto").resolve_layers(2) == [0, 1]
    with pytest.raises(ValueError, match="layer 30 does not exist"):
        CaptureParams(layers=[1, 30]).resolve_layers(30)
    with pytest.raises(ValueError, match="head 9 does not exist"):
        CaptureParams(head_ids=[9]).check_heads(9)
