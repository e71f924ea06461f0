"""Client helpers over the official ``openai`` SDK for both attention-capture families.

vLLM family (full matrices): ``extract_attention_from_response`` decodes
``attn_capture_data`` (per layer base64(gzip(float16 [T, heads, T]))) and
``AttentionAnalyzer`` answers questions about one layer's matrix.

SGLang family (per-step records): ``attention_tokens`` reads the records of a choice or a
streaming chunk, ``true_probs`` and ``captured_mass`` turn raw records into exact
probabilities, ``stream_attention`` iterates a streaming chat completion.

``capture_body`` builds the ``extra_body`` of a request for either family. Field meanings:
``docs/capture.md``; usage: ``docs/client.md``.
"""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from attnscope.capture import CaptureParams

TokenType = Literal["prompt", "output", "vision"]


class TokenRange(BaseModel):
    """A half-open range ``[start, end)`` of token positions."""

    start: int
    end: int


class TokenMeta(BaseModel):
    """``token_meta`` of one captured layer: prompt length and modality ranges."""

    model_config = ConfigDict(extra="allow")

    prompt_len: int | None = Field(None, description="Prompt tokens; positions from here on are output.")
    total_len: int | None = Field(None, description="Tokens whose attention was computed (T).")
    mask_prefix: int = Field(0, description="Leading positions removed (privacy mask); index i is position i + mask_prefix.")
    vision_ranges: list[TokenRange] = Field(default_factory=list)
    lang_ranges: list[TokenRange] = Field(default_factory=list)


class CaptureLayer(BaseModel):
    """One item of ``attn_capture_data`` as it arrives on the wire."""

    model_config = ConfigDict(extra="allow")

    layer_idx: int
    data: str = Field(description="base64(gzip(float16 [T, heads, T])).")
    shape: tuple[int, int, int]
    token_meta: TokenMeta = Field(default_factory=TokenMeta)

    def scores(self) -> np.ndarray:
        """The decoded ``[T, heads, T]`` matrix as float32; ValueError when it does not fit ``shape``."""
        raw = gzip.decompress(base64.b64decode(self.data))
        expected = int(np.prod(self.shape)) * 2
        if len(raw) != expected:
            raise ValueError(f"layer {self.layer_idx}: {len(raw)} bytes do not hold float16 {list(self.shape)}")
        return np.frombuffer(raw, dtype=np.float16).astype(np.float32).reshape(self.shape)


class RawLayerEntry(BaseModel):
    """The raw-mode fields of one layer of an ``attention_tokens`` record."""

    model_config = ConfigDict(extra="allow")

    token_positions: list[int]
    topk_logits: list[float]
    logsumexp_candidates: float


# ------------------------------------------------------------------ vLLM family


def extract_attention_from_response(response: Any, choice_index: int = 0) -> dict[int, dict]:
    """Decode ``attn_capture_data`` into ``{layer: {"scores", "token_meta", "shape", "layer", "model"}}``.

    ``response`` may be a dict, a JSON string or bytes, an SDK object (``ChatCompletion``;
    unknown fields live in ``model_extra``) or the result of ``with_raw_response``. The data
    is read from the top level of the response, else from ``choices[choice_index]``.
    ``scores`` is float32 ``[T, heads, T]`` (query × head × key). Empty dict when the
    response carries no capture data.
    """
    response = _parse(response)
    data = _get(response, "attn_capture_data")
    if data is None:
        choice = _choice(response, choice_index)
        data = _get(choice, "attn_capture_data") if choice is not None else None
    out: dict[int, dict] = {}
    for item in data or []:
        layer = CaptureLayer.model_validate(item)
        out[layer.layer_idx] = {
            "scores": layer.scores(),
            "token_meta": layer.token_meta.model_dump(),
            "shape": layer.shape,
            "layer": layer.layer_idx,
            "model": _get(response, "model"),
        }
    return out


