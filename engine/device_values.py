"""Values a step leaves on the device a while: inputs read from the previous step's samples (which the host has
not read yet), and results copied to the host without waiting for them."""

from __future__ import annotations

import torch


def read_pending_tokens(input_ids: torch.Tensor, sources: torch.Tensor, previous_tokens: torch.Tensor) -> torch.Tensor:
    """``input_ids`` with each entry whose ``sources`` row is >= 0 replaced by ``previous_tokens[row]``.

    Runs on the device without a host sync (it is also recorded inside decode graphs), so a
    step can be launched before the host has the previous step's tokens. Keeps
    ``input_ids``' dtype (no cast when all three share it, as in a decode graph: int32).
    """
    picked = previous_tokens.index_select(0, sources.clamp_min(0)).to(input_ids.dtype)
    return torch.where(sources >= 0, picked, input_ids)


def copy_to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of ``tensor``; from a GPU it is issued without waiting (pinned memory): read it after an event
    recorded later on the same stream has completed."""
    if tensor.device.type != "cuda":
        return tensor.cpu()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)
