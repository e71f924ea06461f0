"""Float32 torch twin of the attention-capture kernels (definitions: ``docs/capture.md``).

It materialises each captured row's full attention over its sequence's paged keys, a
chunk of rows at a time, so it is both the CPU engine's capture path and the oracle the
Triton capture kernels (``attnscope.kernels.capture``, same API) are tested against.
Everything is vectorised over the rows of a chunk, their heads and positions.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from attnscope.kernels.layer_ops_reference import rotate_ref as rotate
from attnscope.kernels.reference import gather_paged_kv

NUM_BINS = 16
MAX_TOP_K = 64
LOCAL_BINS = slice(0, 3)
MID_BINS = slice(3, 8)
LONG_BINS = slice(8, NUM_BINS)
FINGERPRINT_DIM = 4 + NUM_BINS  # local, mid, long, entropy_norm, then the histogram


@dataclass
class CaptureRequest:
    """Captured rows of one layer: one query token each, over its sequence's paged keys.

    ``q`` ``[R, Hq, D]`` holds the queries as the attention saw them (un-rotated when
    ``rope_cos``/``rope_sin`` are given); ``block_tables`` ``[R, max_blocks]`` int32 the
    row's sequence's block table; ``query_pos`` ``[R]`` int32 the logical position ``P``
    of the query, which attends to cache positions ``0..P``; ``head_weights`` ``[R, Hq]``
    float32 ``1/|H|`` for the selected heads and 0 otherwise (on a tensor-parallel rank
    still ``1/|H_total|``, so the ranks' weighted sums add up to head means);
    ``mask_prefix`` ``[R]`` int32 removes positions below it (leaving ``U``); ``window``
    ``[R]`` int32 restricts top-k candidates to ``j > P - window`` when positive;
    ``sink_tokens`` ``[R]`` int32 makes positions of ``U`` below it sinks. ``top_k`` and
    ``head_top_k`` (0 = skip, at most ``MAX_TOP_K``) size the head-mean and per-head
    top-k. ``rope_cos``/``rope_sin`` ``[max_pos, D]`` (as ``RotaryEmbedding.cos``/``.sin``)
    turn on de-rotation: every key is rotated back by its own position. ``statistics``
    False skips the distance histogram, entropy and sink mass (returned as zeros): raw
    top-k reports none of them, and they are most of Pass A's own work.
    """

    q: torch.Tensor
    block_tables: torch.Tensor
    query_pos: torch.Tensor
    head_weights: torch.Tensor
    mask_prefix: torch.Tensor
    window: torch.Tensor
    sink_tokens: torch.Tensor
    top_k: int = 0
    head_top_k: int = 0
    rope_cos: torch.Tensor | None = None
    rope_sin: torch.Tensor | None = None
    statistics: bool = True

    def row_slice(self, rows: slice) -> CaptureRequest:
        """The same request for ``rows`` of its rows only (views, no copy)."""
        return replace(self, q=self.q[rows], block_tables=self.block_tables[rows], query_pos=self.query_pos[rows],
                       head_weights=self.head_weights[rows], mask_prefix=self.mask_prefix[rows],
                       window=self.window[rows], sink_tokens=self.sink_tokens[rows])


@dataclass
class CaptureResult:
    """Capture outputs per row; head sums are weighted by ``head_weights``.

    ``lse`` ``[R, Hq]`` per-head logsumexp over ``U`` (every head; ``-inf`` when ``U`` is
    empty); ``hist`` ``[R, 16]``, ``entropy`` ``[R]`` (nats) and ``sink_mass`` ``[R]``
    the weighted sums of the per-head distance histograms, entropies over ``C`` and sink
    masses; ``num_stat_positions`` ``[R]`` int32 ``|C|``. ``topk_pos``/``topk_prob``
    ``[R, top_k]`` (int32 / float32, ``-1`` / 0 padded when ``|W| < top_k``) rank ``W``
    by ``p̄`` descending, then position ascending; ``head_topk_pos``/``head_topk_logit``
    ``[R, Hq, head_top_k]`` (``-1`` / ``-inf`` padded) rank ``W`` by each head's logit
    the same way, for every head. Positions are cache (logical) positions ``j``; the
    top-k fields are ``None`` when their ``k`` is 0. ``recomputed_tiles`` ``[R]`` int32:
    how many key tiles the Triton head-mean top-k re-read per row (``None`` from the
    reference, when ``top_k`` is 0, and when it read the logits Pass A stored instead).
    """

    lse: torch.Tensor
    hist: torch.Tensor
    entropy: torch.Tensor
    sink_mass: torch.Tensor
    num_stat_positions: torch.Tensor
    topk_pos: torch.Tensor | None
    topk_prob: torch.Tensor | None
    head_topk_pos: torch.Tensor | None
    head_topk_logit: torch.Tensor | None
    recomputed_tiles: torch.Tensor | None = None

    @staticmethod
    def concat(parts: list[CaptureResult]) -> CaptureResult:
        """The results of consecutive row slices of one request as one result over all their rows (a field
        missing from any part is missing from the whole; a single part is returned as it is)."""
        if len(parts) == 1:
            return parts[0]
        columns = [[getattr(part, f.name) for part in parts] for f in fields(CaptureResult)]
        return CaptureResult(*(None if any(v is None for v in values) else torch.cat(values) for values in columns))


def distance_bin(d: torch.Tensor) -> torch.Tensor:
    """log2 distance bin (int64) of ``d >= 0``: 0 for ``[0, 2)``, ``b`` for ``[2^b, 2^(b+1))``, 15 from 32768.

    Bins by ``floor(log2 d)`` so nearby and far context land in distinguishable buckets
    with a fixed size of 16, whatever the sequence length.
    """
    edges = 2 ** torch.arange(1, NUM_BINS, device=d.device)
    return torch.bucketize(d, edges.to(d.dtype), right=True)


def capture_rows_ref(
    k_cache: torch.Tensor, req: CaptureRequest, scale: float, rows_per_chunk: int = 16
) -> CaptureResult:
    """Exact float32 capture of every row of ``req`` from the paged ``k_cache`` ``[blocks, block_size, Hkv, D]``.

    Materialises the full attention rows ``rows_per_chunk`` rows at a time (padded to
    the chunk's longest row and masked), so memory stays ``O(rows_per_chunk × Hq × T)``
    rather than growing with the number of rows; query head ``h`` reads KV head
    ``h // (Hq // Hkv)``. Outputs live on ``k_cache``'s device.
    """
    _validate(k_cache, req, rows_per_chunk)
    num_rows, num_heads, _ = req.q.shape
    result = _empty_result(num_rows, num_heads, req, k_cache.device)
    for start in range(0, num_rows, rows_per_chunk):
        _capture_chunk(k_cache, req, slice(start, min(start + rows_per_chunk, num_rows)), scale, result)
    return result


@dataclass
class PartialCapture:
    """One tensor-parallel rank's share of a capture: summed over the ranks it is the capture of all heads.

    ``stats`` covers the rank's query heads (top-k fields ``None``): ``lse`` per local head;
    ``hist``, ``entropy`` and ``sink_mass`` are sums weighted by the *global* head weights,
    so they add across ranks. ``p_bar`` ``[R, max_blocks * block_size]`` is the rank's
    ``Σ_h w_h p_h[j]`` over ``W`` (``-inf`` outside ``W``, on every rank alike), ``None``
    without top-k. ``finish_partial`` ranks the sum.
    """

    stats: CaptureResult
    p_bar: torch.Tensor | None

    @staticmethod
    def concat(parts: list[PartialCapture]) -> PartialCapture:
        """The partials of consecutive row slices of one request as one partial over all their rows (a single
        part is returned as it is)."""
        if len(parts) == 1:
            return parts[0]
        p_bars = [part.p_bar for part in parts]
        return PartialCapture(CaptureResult.concat([part.stats for part in parts]),
                              None if any(p is None for p in p_bars) else torch.cat(p_bars))


def partial_capture_ref(k_cache: torch.Tensor, req: CaptureRequest, scale: float,
                        rows_per_chunk: int = 16) -> PartialCapture:
    """A rank's ``PartialCapture`` of ``req`` (``req.q`` and ``req.head_weights`` hold the rank's heads only)."""
    stats = capture_rows_ref(k_cache, replace(req, top_k=0, head_top_k=0), scale, rows_per_chunk)
    return PartialCapture(stats, _mean_probs(k_cache, req, scale, rows_per_chunk) if req.top_k else None)


def finish_partial(summed: PartialCapture, top_k: int) -> CaptureResult:
    """The capture of all heads from the sum of the ranks' partials (``summed.stats.lse`` already holds
    every head): head sums as they are, ``p̄`` ranked like ``capture_rows_ref`` (value descending,
    then position)."""
    result = replace(summed.stats, topk_pos=None, topk_prob=None, head_topk_pos=None, head_topk_logit=None,
                     recomputed_tiles=None)
    if top_k:
        p_bar = summed.p_bar
        result.topk_pos, result.topk_prob = _rank_top_k(p_bar, torch.isfinite(p_bar).sum(dim=-1), top_k, 0.0)
    return result


def _mean_probs(k_cache: torch.Tensor, req: CaptureRequest, scale: float, rows_per_chunk: int) -> torch.Tensor:
    """Dense ``p̄`` ``[R, max_blocks * block_size]`` over each row's ``W`` (``-inf`` elsewhere), ``rows_per_chunk``
    rows at a time."""
    num_rows = req.q.shape[0]
    device = k_cache.device
    width = req.block_tables.shape[1] * k_cache.shape[1]
    out = torch.full((num_rows, width), float("-inf"), dtype=torch.float32, device=device)
    for start in range(0, num_rows, rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, num_rows))
        chunk = _chunk_rows(k_cache, req, rows, scale)
        _, probs = _masked_softmax(chunk.logits, chunk.unmasked)
        weights = req.head_weights[rows].to(device=device, dtype=torch.float32)[:, :, None]
        mean_probs = (weights * probs).sum(dim=1).masked_fill(~chunk.candidates, float("-inf"))
        out[rows, : mean_probs.shape[1]] = mean_probs
    return out


def entropy_norm(entropy: torch.Tensor, num_stat_positions: torch.Tensor) -> torch.Tensor:
    """``entropy / ln |C|`` (0 when ``|C| <= 1``): how spread the attention is, in [0, 1] whatever the length."""
    count = num_stat_positions.to(entropy.dtype)
    normalised = entropy / torch.log(count.clamp(min=2.0))
    return torch.where(count > 1, normalised, torch.zeros_like(normalised))


def fingerprint_v1(hist: torch.Tensor, entropy: torch.Tensor, num_stat_positions: torch.Tensor) -> torch.Tensor:
    """Fingerprint v1 ``[R, 20]``: ``[local, mid, long, entropy_norm, hist[0..15]]``.

    ``local``/``mid``/``long`` are the histogram mass at distances ``< 8``, ``8..255``
    and ``>= 256`` (bins 0..2, 3..7, 8..15): a fixed-size summary of where a layer looks.
    """
    bands = [hist[:, band].sum(dim=-1, keepdim=True) for band in (LOCAL_BINS, MID_BINS, LONG_BINS)]
    return torch.cat([*bands, entropy_norm(entropy, num_stat_positions)[:, None], hist], dim=-1)


def _validate(k_cache: torch.Tensor, req: CaptureRequest, rows_per_chunk: int) -> None:
    """Reject shapes and options the capture kernels do not support, with a readable message."""
    num_heads, num_kv_heads = req.q.shape[1], k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"Hq={num_heads} is not a multiple of Hkv={num_kv_heads}")
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be >= 1, got {rows_per_chunk}")
    for name, k in (("top_k", req.top_k), ("head_top_k", req.head_top_k)):
        if not 0 <= k <= MAX_TOP_K:
            raise ValueError(f"{name}={k} is outside [0, {MAX_TOP_K}]")
    if (req.rope_cos is None) != (req.rope_sin is None):
        raise ValueError("rope_cos and rope_sin must be given together")
    if req.rope_cos is not None and req.q.shape[0] > 0:
        needed = int(req.query_pos.max()) + 1
        if req.rope_cos.shape[0] < needed or req.rope_sin.shape[0] < needed:
            raise ValueError(f"rope tables cover fewer than the {needed} positions attended")


def _empty_result(num_rows: int, num_heads: int, req: CaptureRequest, device: torch.device) -> CaptureResult:
    """Output tensors for all rows, filled chunk by chunk."""
    f32 = {"dtype": torch.float32, "device": device}
    i32 = {"dtype": torch.int32, "device": device}
    return CaptureResult(
        lse=torch.empty((num_rows, num_heads), **f32),
        hist=torch.empty((num_rows, NUM_BINS), **f32),
        entropy=torch.empty((num_rows,), **f32),
        sink_mass=torch.empty((num_rows,), **f32),
        num_stat_positions=torch.empty((num_rows,), **i32),
        topk_pos=torch.empty((num_rows, req.top_k), **i32) if req.top_k else None,
        topk_prob=torch.empty((num_rows, req.top_k), **f32) if req.top_k else None,
        head_topk_pos=torch.empty((num_rows, num_heads, req.head_top_k), **i32) if req.head_top_k else None,
        head_topk_logit=torch.empty((num_rows, num_heads, req.head_top_k), **f32) if req.head_top_k else None,
    )


def paged_logits(q: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor, width: int, scale: float,
                 rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Float32 logits ``[r, Hq, width]`` of queries ``[r, Hq, D]`` against the first ``width`` positions of their
    block tables' keys; with ``rope`` (the ``(cos, sin)`` tables) on keys rotated back by their own positions."""
    device = k_cache.device
    q = q.to(device=device, dtype=torch.float32)
    num_rows, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    keys = gather_paged_kv(k_cache, block_tables.to(device), width).float()  # [r, T, Hkv, D]
    if rope is not None:
        cos, sin = (table[:width].to(device=device, dtype=torch.float32)[None, :, None, :] for table in rope)
        keys = rotate(keys, cos, -sin)
    q_groups = q.reshape(num_rows, num_kv_heads, num_heads // num_kv_heads, head_dim)
    logits = torch.matmul(q_groups, keys.permute(0, 2, 3, 1)) * scale  # [r, Hkv, G, T]
    return logits.reshape(num_rows, num_heads, width)


def _chunk_logits(k_cache: torch.Tensor, req: CaptureRequest, rows: slice, scale: float, width: int) -> torch.Tensor:
    """Float32 logits ``[r, Hq, width]`` of the chunk's queries against their first ``width`` cache positions."""
    rope = (req.rope_cos, req.rope_sin) if req.rope_cos is not None else None
    return paged_logits(req.q[rows], k_cache, req.block_tables[rows], width, scale, rope)


def _masked_softmax(logits: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logsumexp ``[r, Hq]`` and probabilities ``[r, Hq, T]`` of ``logits`` over the positions ``keep`` ``[r, T]``.

    Positions outside ``keep`` get probability 0 (even if their logits are NaN); a row
    with nothing kept gets ``lse = -inf`` and all-zero probabilities.
    """
    masked = logits.masked_fill(~keep[:, None, :], float("-inf"))
    lse = torch.logsumexp(masked, dim=-1)
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return lse, torch.exp(masked - finite_lse[..., None])


def _rank_top_k(
    values: torch.Tensor, count: torch.Tensor, k: int, fill: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest of ``values`` ``[..., T]`` by value descending, then position ascending.

    ``values`` must be ``-inf`` outside the candidates and ``count`` ``[...]`` is the
    number of candidates; ranks past it come back as position ``-1`` and value ``fill``.
    Linear in ``T``: ``topk`` finds the k-th value, every larger value is taken, the
    lowest positions tied with it fill the rest, and only those ``k`` are sorted
    (stably, from ascending positions), so ties resolve deterministically.
    """
    width = values.shape[-1]
    kept = min(k, width)
    kth = torch.topk(values, kept, dim=-1).values[..., -1:]
    above = values > kth
    tied = values == kth
    tied_needed = kept - above.sum(dim=-1, keepdim=True)
    chosen = above | (tied & (tied.cumsum(dim=-1) <= tied_needed))
    positions = chosen.nonzero()[:, -1].view(*values.shape[:-1], kept)  # ascending within each row
    chosen_values, order = torch.sort(values.gather(-1, positions), dim=-1, descending=True, stable=True)
    positions = positions.gather(-1, order)
    if kept < k:
        positions = torch.nn.functional.pad(positions, (0, k - kept), value=-1)
        chosen_values = torch.nn.functional.pad(chosen_values, (0, k - kept), value=fill)
    valid = torch.arange(k, device=values.device) < count[..., None]
    positions = torch.where(valid, positions, torch.full_like(positions, -1))
    chosen_values = torch.where(valid, chosen_values, torch.full_like(chosen_values, fill))
    return positions.to(torch.int32), chosen_values


@dataclass
class _ChunkRows:
    """A chunk of rows' logits over their first ``width`` positions and the row sets ``U`` and ``W`` as masks."""

    logits: torch.Tensor  # [r, Hq, width]
    query_pos: torch.Tensor  # [r, 1]
    pos: torch.Tensor  # [1, width]
    unmasked: torch.Tensor  # U: [r, width]
    candidates: torch.Tensor  # W: [r, width]


def _chunk_rows(k_cache: torch.Tensor, req: CaptureRequest, rows: slice, scale: float) -> _ChunkRows:
    """Logits and the ``U``/``W`` masks of the rows ``rows`` of ``req``, up to the chunk's longest row."""
    device = k_cache.device
    query_pos = req.query_pos[rows].to(device=device, dtype=torch.int64)[:, None]
    width = int(query_pos.max()) + 1
    logits = _chunk_logits(k_cache, req, rows, scale, width)
    pos = torch.arange(width, device=device)[None, :]
    window = req.window[rows].to(device=device, dtype=torch.int64)[:, None]
    unmasked = (pos <= query_pos) & (pos >= req.mask_prefix[rows].to(device)[:, None])
    candidates = unmasked & ((window == 0) | (pos > query_pos - window))
    return _ChunkRows(logits, query_pos, pos, unmasked, candidates)


def _capture_chunk(
    k_cache: torch.Tensor, req: CaptureRequest, rows: slice, scale: float, out: CaptureResult
) -> None:
    """Capture the rows ``rows`` of ``req`` into their slices of ``out``."""
    device = k_cache.device
    chunk = _chunk_rows(k_cache, req, rows, scale)
    logits, query_pos, pos, unmasked, candidates = (chunk.logits, chunk.query_pos, chunk.pos, chunk.unmasked,
                                                    chunk.candidates)
    sinks = unmasked & (pos < req.sink_tokens[rows].to(device)[:, None])
    stats = unmasked & ~sinks
    weights = req.head_weights[rows].to(device=device, dtype=torch.float32)[:, :, None]

    lse, probs = _masked_softmax(logits, unmasked)
    mean_probs = (weights * probs).sum(dim=1)  # p̄ [r, T]
    out.lse[rows] = lse
    out.num_stat_positions[rows] = stats.sum(dim=-1).to(torch.int32)
    if req.statistics:
        lse_stats, stat_probs = _masked_softmax(logits, stats)
        per_head_entropy = torch.where(
            stats[:, None, :], stat_probs * (lse_stats[..., None] - logits), torch.zeros_like(stat_probs)
        ).sum(dim=-1)
        bins = distance_bin((query_pos - pos).clamp(min=0))
        hist = torch.zeros((logits.shape[0], NUM_BINS), dtype=torch.float32, device=device)
        hist.scatter_add_(1, bins, (weights * stat_probs).sum(dim=1))
        out.hist[rows] = hist
        out.entropy[rows] = (weights[..., 0] * per_head_entropy).sum(dim=-1)
        out.sink_mass[rows] = torch.where(sinks, mean_probs, torch.zeros_like(mean_probs)).sum(dim=-1)
    else:
        out.hist[rows] = 0.0
        out.entropy[rows] = 0.0
        out.sink_mass[rows] = 0.0
    num_candidates = candidates.sum(dim=-1)
    if req.top_k:
        pbar = mean_probs.masked_fill(~candidates, float("-inf"))
        out.topk_pos[rows], out.topk_prob[rows] = _rank_top_k(pbar, num_candidates, req.top_k, 0.0)
    if req.head_top_k:
        head_logits = logits.masked_fill(~candidates[:, None, :], float("-inf"))
        out.head_topk_pos[rows], out.head_topk_logit[rows] = _rank_top_k(
            head_logits, num_candidates[:, None].expand(-1, logits.shape[1]), req.head_top_k, float("-inf")
        )