class AttentionAnalyzer:
    """One layer's full attention ``[T, heads, T]`` with the token types of ``token_meta``.

    Row ``i`` is the query at position ``i``; it attends causally to keys ``0..i``.
    """

    def __init__(self, scores: np.ndarray, token_meta: Mapping[str, Any] | TokenMeta | None = None) -> None:
        scores = np.asarray(scores, dtype=np.float32)
        if scores.ndim != 3 or scores.shape[0] != scores.shape[2]:
            raise ValueError(f"scores must be [T, heads, T], got {list(scores.shape)}")
        self.scores = scores
        self.meta = TokenMeta.model_validate(token_meta or {})

    @property
    def num_tokens(self) -> int:
        """T, the number of query (and key) positions."""
        return self.scores.shape[0]

    @property
    def num_heads(self) -> int:
        """Attention heads of the layer."""
        return self.scores.shape[1]

    def token_type(self, key_idx: int) -> TokenType:
        """``"output"`` from ``prompt_len`` on, ``"vision"`` inside a vision range, else ``"prompt"``."""
        if self.meta.prompt_len is not None and key_idx >= self.meta.prompt_len:
            return "output"
        if any(r.start <= key_idx < r.end for r in self.meta.vision_ranges):
            return "vision"
        return "prompt"

    def attention_for_token(self, token_idx: int, head_idx: int | None = None, avg_heads: bool = False) -> np.ndarray:
        """Attention of query ``token_idx``: ``[T]`` for one head or the head mean, else ``[heads, T]``."""
        row = self.scores[token_idx]
        if head_idx is not None:
            return row[head_idx]
        return row.mean(axis=0) if avg_heads else row

    def top_attended_tokens(self, token_idx: int = -1, top_k: int = 5, avg_heads: bool = True,
                            head_idx: int | None = None) -> list[tuple[int, float, TokenType]]:
        """``(key_idx, weight, token_type)`` of the ``top_k`` keys query ``token_idx`` attends most.

        ``head_idx`` selects one head (it wins over ``avg_heads``); otherwise ``avg_heads``
        must be true and the head mean is ranked. Only the causal prefix ``0..token_idx`` is
        ranked; ties go to the lower position. IndexError for a row outside ``[-T, T)``.
        """
        if head_idx is None and not avg_heads:
            raise ValueError("give head_idx or avg_heads=True")
        query = range(self.num_tokens)[token_idx]
        weights = self.attention_for_token(query, head_idx, avg_heads=True)[: query + 1]
        order = np.argsort(-weights, kind="stable")[:top_k]
        return [(int(k), float(weights[k]), self.token_type(int(k))) for k in order]

    def cross_modal_attention(self, avg_heads: bool = True, head_idx: int | None = None) -> float:
        """Fraction of the vision tokens' attention that lands on language tokens (0.0 without vision)."""
        vision = [i for r in self.meta.vision_ranges for i in range(r.start, min(r.end, self.num_tokens))]
        lang = [i for r in self.meta.lang_ranges for i in range(r.start, min(r.end, self.num_tokens))]
        if not vision or not lang:
            return 0.0
        if head_idx is None and not avg_heads:
            raise ValueError("give head_idx or avg_heads=True")
        rows = self.scores[vision]
        weights = rows[:, head_idx] if head_idx is not None else rows.mean(axis=1)
        total = float(weights.sum())
        return float(weights[:, lang].sum()) / total if total else 0.0


# ---------------------------------------------------------------- SGLang family


def attention_tokens(choice_or_chunk: Any, index: int = 0) -> list[dict]:
    """The ``attention_tokens`` records of a choice, a streaming delta, or a whole response/chunk.

    Non-streaming choices carry ``choices[i].attention_tokens``, streaming chunks
    ``choices[i].delta.attention_tokens``; for a response or chunk the choice with
    ``index`` is read. Accepts dicts, JSON text and SDK objects. Empty list when absent.
    """
    obj = _parse(choice_or_chunk)
    if _get(obj, "choices") is not None:
        obj = _choice(obj, index)
    if obj is None:
        return []
    records = _get(obj, "attention_tokens")
    if records is None and _get(obj, "delta") is not None:
        records = _get(_get(obj, "delta"), "attention_tokens")
    return [dict(r) for r in records or []]


def true_probs(entry: Mapping[str, Any]) -> np.ndarray | dict[int, np.ndarray]:
    """``exp(topk_logits - logsumexp_candidates)`` of a raw record; ``{layer: probs}`` for multi-layer records."""
    if "layers" in entry:
        return {int(layer): _true_probs(fields) for layer, fields in entry["layers"].items()}
    return _true_probs(entry)


def captured_mass(entry: Mapping[str, Any]) -> float | dict[int, float]:
    """Attention mass the record's positions hold: ``Σ true_probs`` (raw) or ``mass_captured`` (sketch).

    A float for a single-layer raw record, ``{layer: mass}`` for multi-layer and sketch records.
    """
    if "layer_sketches" in entry:
        return {int(layer): float(s["mass_captured"]) for layer, s in entry["layer_sketches"].items()}
    probs = true_probs(entry)
    if isinstance(probs, dict):
        return {layer: float(p.sum()) for layer, p in probs.items()}
    return float(probs.sum())


