"""Capture parameters of one request: the pydantic model shared by the engine and the HTTP layer.

``CaptureParams`` is the engine's normalised form. ``CaptureParams.from_wire`` reads the
request fields of both families the reference systems speak (SGLang: ``return_attention_tokens``,
``top_k_attention``, …; vLLM: ``attn_capture``, ``attn_capture_layers``) so every layer above
the engine accepts the same fields. Definitions of every captured number: ``docs/capture.md``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

CaptureMode = Literal["raw", "sketch", "fingerprint", "full"]
MAX_TOP_K = 64
SKETCH_HUBS = 32


class CaptureParams(BaseModel):
    """What attention to capture for one request, and how much of it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: CaptureMode = Field("raw", description="raw top-k, per-layer sketch, 20-float fingerprint, or full [T, heads, T].")
    top_k: int = Field(10, ge=1, le=MAX_TOP_K, description="Positions per captured row in raw mode.")
    layers: Literal["last", "auto"] | tuple[int, ...] = Field(
        "last", description="'last', 'auto' (L/4, L/2, 3L/4, L-1) or explicit layer ids.")
    head_ids: tuple[int, ...] | None = Field(None, description="Average only these query heads (default: all).")
    mask_prefix: int = Field(0, ge=0, description="Remove positions < n from every output; report the rest as position - n.")
    stride: int = Field(1, ge=1, description="Capture every Nth decode step.")
    max_steps: int | None = Field(None, ge=1, description="Capture at most this many decode steps.")
    window: int = Field(0, ge=0, description="Top-k candidates only among the last W positions (0 = all).")
    include_prompt: bool = Field(False, description="Also capture the attention of every prompt token.")
    sink_tokens: int = Field(1, ge=0, description="Leading positions reported as sink_mass, left out of fingerprint/sketch masses.")
    fingerprint_max_steps: int | None = Field(256, ge=1, description="Fingerprint mode: stop capturing after this many steps (None = never).")
    derotate: bool = Field(False, description="Compute the capture on q·k with RoPE removed.")

    @field_validator("layers", mode="before")
    @classmethod
    def _parse_layers(cls, value: Any) -> Any:
        """Accept 'last', 'auto', '3,7,11' or a list of ints; reject empty or negative ids."""
        if isinstance(value, str):
            text = value.strip().lower()
            if text in ("last", "auto"):
                return text
            try:
                value = [int(part) for part in text.split(",") if part.strip()]
            except ValueError as exc:
                raise ValueError("layers must be 'last', 'auto' or comma-separated layer ids") from exc
        if isinstance(value, (list, tuple)):
            if not value:
                raise ValueError("layers must name at least one layer")
            if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in value):
                raise ValueError("layer ids must be non-negative integers")
            return tuple(sorted(set(value)))
        return value

    @field_validator("fingerprint_max_steps", mode="before")
    @classmethod
    def _zero_is_unlimited(cls, value: Any) -> Any:
        """0 means no early exit, as the reference servers' flag says."""
        return None if value == 0 else value

    @field_validator("head_ids", mode="before")
    @classmethod
    def _parse_heads(cls, value: Any) -> Any:
        """Accept a list of non-negative ints (or '0,3' as a string); an empty list means all heads."""
        if isinstance(value, str):
            value = [int(part) for part in value.split(",") if part.strip()]
        if isinstance(value, (list, tuple)):
            if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in value):
                raise ValueError("head ids must be non-negative integers")
            return tuple(sorted(set(value))) or None
        return value

    def resolve_layers(self, num_layers: int) -> list[int]:
        """Concrete layer ids for a model with ``num_layers`` layers; ValueError for ids out of range."""
        if self.layers == "last":
            return [num_layers - 1]
        if self.layers == "auto":
            return sorted({num_layers // 4, num_layers // 2, 3 * num_layers // 4, num_layers - 1})
        bad = [i for i in self.layers if i >= num_layers]
        if bad:
            raise ValueError(f"layer {bad[0]} does not exist (the model has layers 0..{num_layers - 1})")
        return list(self.layers)

    def check_heads(self, num_heads: int) -> None:
        """ValueError when a head id is outside the model's query heads."""
        bad = [h for h in self.head_ids or () if h >= num_heads]
        if bad:
            raise ValueError(f"head {bad[0]} does not exist (the model has heads 0..{num_heads - 1})")

    @classmethod
    def from_wire(cls, fields: dict[str, Any]) -> CaptureParams | None:
        """Capture parameters from an OpenAI-style request body of either family; None when not asked.

        Raises ``CaptureFieldError`` naming the wire field on invalid values.
        """
        vllm = bool(fields.get("attn_capture"))
        sglang = bool(fields.get("return_attention_tokens"))
        if not (vllm or sglang):
            return None
        if vllm:  # full matrices honour the privacy mask and de-rotation too; the other fields do not apply
            values = {"mode": "full", "layers": fields.get("attn_capture_layers") or "last"}
            values.update({name: fields[wire] for wire, name in _FULL_WIRE_FIELDS.items()
                           if fields.get(wire) is not None})
            return _build(values, {"layers": "attn_capture_layers",
                                   **{name: wire for wire, name in _FULL_WIRE_FIELDS.items()}})
        mode = "raw"
        if fields.get("attention_fingerprint_mode") or fields.get("attention_fingerprint_only"):
            mode = "fingerprint"
        elif fields.get("attention_sketch_mode"):
            mode = "sketch"
        values: dict[str, Any] = {"mode": mode}
        for wire, name in _WIRE_FIELDS.items():
            if fields.get(wire) is not None:
                values[name] = fields[wire]
        return _build(values, {name: wire for wire, name in _WIRE_FIELDS.items()})


_WIRE_FIELDS = {
    "top_k_attention": "top_k",
    "attention_capture_layers": "layers",
    "attention_capture_head_ids": "head_ids",
    "attention_mask_prefix": "mask_prefix",
    "attention_tokens_stride": "stride",
    "attention_tokens_max": "max_steps",
    "attention_tokens_window": "window",
    "include_prompt_attention": "include_prompt",
    "attention_sink_tokens": "sink_tokens",
    "attention_fingerprint_max_steps": "fingerprint_max_steps",
    "attention_derotate": "derotate",
}


_FULL_WIRE_FIELDS = {"attention_mask_prefix": "mask_prefix", "attention_derotate": "derotate"}


class CaptureFieldError(ValueError):
    """An invalid capture field; ``field`` is its name on the wire."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def _build(values: dict[str, Any], wire_names: dict[str, str]) -> CaptureParams:
    """Validate, translating the failing model field back to its wire name."""
    try:
        return CaptureParams(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else "attention"
        wire = wire_names.get(name, name)
        raise CaptureFieldError(f"invalid {wire}: {err['msg']}", wire) from exc
