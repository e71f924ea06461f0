"""Tensor-parallel capture: every rank's partial captures of a step summed in one collective.

After a step's forward, each rank holds a ``PartialCapture`` per captured group (its query
heads' statistics weighted by the global head weights, and its dense share of ``p̄``) and,
for full-matrix rows, its heads' probabilities. Everything is laid out in one float32
buffer whose shape depends only on the step's plan, so it is the same on every rank:

* per group: ``lse`` ``[R, Hq]`` with the rank's heads in their columns and zeros elsewhere
  (query heads never overlap across ranks, so the sum is every head's ``lse``), ``hist``
  ``[R, 16]``, ``entropy`` ``[R]``, ``sink_mass`` ``[R]`` (weighted head sums: they add), and
  with top-k the dense ``p̄`` share ``[R, max_blocks * block_size]`` (4 bytes per position);
* per full-matrix row: ``[Hq, P + 1]`` probabilities, the rank's heads in place, zeros elsewhere.

One ``reduce`` (sum) to rank 0 merges all layers at once, exactly: adding zeros and ``-inf``
outside ``W`` on every rank changes nothing. Each piece starts on 16 bytes (zeros pad the one
before). Rank 0 then ranks ``p̄`` (``finish_summed``: the ``dense_topk`` kernel on a GPU) and
returns the finished results (one device-to-host copy); the others return nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from attnscope.engine.capture_plan import StepCapture
from attnscope.engine.capture_records import results_to_host
from attnscope.engine.parallel import TensorParallel
from attnscope.kernels.capture import DENSE_TOPK_MAX_WIDTH, dense_topk
from attnscope.kernels.capture_reference import CaptureResult, PartialCapture, finish_partial

PIECE_ALIGN = 4  # float32 values: 16 bytes


@dataclass
class RankCaptures:
    """A step's finished captures from rank 0, on the CPU, in plan order: results per group, probabilities per
    full-matrix row."""

    layers: dict[int, list[CaptureResult]] = field(default_factory=dict)
    full: dict[int, list[torch.Tensor]] = field(default_factory=dict)


def reduce_captures(capture: StepCapture, heads: range, num_heads: int, tp: TensorParallel) -> RankCaptures | None:
    """Sum the ranks' partial captures of ``capture`` onto rank 0 in one collective; rank 0's finished results.

    ``heads`` are this rank's query heads out of ``num_heads``. Every rank must call this
    with the same plan. Returns ``None`` on the other ranks.
    """
    pieces = []
    for groups in capture.layers.values():
        for group in groups:
            pieces.extend(_group_pieces(group.partial, heads, num_heads))
    for full in capture.full.values():
        for probs in full.probs:
            pieces.append(_place_heads(probs, heads, num_heads, dim=0))
    flat = torch.cat([part for p in pieces for part in _padded(p)]) if pieces else None
    if flat is not None:
        tp.reduce_to_first(flat)
    if tp.rank != 0:
        return None
    return _unpack(capture, flat, pieces)


def _aligned(numel: int) -> int:
    """``numel`` float32 values rounded up to whole 16 bytes: each piece of the summed buffer starts on 16 bytes,
    so the kernels reading one (``dense_topk``) see the pointer alignment they were compiled for at start-up
    (Triton compiles a kernel variant per alignment it meets)."""
    return -(-numel // PIECE_ALIGN) * PIECE_ALIGN


def _padded(piece: torch.Tensor) -> list[torch.Tensor]:
    """``piece`` flattened, followed by the zeros that pad it to ``_aligned`` values (none when it fits), for the one
    concatenation that copies every piece into the summed buffer."""
    flat = piece.reshape(-1)
    pad = _aligned(flat.numel()) - flat.numel()
    return [flat, flat.new_zeros(pad)] if pad else [flat]


def _place_heads(values: torch.Tensor, heads: range, num_heads: int, dim: int) -> torch.Tensor:
    """``values`` holding this rank's heads along ``dim``, placed in a zero tensor holding all ``num_heads``."""
    shape = list(values.shape)
    shape[dim] = num_heads
    out = values.new_zeros(shape)
    out.narrow(dim, heads.start, len(heads)).copy_(values)
    return out


def _group_pieces(partial: PartialCapture, heads: range, num_heads: int) -> list[torch.Tensor]:
    """A group's summable float32 pieces, in the buffer's order."""
    stats = partial.stats
    pieces = [_place_heads(stats.lse, heads, num_heads, dim=1), stats.hist, stats.entropy, stats.sink_mass]
    if partial.p_bar is not None:
        pieces.append(partial.p_bar)
    return pieces


def finish_summed(summed: PartialCapture, top_k: int) -> CaptureResult:
    """Rank 0's capture of all heads from the summed partials: ``finish_partial``, except that on a CUDA device
    ``p̄`` is ranked by the ``dense_topk`` kernel (the same order, no host sync inside the step) where its rows
    fit the kernel (``DENSE_TOPK_MAX_WIDTH`` positions)."""
    p_bar = summed.p_bar
    if not top_k or p_bar.device.type != "cuda" or p_bar.shape[-1] > DENSE_TOPK_MAX_WIDTH:
        return finish_partial(summed, top_k)
    result = finish_partial(replace(summed, p_bar=None), 0)
    result.topk_pos, result.topk_prob = dense_topk(p_bar, top_k)
    return result


def _unpack(capture: StepCapture, flat: torch.Tensor | None, pieces: list[torch.Tensor]) -> RankCaptures:
    """Rank 0: the summed buffer cut back into the pieces' shapes, finished into results, brought to the CPU
    in one copy (``results_to_host``)."""
    summed = iter([]) if flat is None else iter(
        part[: piece.numel()].view(piece.shape)
        for part, piece in zip(flat.split([_aligned(p.numel()) for p in pieces]), pieces))
    for groups in capture.layers.values():
        for group in groups:
            own = group.partial.stats
            lse, hist, entropy, sink_mass = (next(summed) for _ in range(4))
            p_bar = next(summed) if group.partial.p_bar is not None else None
            stats = CaptureResult(lse, hist, entropy, sink_mass, own.num_stat_positions, None, None, None, None)
            group.result = finish_summed(PartialCapture(stats, p_bar), group.top_k)
    results_to_host(capture)
    out = RankCaptures({layer: [g.result for g in groups] for layer, groups in capture.layers.items()})
    for layer, full in capture.full.items():
        out.full[layer] = [next(summed).cpu() for _ in full.probs]
    return out
