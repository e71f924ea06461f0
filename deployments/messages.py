"""Messages between the ingress and the engine deployment (pydantic, pickled through Ray Serve handles).

``EngineDeployment.generate`` yields dicts of these events: first ``EngineAccepted`` or
``EngineRejected`` (the request is queued, or refused with the field to blame and nothing
queued), then ``EngineOutput`` per engine step until the request finishes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from attnscope.capture import CaptureParams
from attnscope.protocol import ChoiceDelta, UsageCounts
from attnscope.sampling import SamplingParams


class EngineRequest(BaseModel):
    """One generation request, validated by the ingress, for ``EngineDeployment.generate``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None
    params: SamplingParams
    max_tokens_given: bool = Field(True, description="False: the client set no limit; full capture then fits "
                                                      "max_tokens to the capture limit instead of refusing.")
    capture: CaptureParams | None = None
    mask_system_prompt: bool = Field(False, description="Raise the capture mask to cover the leading system messages.")


class EngineAccepted(BaseModel):
    """The request is queued; outputs follow."""

    kind: Literal["accepted"] = "accepted"


class EngineRejected(BaseModel):
    """The engine refused the request and queued nothing."""

    kind: Literal["rejected"] = "rejected"
    message: str
    field: str | None


class EngineOutput(BaseModel):
    """One engine step's news for the request (``model_validate(request_output, from_attributes=True)``)."""

    kind: Literal["output"] = "output"
    deltas: list[ChoiceDelta]
    finished: bool
    usage: UsageCounts


EngineEvent = Annotated[EngineAccepted | EngineRejected | EngineOutput, Field(discriminator="kind")]
ENGINE_EVENT = TypeAdapter(EngineEvent)


def parse_event(data: dict[str, Any]) -> EngineAccepted | EngineRejected | EngineOutput:
    """An event the engine deployment yielded, validated."""
    return ENGINE_EVENT.validate_python(data)


class ModelInfo(BaseModel):
    """What the ingress needs to know about the served model."""

    num_layers: int
    num_heads: int
    max_model_len: int
    max_full_capture_tokens: int
    think_segmentation: bool


class EngineStatsReport(BaseModel):
    """``EngineDeployment.stats()``: one replica's load, and which replica on which Ray node answered."""

    kv_usage: float
    num_running: int
    num_waiting: int
    num_requests: int
    capture_sessions: int
    replica: str = ""
    node_id: str = ""