def stream_attention(client: Any, **create_kwargs: Any) -> Iterator[tuple[str, list[dict]]]:
    """Stream a chat completion and yield ``(text_delta, attention_entries)`` per chunk of choice 0.

    ``create_kwargs`` go to ``client.chat.completions.create`` (``stream=True`` is added);
    without ``extra_body`` the request asks for raw capture with ``capture_body()``.
    """
    create_kwargs.setdefault("extra_body", capture_body())
    with client.chat.completions.create(stream=True, **create_kwargs) as stream:
        for chunk in stream:
            for choice in chunk.choices:
                if choice.index == 0:
                    yield choice.delta.content or "", attention_tokens(choice)


def capture_body(mode: Literal["raw", "sketch", "fingerprint", "full"] = "raw", *,
                 top_k: int | None = None, layers: str | Sequence[int] | None = None,
                 head_ids: Sequence[int] | None = None, mask_prefix: int | None = None,
                 stride: int | None = None, max_steps: int | None = None, window: int | None = None,
                 include_prompt: bool | None = None, fingerprint_only: bool = False) -> dict[str, Any]:
    """The request ``extra_body`` asking for capture: the vLLM family for ``"full"`` (which takes ``layers`` and
    ``mask_prefix`` only), else the SGLang family.

    Fields left ``None`` are not sent (the server's defaults apply). ``layers`` is
    ``"last"``, ``"auto"``, ``"3,7"`` or a list of ids. The body is checked with the
    server's own validator; ``attnscope.capture.CaptureFieldError`` names a bad field.
    """
    wire_layers = layers if layers is None or isinstance(layers, str) else ",".join(str(i) for i in layers)
    if mode == "full":
        others = {"top_k": top_k, "head_ids": head_ids, "stride": stride,
                  "max_steps": max_steps, "window": window, "include_prompt": include_prompt,
                  "fingerprint_only": fingerprint_only or None}
        given = [name for name, value in others.items() if value is not None]
        if given:
            raise ValueError(f"full capture (attn_capture) takes only layers and mask_prefix, not {', '.join(given)}")
        body: dict[str, Any] = {"attn_capture": 1}
        if wire_layers is not None:
            body["attn_capture_layers"] = wire_layers
        if mask_prefix is not None:
            body["attention_mask_prefix"] = mask_prefix
    else:
        body = {"return_attention_tokens": True}
        if mode == "sketch":
            body["attention_sketch_mode"] = True
        elif mode == "fingerprint":
            body["attention_fingerprint_mode"] = True
            if fingerprint_only:
                body["attention_fingerprint_only"] = True
        elif mode != "raw":
            raise ValueError(f"unknown capture mode {mode!r}")
        optional = {
            "top_k_attention": top_k, "attention_capture_layers": wire_layers,
            "attention_capture_head_ids": list(head_ids) if head_ids is not None else None,
            "attention_mask_prefix": mask_prefix, "attention_tokens_stride": stride,
            "attention_tokens_max": max_steps, "attention_tokens_window": window,
            "include_prompt_attention": include_prompt,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
    CaptureParams.from_wire(body)
    return body


# --------------------------------------------------------------------- helpers


def _true_probs(fields: Mapping[str, Any]) -> np.ndarray:
    """True probabilities of one layer's raw fields."""
    raw = RawLayerEntry.model_validate(fields)
    return np.exp(np.asarray(raw.topk_logits, dtype=np.float64) - raw.logsumexp_candidates)


def _parse(obj: Any) -> Any:
    """JSON text, bytes or a raw HTTP response (``with_raw_response``) as a dict; anything else as is."""
    if isinstance(obj, (str, bytes, bytearray)):
        return json.loads(obj)
    content = getattr(obj, "content", None)
    if isinstance(content, (bytes, bytearray)):
        return json.loads(content)
    return obj


def _get(obj: Any, name: str) -> Any:
    """Field ``name`` of a dict or an SDK object (declared field or ``model_extra``); None when absent."""
    if isinstance(obj, Mapping):
        return obj.get(name)
    extra = getattr(obj, "model_extra", None) or {}
    if name in extra:
        return extra[name]
    return getattr(obj, name, None)


def _choice(response: Any, index: int) -> Any:
    """The choice with ``index`` of a response or chunk, or None."""
    for position, choice in enumerate(_get(response, "choices") or []):
        choice_index = _get(choice, "index")
        if (position if choice_index is None else choice_index) == index:
            return choice
    return None
