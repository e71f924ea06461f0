"""Comparing capture records of two runs that should agree: numbers within float tolerance, the rest exactly."""

from __future__ import annotations

import base64
import gzip
import math

import numpy as np
import pytest


def flat_numbers(value, prefix: str = "") -> dict:
    """The leaves of a nested record, keyed by their path."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat_numbers(item, f"{prefix}.{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in flat_numbers(item, f"{prefix}[{i}]").items()}
    return {prefix: value}


def assert_records_close(want: list[dict], got: list[dict]) -> None:
    """Same records, same keys; finite floats within 1e-4 relative (1e-5 absolute), everything else equal."""
    assert len(got) == len(want)
    for w, g in zip(want, got):
        fw, fg = flat_numbers(w), flat_numbers(g)
        assert fw.keys() == fg.keys()
        for key, value in fw.items():
            if isinstance(value, float) and not math.isinf(value):
                assert fg[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
            else:
                assert fg[key] == value, key


def full_matrices(attn_capture_data: list[dict]) -> dict[int, tuple[np.ndarray, dict]]:
    """Decoded ``attn_capture_data``: per layer the float32 ``[T, heads, T]`` matrix and its token_meta."""
    return {d["layer_idx"]: (np.frombuffer(gzip.decompress(base64.b64decode(d["data"])), dtype=np.float16)
                             .reshape(d["shape"]).astype(np.float32), d["token_meta"])
            for d in attn_capture_data}
