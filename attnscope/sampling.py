"""Sampling parameters of one request: the pydantic model shared by the engine and the HTTP layer."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class SamplingParams(BaseModel):
    """How to pick the next tokens of one request, and when to stop.

    Validated at the boundary so the engine never sees an impossible value; a
    ``pydantic.ValidationError`` names the offending field.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(16, ge=1, description="Most tokens to generate.")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 means greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus mass kept.")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens; 0 keeps all.")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Drop tokens below min_p times the top probability.")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="Divide positive (multiply negative) logits of seen tokens.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Subtract once from every token already generated.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Subtract per occurrence in the generated tokens.")
    seed: int | None = Field(None, description="Per-request seed: the same seed gives the same tokens.")
    stop: list[str] = Field(default_factory=list, description="Stop strings (not included in the output).")
    stop_token_ids: list[int] = Field(default_factory=list, description="Extra token ids that end the request.")
    ignore_eos: bool = Field(False, description="Keep generating past the model's end-of-sequence tokens.")
    n: int = Field(1, ge=1, le=64, description="Number of independent completions.")
    logprobs: int | None = Field(None, ge=0, le=20, description="Return the chosen token's logprob and the top-N alternatives.")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: object) -> object:
        """Accept a single stop string as OpenAI clients send it."""
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        return value

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: list[str]) -> list[str]:
        """An empty stop string would end every request at once."""
        if any(s == "" for s in value):
            raise ValueError("stop strings must be non-empty")
        return value

    @property
    def greedy(self) -> bool:
        """True when the most likely token is always taken."""
        return self.temperature == 0.0 or self.top_k == 1
