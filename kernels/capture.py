"""Triton attention capture: exact per-row statistics and top-k, fused into decode attention.

Definitions are in ``docs/capture.md``; ``attnscope.kernels.capture_reference`` is the float32
torch twin with the same API. Two passes over the keys, both split-K over positions:

* Pass A (grid ``(rows, Hkv, splits)``) streams its split's key tiles through an online
  softmax per query head with a running max ``m`` and keeps, rescaled like the attention's
  own sums: ``l_U``, ``l_S`` (sinks), ``l_C``, ``e_C = sum_C e^(s-m) (s-m)`` and the
  16-bin distance histogram of ``e^(s-m)`` over ``C`` (only ``l_U`` when the request's
  ``statistics`` is off, as for raw top-k), plus (``head_top_k > 0``) an exact per-head
  running top-k of the logits over ``W``. :func:`paged_decode_attention_capture`
  runs Pass A inside the decode attention kernel (same logits, same running max, one read
  of ``K``); :func:`attention_capture` runs it standalone over ``U`` only (used for
  de-rotated logits, which differ from the attention's). One finish launch
  (:func:`_capture_finish_kernel`) then merges the splits per head into ``lse_U``,
  ``H_h = log l_C - e_C / l_C``, ``hist_h = hist_C / l_C`` and ``l_S / l_U`` and sums them
  with the head weights (the last head group of a row to finish, counted by an atomic ticket),
  merges the decode attention's own splits, and runs Pass B from stored logits.
* Pass B (only when ``top_k > 0``) needs every head's final ``lse_U``. When the captured
  rows' logits fit ``LOGIT_STORE_MAX_BYTES``, Pass A stores them and the finish launch
  streams them into a dense ``p̄ = sum_h w_h exp(s_h[j] - lse_h)`` per row (each block
  merging the ``lse`` it needs from the split partials), whose exact top-k the last block
  of each chunk finds without sorting (:func:`_select_topk`); the chunks' lists merge into
  the row's top-k in the row's last chunk (:func:`_fold_lists`) or, in a launch of one row, up a
  binary tree as the chunks finish (:func:`_climb_tree`). Otherwise Pass A records each head's largest logit
  per key tile (tiles aligned to multiples of ``TILE_N``); with ``lse`` they bound ``p̄``
  per tile from above and below, and only the tiles whose upper bound reaches a floor
  under the ``k``-th value are re-read (see :func:`_mean_topk`), each by one program
  summing ``p̄`` over all KV groups in a fixed order and keeping its chunk's top-k keys,
  merged into the exact top-k.

Top-k are exact: each (value, position) is packed into one int64 key that sorts like
(value descending, position ascending) -- the float32 bits made order-preserving in the high
word, ``2^31 - 1 - position`` in the low word. The per-head running top-k of Pass A keeps a
program's ``TOPK_SLOTS`` best keys sorted descending; a tile is merged by a bitonic sort of the
tile (ascending), the elementwise max with the running best (a bitonic sequence holding exactly
the top ``TOPK_SLOTS`` of the union) and one bitonic merge. The compare-exchanges are
``tl.min``/``tl.max`` over the axes of a ``[2, 2, ...]`` view, which also keeps the Triton
interpreter fast (its ``tl.sort`` reduces with a Python-level xor). Pass A's per-head top-k
merges candidates in batches: keys above a head's k-th at the last merge are appended to a
64-key buffer (the program's own output slots) and merged when the next tile would overflow it,
and at the end. Pass B's key-tile recompute merges a tile unless no key beats the running k-th.
Per-split candidates are merged by a small kernel the same way,
exact since the union of per-split top-k holds the global top-k. Pass B's chunk keys are
merged the same way (lists with nothing above the running k-th are skipped unread).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from attnscope.kernels.capture_reference import MAX_TOP_K, NUM_BINS, CaptureRequest, CaptureResult, PartialCapture
from attnscope.kernels.paged_decode import (
    MIN_DOT_ROWS,
    SPLIT_COMBINE_NUM_WARPS,
    _check_inputs,
    _combine_split_row,
    _num_sms,
    _tile_tokens,
    combine_splits,
    default_num_splits,
    paged_decode_attention,
)

TOPK_SLOTS = 64  # running top-k width of every program (>= MAX_TOP_K, >= the key tile width)
STAT_WIDTH = 21  # per (row, head, split) partial: hist at 0..15, then m, l_U, l_S, l_C, e_C at 16..20
MAX_TILES_PER_PROGRAM = 128  # Pass B: key tiles one program may re-read
BOUNDS_BLOCK = 64  # Pass B: tiles per program of the bounds kernel (all heads at once)
BOUNDS_NUM_WARPS = 4
FLOOR_MIN_TILES_PER_K = 4  # Pass B: seek a floor (round 1) only when there are more tiles than this times k
# Launch widths. Registers per thread on sm_90 (Triton 3.6 ptxas, bf16, D=128, group 4, tile 64,
# strides specialised like at run time): plain decode kernel 113 at 4 warps (4 CTAs/SM); fused
# kernel without per-head top-k 167 at 4 warps, 128 and no spills with maxnreg=128 -- the plain
# kernel's 4 CTAs of 4 warps per SM, so uncaptured rows run at the plain kernel's occupancy; with
# per-head top-k (candidates buffered) 220-228 at 4 warps (183-200 at 8), no spills. Capped at 128 it
# spills 42-56 values: on an H100 (Llama-8B attention, per-head top-8 and top-32 with the statistics)
# the cap made batch 1 slower (1 x 32K 1.60 -> 2.13x the plain kernel, 1 x 2K 2.46 -> 2.76x) and
# 8 x 32K faster (2.32 -> 1.81x), others within 4 %; 8 warps were slower than 4 from batch 8. So the
# cap is lifted only for a launch that fits one wave at 2 programs per SM, as batch 1's do. Pass B
# with ROPE (float32 de-rotated keys, IEEE dots) spilled at 4 warps and not at 8. The merge and
# combine kernels are latency-bound single-row loops: one warp each (measured on an H200, no slower
# than 2 or 4).
# The finish launch runs at the plain decode combine's SPLIT_COMBINE_NUM_WARPS (8), so a captured
# layer's attention merges its splits bit-equal to an uncaptured one's.
FUSED_NUM_WARPS = 4
FUSED_MAXNREG = 128
HEAD_TOPK_UNCAPPED_PROGRAMS_PER_SM = 2
# Software-pipeline depth of the fused kernel's tile loop (Triton's default is 3). Without the
# statistics (raw top-k) 2 stages were faster at every measured shape on an H100 (Llama-8B
# attention, head-mean top-32: 32 x 8K 449.7 -> 437.9 us, 8 x 32K 458.7 -> 444.1, 32 x 32K 1700 ->
# 1672, 1 x 2K 20.1 -> 18.9; Llama-1B 32 x 8K unchanged) and on an H200; with the statistics the
# two were within noise except 8 x 32K with top-32, where 2 stages lost 3 %.
FUSED_NUM_STAGES = 3
FUSED_NO_STATS_NUM_STAGES = 2
PASS_A_NUM_WARPS = 4
PASS_B_NUM_WARPS = 4
PASS_B_PROGRAMS_PER_SM = 16  # measured on an H200: 4 -> 16 cut the flat-key Pass B by up to 6 %
MERGE_NUM_WARPS = 1
MERGE_FAN_IN = 16  # top-k lists one merge program folds in; more lists take a first merge level
HEAD_STATS = 18  # per (row, head) after the combine: weighted entropy, sink mass, then 16 histogram bins
PASS_B_ROPE_NUM_WARPS = 8
# After Pass A one launch finishes a capture (_capture_finish_kernel): the combine, and Pass B from
# stored logits as one program per row and block of DENSE_BLOCK positions (fewer with many heads: at
# most DENSE_LOAD_ELEMENTS logits per load) writing dense p̄; the last block of a chunk of DENSE_CHUNK
# positions ranks the chunk exactly by DENSE_TOPK_RADIX_BITS-bit counting rounds, and the chunks' lists
# merge in LOG_DENSE_MAX_LISTS levels (see MERGE_TREE_MAX_ROWS). Rows wider than
# DENSE_MAX_LISTS chunks take wider chunks, up to DENSE_MAX_CHUNK; wider rows re-read keys.
# Measured on an H100 with separate kernels (32 heads;
# 32 x 8K, 8 x 32K, 1 x 128K, 1 x 2K): the counting rounds are latency-bound (1 x 2K took ~10 us
# whatever the chunk); 2-bit digits (16 rounds) beat 1-bit ones by 2-2.5 us and 3- or 4-bit ones by
# up to 1 us; chunks of 2048 at 8 warps were fastest or within 0.3 us. One program per chunk that
# also computed the chunk's p̄ (instead of blocks in parallel) was 1.3-2x slower end to end. With the
# merge tree, per kernel on an H100 (32 rows x 8K at 32 heads of 64 dimensions; 1 x 2K and 1 x 32K at
# 128): the finish took 36.9 / 8.1 / 19.7 us, of which ranking and merging 8.8 / 3.2 / 11.9 (the rest
# is dense p̄ from the stored logits: 33.5 MB at 32 x 8K); blocks of 128 or 512 positions made it
# 17-18 us slower at 32 x 8K; chunks of 1024 3 us faster there but 1-7 us slower at batch 1, chunks
# of 4096 slower everywhere.
DENSE_BLOCK = 256
DENSE_CHUNK = 2048
LOG_DENSE_MAX_LISTS = 5
DENSE_MAX_LISTS = 1 << LOG_DENSE_MAX_LISTS
DENSE_MAX_CHUNK = 8192
DENSE_TOPK_MAX_WIDTH = DENSE_MAX_LISTS * DENSE_MAX_CHUNK  # widest row dense_topk ranks
DENSE_LOAD_ELEMENTS = 16384
DENSE_TOPK_NUM_WARPS = 8
DENSE_TOPK_RADIX_BITS = 2
# Registers of the finish launch with stored logits (8 warps): ~128-185 uncapped, so 1-2 programs per SM
# stream the logits. Capped at FINISH_WIDE_MAXNREG (3 programs per SM, a few bytes spilled in the
# ranking) when there are at least FINISH_WIDE_BLOCKS_PER_SM dense blocks per SM. Measured on an
# H100 (head-mean top-32 without statistics): 1B attention 32 x 8K 257.3 -> 251.5 us, 8B 32 x 8K 437.6
# -> 432.1, 1 x 128K 264.5 -> 258.3 (kernel timings; in the engine at 1B 32 x 8K the finish launches of
# 4 captured layers took 136 us per step instead of 156); at 1 x 2K (8 blocks) the cap cost 1.1 us.
# A launch of at most MERGE_TREE_MAX_ROWS rows merges a row's chunk lists up a binary tree as the chunks
# finish (_climb_tree), larger ones in the row's last chunk (_fold_lists): measured on an H100 (Llama-8B
# attention, raw top-32, finish launch): the tree took 1 x 32K (16 lists) from 19.7 to 17.2 us and 1 x 128K
# (32 lists) from 65.1 to 55.9 us, but 32 x 8K (5 lists) from 30.6 to 31.9 us (1B heads: 32.5 to 33.3),
# where the other rows' work hides the last chunk's merge.
MERGE_TREE_MAX_ROWS = 1
FINISH_WIDE_MAXNREG = 80
FINISH_WIDE_BLOCKS_PER_SM = 2
# With more (row, head) pairs than SMs the finish merges each row's split partials HEAD_GROUP heads
# per program: as many heads as keep the [heads, 16 bins, splits] histogram partials within
# COMBINE_ELEMENTS (a whole row of 32 heads up to 8 splits), not one program per head. Measured on an
# H100 (engine, 1B shape, 32 x 8K, 4 captured layers): finish launches 23.7 -> 16.1 us per step with
# fingerprints, 136 -> 131 us with raw top-32; at batch 1 (one head per program kept) grouping was
# 0.5-1 us slower.
COMBINE_ELEMENTS = 4096
FINISH_TICKETS = 2 * DENSE_MAX_LISTS  # per capture row: the head sum, the merge tree's nodes, one per chunk
# Pass A stores the captured rows' logits for Pass B (instead of Pass B re-reading K) when the
# buffer [R, Hq, tiles * TILE_N] float32 fits in this many bytes (32 rows x 32 heads x 128K positions)
# and a row spans at most DENSE_MAX_LISTS * DENSE_MAX_CHUNK positions. The store is 1/32 of the
# bytes of K and V the attention reads at Hkv=8, D=128. Measured on an H100 (Llama-8B attention,
# flat keys): at 32 x 32K, 8 x 128K and 32 x 128K stored logits cost 1.16-1.22x the plain kernel
# where re-reading keys cost 1.68-1.78x (the 64 MiB budget before this sent those to the re-read).
LOGIT_STORE_MAX_BYTES = 512 << 20

# Triton compiles a kernel again for every new combination of its integer arguments being 1, a
# multiple of 16, or neither. The counts that follow the batch (rows, splits, blocks, chunks, k) and the
# strides that follow them are therefore not specialised: otherwise each new batch shape recompiled the
# finish launch (2-7 s on an H100 host) in the middle of serving. Strides along aligned axes (head dim,
# logit rows of whole key tiles) stay specialised, and so does the fused kernel's ROWS_PAD (the captured
# rows it compares at once, a power of two: ~1.5 s a variant to compile): looking its row up in a loop of
# fixed 64-row scans instead cost 1-2 % of raw top-32 at 8 x 32K and 32 x 8K (H100, paired runs).
FUSED_RUNTIME_INTS = ("num_splits", "head_top_k", "num_capture_rows", "stride_plb", "stride_plh", "stride_sr",
                      "stride_sh", "stride_tr", "stride_th")
SPLIT_RUNTIME_INTS = ("num_splits", "head_top_k", "stride_sr", "stride_sh", "stride_tr", "stride_th")
FINISH_RUNTIME_INTS = ("rows", "num_head_groups", "num_splits", "num_blocks", "num_chunks", "k", "row_period",
                       "merge_tree", "stride_sr", "stride_sh", "stride_or", "stride_plb", "stride_plh")
DENSE_TOPK_RUNTIME_INTS = ("width", "k", "num_chunks", "stride_pr", "stride_scr", "stride_or", "merge_tree")

SLOTS = tl.constexpr(TOPK_SLOTS)
TICKETS = tl.constexpr(FINISH_TICKETS)
STATS_PER_HEAD = tl.constexpr(HEAD_STATS)
LOG_SLOTS = tl.constexpr(6)
# Below every packed key of a non-NaN value: high word 0x80000001, low word 0.
EMPTY_KEY = tl.constexpr(-9223372032559808512)
assert TOPK_SLOTS == 2**LOG_SLOTS.value >= MAX_TOP_K and NUM_BINS == 16 and FINISH_TICKETS >= 2 + DENSE_MAX_LISTS


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _distance_bins(dist):
    """Histogram bin of distance ``d = P - j``: 0 below 2, else ``floor(log2 d)`` capped at 15.

    ``floor(log2 d)`` is the float32 exponent of ``d`` (exact below ``2^24``, beyond which
    the bin is 15 anyway).
    """
    as_float = tl.maximum(dist, 1).to(tl.float32)
    exponent = (as_float.to(tl.int32, bitcast=True) >> 23) - 127
    return tl.minimum(exponent, 15)


@triton.jit
def _pack_keys(values, positions, valid):
    """Pack float32 ``values`` and int32 ``positions`` into int64 keys (EMPTY_KEY where not ``valid``).

    Keys order like (value descending, position ascending) under a descending sort; -0.0
    packs as +0.0 so the two tie like in torch.
    """
    bits = tl.where(values == 0.0, 0.0, values).to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    keys = (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - positions).to(tl.int64)
    return tl.where(valid, keys, EMPTY_KEY)


@triton.jit
def _unpack_keys(keys):
    """Inverse of :func:`_pack_keys`: the float32 values and int32 positions of ``keys``."""
    ordered = (keys >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    positions = 0x7FFFFFFF - (keys & 0x7FFFFFFF).to(tl.int32)
    return bits.to(tl.float32, bitcast=True), positions


@triton.jit
def _kth_key(best, k, WIDTH: tl.constexpr):
    """The k-th best key per row of the sorted running top-k ``best`` ``[rows, WIDTH]``."""
    slots = tl.arange(0, WIDTH)
    return tl.max(tl.where(slots[None, :] == k - 1, best, EMPTY_KEY), axis=1)


@triton.jit
def _hypercube_bit(N_DIMS: tl.constexpr, AXIS: tl.constexpr):
    """Coordinate (0/1) along hypercube axis ``AXIS`` (0 = innermost) of a ``[2] * N_DIMS`` view."""
    bit = tl.arange(0, 2)
    for n in tl.static_range(N_DIMS):
        if n != N_DIMS - 1 - AXIS:
            bit = tl.expand_dims(bit, n)
    return bit


@triton.jit
def _bitonic_stage(h, N_DIMS: tl.constexpr, STAGE: tl.constexpr, ORDER: tl.constexpr):
    """Bitonic merge of the runs of ``2^STAGE`` keys of hypercube ``h``.

    ``ORDER``: 0 ascending, 1 descending, 2 alternating run by run (ascending first).
    Compare-exchange along axes ``STAGE - 1 .. 0`` with ``tl.min``/``tl.max`` of each pair.
    """
    if ORDER == 2:
        flip = _hypercube_bit(N_DIMS, STAGE)
    else:
        flip = ORDER
    for j in tl.static_range(STAGE):
        low = tl.min(h, axis=N_DIMS - STAGE + j, keep_dims=True)
        high = tl.max(h, axis=N_DIMS - STAGE + j, keep_dims=True)
        h = tl.where((_hypercube_bit(N_DIMS, STAGE - 1 - j) ^ flip) != 0, high, low)
    return h


@triton.jit
def _merge_topk(
    best, tile_keys, ROWS: tl.constexpr, LOG_ROWS: tl.constexpr, TILE: tl.constexpr
):
    """The ``SLOTS`` largest of ``best`` ``[ROWS, SLOTS]`` (sorted descending) and ``tile_keys``, sorted descending.

    Sorts the tile ascending (bitonic), then ``_merge_sorted``.
    """
    if TILE < SLOTS:  # pad the tile with empty keys up to SLOTS (TILE == SLOTS // 2)
        empty = tl.full([ROWS, TILE], EMPTY_KEY, tl.int64)
        tile_keys = tl.reshape(tl.join(tile_keys, empty), [ROWS, SLOTS])
    h = tl.reshape(tile_keys, [2] * (LOG_ROWS + LOG_SLOTS))
    for stage in tl.static_range(1, LOG_SLOTS + 1):
        h = _bitonic_stage(h, LOG_ROWS + LOG_SLOTS, stage, 2 if stage < LOG_SLOTS else 0)
    return _merge_sorted(best, tl.reshape(h, [ROWS, SLOTS]), ROWS, LOG_ROWS)


@triton.jit
def _merge_sorted(best, ascending, ROWS: tl.constexpr, LOG_ROWS: tl.constexpr):
    """The ``SLOTS`` largest of ``best`` (sorted descending) and ``ascending`` (sorted ascending), sorted descending.

    Their elementwise max is a bitonic sequence holding exactly the top ``SLOTS`` of the
    union; one bitonic merge sorts it.
    """
    h = tl.reshape(tl.maximum(best, ascending), [2] * (LOG_ROWS + LOG_SLOTS))
    h = _bitonic_stage(h, LOG_ROWS + LOG_SLOTS, LOG_SLOTS, 1)
    return tl.reshape(h, [ROWS, SLOTS])


@triton.jit
def _update_topk(best, tile_keys, k, ROWS: tl.constexpr, LOG_ROWS: tl.constexpr, TILE: tl.constexpr):
    """Merge ``tile_keys`` into ``best`` unless none of them beats a row's current k-th key."""
    kth = _kth_key(best, k, SLOTS)
    if tl.max(tl.max((tile_keys > kth[:, None]).to(tl.int32), axis=1), axis=0) > 0:
        best = _merge_topk(best, tile_keys, ROWS, LOG_ROWS, TILE)
    return best


@triton.jit
def _row_sets(row, query_pos_ptr, mask_prefix_ptr, window_ptr, sink_tokens_ptr):
    """Capture row bounds: ``P``, first position of ``U``, of ``W`` and of ``C`` (``U`` ends at ``P``)."""
    pos = tl.load(query_pos_ptr + row)
    u_lo = tl.maximum(tl.load(mask_prefix_ptr + row), 0)
    window = tl.load(window_ptr + row)
    w_lo = tl.where(window > 0, tl.maximum(u_lo, pos - window + 1), u_lo)
    c_lo = tl.maximum(u_lo, tl.load(sink_tokens_ptr + row))
    return pos, u_lo, w_lo, c_lo


@triton.jit
def _split_range(lo, hi, split, num_splits, TILE_N: tl.constexpr):
    """Positions ``[start, end)`` of split ``split`` when ``[lo, hi)`` is cut into whole tiles."""
    count = tl.maximum(hi - lo, 0)
    tiles_per_split = tl.cdiv(tl.cdiv(count, TILE_N), num_splits)
    start = lo + split * tiles_per_split * TILE_N
    end = tl.minimum(start + tiles_per_split * TILE_N, lo + count)
    return start, end


@triton.jit
def _load_query(q_ptr, row, heads, row_valid, stride_qr, stride_qh, HEAD_DIM: tl.constexpr, ROPE: tl.constexpr):
    """A KV group's queries: ``[GROUP_PAD, D]`` as stored, or float32 halves ``(q[:D/2], q[D/2:])`` for ROPE."""
    base = q_ptr + row * stride_qr + heads[:, None] * stride_qh
    if ROPE:
        half = tl.arange(0, HEAD_DIM // 2)
        q_a = tl.load(base + half[None, :], mask=row_valid[:, None], other=0.0).to(tl.float32)
        q_b = tl.load(base + HEAD_DIM // 2 + half[None, :], mask=row_valid[:, None], other=0.0).to(tl.float32)
    else:
        dims = tl.arange(0, HEAD_DIM)
        q_a = tl.load(base + dims[None, :], mask=row_valid[:, None], other=0.0)
        q_b = q_a
    return q_a, q_b


@triton.jit
def _key_logits(
    q_a,
    q_b,
    k_cache_ptr,
    k_rows,
    tokens,
    token_valid,
    cos_ptr,
    sin_ptr,
    stride_rope,
    scale,
    HEAD_DIM: tl.constexpr,
    ROPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Scaled logits ``[GROUP_PAD, TILE_N]`` of a key tile (``-inf`` past ``token_valid``).

    With ROPE each key is rotated back by its own position first (``k cos - rotate_half(k) sin``
    with float32 tables and an IEEE float32 dot, like the reference).
    """
    if ROPE:
        half = tl.arange(0, HEAD_DIM // 2)
        k_ptrs = k_cache_ptr + k_rows[:, None] + half[None, :]
        k_lo = tl.load(k_ptrs, mask=token_valid[:, None], other=0.0).to(tl.float32)
        k_hi = tl.load(k_ptrs + HEAD_DIM // 2, mask=token_valid[:, None], other=0.0).to(tl.float32)
        table = tokens[:, None] * stride_rope + half[None, :]
        cos_lo = tl.load(cos_ptr + table, mask=token_valid[:, None], other=0.0).to(tl.float32)
        cos_hi = tl.load(cos_ptr + table + HEAD_DIM // 2, mask=token_valid[:, None], other=0.0).to(tl.float32)
        sin_lo = tl.load(sin_ptr + table, mask=token_valid[:, None], other=0.0).to(tl.float32)
        sin_hi = tl.load(sin_ptr + table + HEAD_DIM // 2, mask=token_valid[:, None], other=0.0).to(tl.float32)
        key_lo = k_lo * cos_lo + k_hi * sin_lo
        key_hi = k_hi * cos_hi - k_lo * sin_hi
        logits = tl.dot(q_a, tl.trans(key_lo), input_precision="ieee")
        logits = tl.dot(q_b, tl.trans(key_hi), logits, input_precision="ieee")
    else:
        dims = tl.arange(0, HEAD_DIM)
        k = tl.load(k_cache_ptr + k_rows[:, None] + dims[None, :], mask=token_valid[:, None], other=0.0)
        logits = tl.dot(q_a, tl.trans(k), input_precision=DOT_PRECISION)
    return tl.where(token_valid[None, :], logits * scale, float("-inf"))


@triton.jit
def _attend_tile(
    q,
    m_i,
    l_i,
    acc,
    k_cache_ptr,
    v_cache_ptr,
    block_table_row,
    tokens,
    split_end,
    kv_head,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One key/value tile of the decode online softmax, as in ``_paged_decode_split_kernel``.

    Returns the new running max, sum and output accumulator, and for capture the tile's
    logits, their per-head maximum, ``shifted = logits - m_new``, ``p = exp(shifted)``, its
    row sums and the rescale ``alpha = exp(m_i - m_new)`` (values the uncaptured loop does
    not use are dead code).
    """
    token_valid = tokens < split_end
    physical_block = tl.load(block_table_row + tokens // BLOCK_SIZE, mask=token_valid, other=0).to(tl.int64)
    slot = tokens % BLOCK_SIZE
    k_rows = physical_block * stride_kb + slot * stride_kt + kv_head * stride_kh
    logits = _key_logits(
        q, q, k_cache_ptr, k_rows, tokens, token_valid, k_cache_ptr, k_cache_ptr, 0, scale,
        HEAD_DIM, False, DOT_PRECISION,
    )
    tile_max = tl.max(logits, axis=1)
    m_new = tl.maximum(m_i, tile_max)
    alpha = tl.exp(m_i - m_new)
    shifted = logits - m_new[:, None]
    p = tl.exp(shifted)
    p_sum = tl.sum(p, axis=1)
    l_i = l_i * alpha + p_sum
    v_rows = physical_block * stride_vb + slot * stride_vt + kv_head * stride_vh
    dims = tl.arange(0, HEAD_DIM)
    v = tl.load(v_cache_ptr + v_rows[:, None] + dims[None, :], mask=token_valid[:, None], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc, logits, tile_max, shifted, p, p_sum, alpha


@triton.jit
def _capture_tile(
    l_u,
    l_s,
    l_c,
    e_c,
    hist,
    shifted,
    p,
    p_sum,
    m_old,
    m_new,
    alpha,
    tile_start,
    tokens,
    split_end,
    pos,
    u_lo,
    c_lo,
    TILE_N: tl.constexpr,
    STATS: tl.constexpr,
):
    """Pass A statistics after one key tile, rescaled from running max ``m_old`` to ``m_new``.

    ``shifted = logits - m_new``, ``p = exp(shifted)``, ``p_sum`` its row sums, ``alpha =
    exp(m_old - m_new)``. ``e_c`` is kept relative to the running max, so its rescale adds
    ``(m_old - m_new) * l_c``. A tile wholly inside ``C`` (most tiles: past the mask prefix
    and the sinks, not the last partial tile) needs no masks: ``l_U`` and ``l_C`` grow by
    ``p_sum``. Only boundary tiles build the set masks (and the sink sum when they reach
    below ``c_lo``). The histogram loops over the bins the tile covers -- distance bins are
    monotone in position, so a tile at distance >= 2 TILE_N spans one or two -- and a
    one-bin tile adds its row sums with no per-key work. Measured on an H100 (fingerprint
    statistics in the fused kernel): these statistics are 1.7 of the 2.7 us the fused kernel
    adds at 1 x 2K and 11 of 12.5 us at 32 x 8K (Llama-1B heads), the histogram most of it; a
    lazy histogram (the current bin's mass as a running sum, the ``[heads, 16]`` array touched
    only when the bin changes) changed neither. Without ``STATS`` (raw top-k) only ``l_U``
    grows; the other statistics stay 0.
    """
    tile_last = tile_start + (TILE_N - 1)
    if STATS:
        shift = tl.where(l_c > 0.0, m_old - m_new, 0.0) * l_c
        l_s = l_s * alpha
        if (tile_start >= c_lo) & (tile_last <= pos) & (tile_last < split_end):  # every key valid and in C
            p_c = p
            c_sum = p_sum
            l_u = l_u * alpha + p_sum
            e_tile = tl.sum(p * shifted, axis=1)
        else:
            in_u = (tokens >= u_lo) & (tokens <= pos)
            in_c = in_u & (tokens >= c_lo)
            p_c = tl.where(in_c[None, :], p, 0.0)
            c_sum = tl.sum(p_c, axis=1)
            l_u = l_u * alpha + tl.sum(tl.where(in_u[None, :], p, 0.0), axis=1)
            e_tile = tl.sum(p_c * tl.where(in_c[None, :], shifted, 0.0), axis=1)
            if tile_start < c_lo:
                l_s += tl.sum(tl.where((in_u & (tokens < c_lo))[None, :], p, 0.0), axis=1)
        e_c = alpha * (e_c + shift) + e_tile
        l_c = l_c * alpha + c_sum
        cols = tl.arange(0, 16)
        hist = hist * alpha[:, None]
        bin_lo = _distance_bins(pos - tl.minimum(tile_last, pos))
        bin_hi = _distance_bins(pos - tile_start)
        if bin_lo == bin_hi:
            hist += tl.where(cols[None, :] == bin_lo, c_sum[:, None], 0.0)
        else:
            bins = _distance_bins(pos - tokens)
            for b in range(bin_lo, bin_hi + 1):
                bin_sum = tl.sum(tl.where(bins[None, :] == b, p_c, 0.0), axis=1)
                hist += tl.where(cols[None, :] == b, bin_sum[:, None], 0.0)
    elif (tile_start >= u_lo) & (tile_last <= pos) & (tile_last < split_end):
        l_u = l_u * alpha + p_sum
    else:
        l_u = l_u * alpha + tl.sum(tl.where(((tokens >= u_lo) & (tokens <= pos))[None, :], p, 0.0), axis=1)
    return l_u, l_s, l_c, e_c, hist


@triton.jit
def _head_topk_rows(head_keys_ptr, keys_base, kv_head, stride_kh, GROUP_SIZE: tl.constexpr, HEAD_ROWS: tl.constexpr):
    """Where a program's per-head keys live: its ``[HEAD_ROWS, SLOTS]`` slots of the split's head-key partials
    (the KV group's heads; rows past ``GROUP_SIZE`` are padding and never written) and which rows are real."""
    rows = tl.arange(0, HEAD_ROWS)
    return head_keys_ptr + keys_base + (kv_head * GROUP_SIZE + rows) * stride_kh, rows < GROUP_SIZE


@triton.jit
def _flush_head_candidates(best, count, key_rows, row_valid, head_top_k, HEAD_ROWS: tl.constexpr,
                           LOG_HEAD_ROWS: tl.constexpr):
    """Merge the ``count`` candidate keys buffered per head at ``key_rows`` into the running top-k ``best``.

    Returns the new ``best`` and its ``k``-th key per head (the threshold for later candidates).
    The barriers order the buffer's stores by other threads before the load, and the load before
    the buffer is written again.
    """
    slots = tl.arange(0, SLOTS)
    tl.debug_barrier()
    buffered = tl.load(key_rows[:, None] + slots[None, :], mask=row_valid[:, None] & (slots[None, :] < count[:, None]),
                       other=EMPTY_KEY, cache_modifier=".cg")
    tl.debug_barrier()
    best = _merge_topk(best, buffered, HEAD_ROWS, LOG_HEAD_ROWS, SLOTS)
    return best, _kth_key(best, head_top_k, SLOTS)


@triton.jit
def _head_topk_tile(
    best, kth, count, key_rows, row_valid, logits, tokens, pos, w_lo, head_top_k, GROUP_PAD: tl.constexpr,
    HEAD_ROWS: tl.constexpr, LOG_HEAD_ROWS: tl.constexpr, TILE_N: tl.constexpr,
):
    """Buffer a tile's per-head candidates over ``W`` for the running top-k ``best`` ``[HEAD_ROWS, SLOTS]``.

    A key is a candidate when it beats its head's ``kth`` (the ``k``-th key of ``best`` at the
    last merge: a key below it has ``k`` larger ones and cannot rank). Candidates are appended
    to the head's ``SLOTS``-key buffer at ``key_rows`` (``count`` used); a tile that would
    overflow a buffer first merges the buffers into ``best`` (:func:`_flush_head_candidates`),
    so a split merges a handful of times instead of once per tile that holds a candidate
    (simulated on flat keys, top-8 over 32 tiles: about 3 merges against 27). The group's
    heads are the first ``HEAD_ROWS`` of the dot's ``GROUP_PAD`` rows; the padding rows are
    dropped first.
    """
    if HEAD_ROWS < GROUP_PAD:
        blocks = tl.arange(0, GROUP_PAD // HEAD_ROWS)[:, None, None]
        stacked = tl.reshape(logits, [GROUP_PAD // HEAD_ROWS, HEAD_ROWS, TILE_N])
        logits = tl.max(tl.where(blocks == 0, stacked, float("-inf")), axis=0)
    in_w = (tokens >= w_lo) & (tokens <= pos)  # w_lo >= u_lo
    keys = _pack_keys(logits, tokens[None, :], in_w[None, :])
    hits = (keys > kth[:, None]) & row_valid[:, None]
    found = tl.sum(hits.to(tl.int32), axis=1)
    if tl.max(found, axis=0) > 0:
        if tl.max(count + found, axis=0) > SLOTS:
            best, kth = _flush_head_candidates(best, count, key_rows, row_valid, head_top_k, HEAD_ROWS, LOG_HEAD_ROWS)
            count = tl.zeros_like(count)
            hits = (keys > kth[:, None]) & row_valid[:, None]
            found = tl.sum(hits.to(tl.int32), axis=1)
        slot = count[:, None] + tl.cumsum(hits.to(tl.int32), axis=1) - 1
        tl.store(key_rows[:, None] + slot, keys, mask=hits)
        count += found
    return best, kth, count


@triton.jit
def _store_head_keys(best, count, key_rows, row_valid, head_top_k, HEAD_ROWS: tl.constexpr,
                     LOG_HEAD_ROWS: tl.constexpr):
    """Merge a program's last buffered candidates and write its per-head top ``SLOTS`` keys over the buffer."""
    if tl.max(count, axis=0) > 0:
        best, _ = _flush_head_candidates(best, count, key_rows, row_valid, head_top_k, HEAD_ROWS, LOG_HEAD_ROWS)
    slots = tl.arange(0, SLOTS)
    tl.store(key_rows[:, None] + slots[None, :], best, mask=row_valid[:, None])


@triton.jit
def _store_capture_split(stats_ptr, stats_base, heads, row_valid, m, l_u, l_s, l_c, e_c, hist, stride_sh, stride_sf):
    """Write one split's Pass A partials for a KV group's heads (statistic ``f`` at ``f * stride_sf``)."""
    stat_rows = stats_ptr + stats_base + heads * stride_sh
    bins = tl.arange(0, 16)
    tl.store(stat_rows[:, None] + bins[None, :] * stride_sf, hist, mask=row_valid[:, None])
    tl.store(stat_rows + 16 * stride_sf, m, mask=row_valid)
    tl.store(stat_rows + 17 * stride_sf, l_u, mask=row_valid)
    tl.store(stat_rows + 18 * stride_sf, l_s, mask=row_valid)
    tl.store(stat_rows + 19 * stride_sf, l_c, mask=row_valid)
    tl.store(stat_rows + 20 * stride_sf, e_c, mask=row_valid)


@triton.jit
def _store_tile_max(tile_max_ptr, row_base, heads, row_valid, tile_start, tile_max, stride_th, TILE_N: tl.constexpr):
    """Record each head's largest logit of the key tile starting at ``tile_start`` (a multiple of ``TILE_N``)."""
    tl.store(tile_max_ptr + row_base + heads * stride_th + tile_start // TILE_N, tile_max, mask=row_valid)


@triton.jit
def _store_logits(logits_ptr, row_base, heads, row_valid, tokens, logits, stride_lh):
    """Keep a tile's logits ``[GROUP_PAD, TILE_N]`` for Pass B (positions past the split hold ``-inf``)."""
    tl.store(logits_ptr + row_base + heads[:, None] * stride_lh + tokens[None, :], logits, mask=row_valid[:, None])


# ----------------------------------------------------------------------------- Pass A kernels


@triton.jit
def _zero_tickets(tickets_ptr, row):
    """Zero capture row ``row``'s ``FINISH_TICKETS`` finish tickets (Pass A runs before the finish launch)."""
    tl.store(tickets_ptr + row * TICKETS + tl.arange(0, TICKETS), tl.zeros([TICKETS], dtype=tl.int32))


@triton.jit(do_not_specialize=SPLIT_RUNTIME_INTS)
def _capture_split_kernel(
    q_ptr,
    k_cache_ptr,
    block_tables_ptr,
    query_pos_ptr,
    mask_prefix_ptr,
    window_ptr,
    sink_tokens_ptr,
    cos_ptr,
    sin_ptr,
    stats_ptr,
    head_keys_ptr,
    tile_max_ptr,
    logits_ptr,
    tickets_ptr,
    scale,
    num_splits,
    head_top_k,
    stride_qr,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_btr,
    stride_rope,
    stride_sr,
    stride_sh,
    stride_ss,
    stride_sf,
    stride_kr,
    stride_khd,
    stride_ks,
    stride_tr,
    stride_th,
    stride_lr,
    stride_lh,
    GROUP_SIZE: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_ROWS: tl.constexpr,
    LOG_HEAD_ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROPE: tl.constexpr,
    HEAD_TOPK: tl.constexpr,
    TILE_MAX: tl.constexpr,
    STORE_LOGITS: tl.constexpr,
    STATS: tl.constexpr,
):
    """Standalone Pass A of one (row, KV group, split) over the split's share of ``U``.

    Splits cover ``U`` in whole tiles aligned to multiples of ``TILE_N`` (the tiles of
    the tile-max record; key positions below ``U`` are masked like every other outside key).
    Each row's first program zeroes the row's finish tickets.
    """
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if (kv_head == 0) & (split == 0):
        _zero_tickets(tickets_ptr, row)
    pos, u_lo, w_lo, c_lo = _row_sets(row, query_pos_ptr, mask_prefix_ptr, window_ptr, sink_tokens_ptr)
    split_start, split_end = _split_range((u_lo // TILE_N) * TILE_N, pos + 1, split, num_splits, TILE_N)

    rows = tl.arange(0, GROUP_PAD)
    row_valid = rows < GROUP_SIZE
    heads = kv_head * GROUP_SIZE + rows
    tile_offsets = tl.arange(0, TILE_N)
    q_a, q_b = _load_query(q_ptr, row, heads, row_valid, stride_qr, stride_qh, HEAD_DIM, ROPE)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_u = tl.zeros([GROUP_PAD], dtype=tl.float32)
    l_s = tl.zeros([GROUP_PAD], dtype=tl.float32)
    l_c = tl.zeros([GROUP_PAD], dtype=tl.float32)
    e_c = tl.zeros([GROUP_PAD], dtype=tl.float32)
    hist = tl.zeros([GROUP_PAD, 16], dtype=tl.float32)
    if HEAD_TOPK:
        best = tl.full([HEAD_ROWS, SLOTS], EMPTY_KEY, tl.int64)
        head_kth = tl.full([HEAD_ROWS], EMPTY_KEY, tl.int64)
        buffered = tl.zeros([HEAD_ROWS], dtype=tl.int32)
        key_rows, head_valid = _head_topk_rows(
            head_keys_ptr, row * stride_kr + split * stride_ks, kv_head, stride_khd, GROUP_SIZE, HEAD_ROWS
        )

    block_table_row = block_tables_ptr + row * stride_btr
    for tile_start in range(split_start, split_end, TILE_N):
        tokens = tile_start + tile_offsets
        token_valid = tokens < split_end
        physical_block = tl.load(block_table_row + tokens // BLOCK_SIZE, mask=token_valid, other=0).to(tl.int64)
        k_rows = physical_block * stride_kb + (tokens % BLOCK_SIZE) * stride_kt + kv_head * stride_kh
        logits = _key_logits(
            q_a, q_b, k_cache_ptr, k_rows, tokens, token_valid, cos_ptr, sin_ptr, stride_rope, scale,
            HEAD_DIM, ROPE, DOT_PRECISION,
        )
        tile_max = tl.max(logits, axis=1)
        if TILE_MAX:
            _store_tile_max(tile_max_ptr, row * stride_tr, heads, row_valid, tile_start, tile_max, stride_th, TILE_N)
        if STORE_LOGITS:
            _store_logits(logits_ptr, row * stride_lr, heads, row_valid, tokens, logits, stride_lh)
        m_new = tl.maximum(m_i, tile_max)
        alpha = tl.exp(m_i - m_new)
        shifted = logits - m_new[:, None]
        p = tl.exp(shifted)
        l_u, l_s, l_c, e_c, hist = _capture_tile(
            l_u, l_s, l_c, e_c, hist, shifted, p, tl.sum(p, axis=1), m_i, m_new, alpha, tile_start, tokens,
            split_end, pos, u_lo, c_lo, TILE_N, STATS,
        )
        if HEAD_TOPK:
            best, head_kth, buffered = _head_topk_tile(
                best, head_kth, buffered, key_rows, head_valid, logits, tokens, pos, w_lo, head_top_k, GROUP_PAD,
                HEAD_ROWS, LOG_HEAD_ROWS, TILE_N,
            )
        m_i = m_new

    _store_capture_split(
        stats_ptr, row * stride_sr + split * stride_ss, heads, row_valid, m_i, l_u, l_s, l_c, e_c, hist, stride_sh,
        stride_sf,
    )
    if HEAD_TOPK:
        _store_head_keys(best, buffered, key_rows, head_valid, head_top_k, HEAD_ROWS, LOG_HEAD_ROWS)


@triton.jit(do_not_specialize=FUSED_RUNTIME_INTS)
def _fused_decode_capture_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    part_out_ptr,
    part_lse_ptr,
    capture_rows_ptr,
    query_pos_ptr,
    mask_prefix_ptr,
    window_ptr,
    sink_tokens_ptr,
    stats_ptr,
    head_keys_ptr,
    tile_max_ptr,
    logits_ptr,
    tickets_ptr,
    scale,
    num_splits,
    head_top_k,
    num_capture_rows,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_btb,
    stride_pob,
    stride_poh,
    stride_pos,
    stride_plb,
    stride_plh,
    stride_pls,
    stride_sr,
    stride_sh,
    stride_ss,
    stride_sf,
    stride_kr,
    stride_khd,
    stride_ks,
    stride_tr,
    stride_th,
    stride_lr,
    stride_lh,
    GROUP_SIZE: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_ROWS: tl.constexpr,
    LOG_HEAD_ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HEAD_TOPK: tl.constexpr,
    TILE_MAX: tl.constexpr,
    STORE_LOGITS: tl.constexpr,
    ROWS_PAD: tl.constexpr,
    STATS: tl.constexpr,
):
    """``_paged_decode_split_kernel`` plus Pass A in the same tile loop for captured sequences.

    A decode row ``seq`` is captured as capture row ``r`` when ``capture_rows[r] == seq``
    (found by one vector compare over ``capture_rows``); uncaptured rows run the plain
    attention loop. Captured rows reuse each tile's logits and running max; a captured
    row's first program zeroes its finish tickets.
    """
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(context_lens_ptr + seq)
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, TILE_N), num_splits)
    split_start = split * tiles_per_split * TILE_N
    split_end = tl.minimum(split_start + tiles_per_split * TILE_N, seq_len)

    rows = tl.arange(0, GROUP_PAD)
    row_valid = rows < GROUP_SIZE
    heads = kv_head * GROUP_SIZE + rows
    dims = tl.arange(0, HEAD_DIM)
    tile_offsets = tl.arange(0, TILE_N)
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :], mask=row_valid[:, None], other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    block_table_row = block_tables_ptr + seq * stride_btb
    slots = tl.arange(0, ROWS_PAD)
    captured = tl.load(capture_rows_ptr + slots, mask=slots < num_capture_rows, other=-1)
    cap = tl.max(tl.where(captured == seq, slots, -1), axis=0)
    if cap < 0:
        for tile_start in range(split_start, split_end, TILE_N):
            tokens = tile_start + tile_offsets
            m_new, l_i, acc, logits, tile_max, shifted, p, p_sum, alpha = _attend_tile(
                q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_table_row, tokens, split_end, kv_head,
                stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, scale,
                HEAD_DIM, BLOCK_SIZE, DOT_PRECISION,
            )
            m_i = m_new
    else:
        pos, u_lo, w_lo, c_lo = _row_sets(cap, query_pos_ptr, mask_prefix_ptr, window_ptr, sink_tokens_ptr)
        if (kv_head == 0) & (split == 0):
            _zero_tickets(tickets_ptr, cap)
        l_u = tl.zeros([GROUP_PAD], dtype=tl.float32)
        l_s = tl.zeros([GROUP_PAD], dtype=tl.float32)
        l_c = tl.zeros([GROUP_PAD], dtype=tl.float32)
        e_c = tl.zeros([GROUP_PAD], dtype=tl.float32)
        hist = tl.zeros([GROUP_PAD, 16], dtype=tl.float32)
        if HEAD_TOPK:
            best = tl.full([HEAD_ROWS, SLOTS], EMPTY_KEY, tl.int64)
            head_kth = tl.full([HEAD_ROWS], EMPTY_KEY, tl.int64)
            buffered = tl.zeros([HEAD_ROWS], dtype=tl.int32)
            key_rows, head_valid = _head_topk_rows(
                head_keys_ptr, cap * stride_kr + split * stride_ks, kv_head, stride_khd, GROUP_SIZE, HEAD_ROWS
            )
        for tile_start in range(split_start, split_end, TILE_N):
            tokens = tile_start + tile_offsets
            m_new, l_i, acc, logits, tile_max, shifted, p, p_sum, alpha = _attend_tile(
                q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_table_row, tokens, split_end, kv_head,
                stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, scale,
                HEAD_DIM, BLOCK_SIZE, DOT_PRECISION,
            )
            l_u, l_s, l_c, e_c, hist = _capture_tile(
                l_u, l_s, l_c, e_c, hist, shifted, p, p_sum, m_i, m_new, alpha, tile_start, tokens, split_end,
                pos, u_lo, c_lo, TILE_N, STATS,
            )
            if TILE_MAX:
                _store_tile_max(tile_max_ptr, cap * stride_tr, heads, row_valid, tile_start, tile_max, stride_th, TILE_N)
            if STORE_LOGITS:
                _store_logits(logits_ptr, cap * stride_lr, heads, row_valid, tokens, logits, stride_lh)
            if HEAD_TOPK:
                best, head_kth, buffered = _head_topk_tile(
                    best, head_kth, buffered, key_rows, head_valid, logits, tokens, pos, w_lo, head_top_k, GROUP_PAD,
                    HEAD_ROWS, LOG_HEAD_ROWS, TILE_N,
                )
            m_i = m_new
        _store_capture_split(
            stats_ptr, cap * stride_sr + split * stride_ss, heads, row_valid, m_i, l_u, l_s, l_c, e_c, hist, stride_sh,
            stride_sf,
        )
        if HEAD_TOPK:
            _store_head_keys(best, buffered, key_rows, head_valid, head_top_k, HEAD_ROWS, LOG_HEAD_ROWS)

    has_tokens = l_i > 0.0
    safe_l = tl.where(has_tokens, l_i, 1.0)
    split_out = acc / safe_l[:, None]
    split_lse = tl.where(has_tokens, m_i + tl.log(safe_l), float("-inf"))
    out_rows = part_out_ptr + seq * stride_pob + heads * stride_poh + split * stride_pos
    tl.store(out_rows[:, None] + dims[None, :], split_out.to(part_out_ptr.dtype.element_ty), mask=row_valid[:, None])
    tl.store(part_lse_ptr + seq * stride_plb + heads * stride_plh + split * stride_pls, split_lse, mask=row_valid)


# ----------------------------------------------------------------------------- combine, Pass B, merge


@triton.jit
def _tile_bounds_kernel(
    tile_max_ptr,
    head_weights_ptr,
    lse_ptr,
    query_pos_ptr,
    mask_prefix_ptr,
    window_ptr,
    sink_tokens_ptr,
    upper_ptr,
    lower_ptr,
    num_heads,
    num_tiles,
    stride_tr,
    stride_th,
    stride_wr,
    stride_lr,
    stride_br,
    TILE_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    HEADS_PAD: tl.constexpr,
):
    """Bounds on ``p̄`` per key tile of one row, from each head's tile maximum ``M_h(t)``.

    Upper: every ``j`` of tile ``t`` has ``p̄[j] <= sum_h w_h exp(M_h(t) - lse_h)``. Lower
    (tiles wholly inside ``W``): the position where the best head peaks has ``p̄ >=
    max_h w_h exp(M_h(t) - lse_h)``, other heads adding >= 0, so each such tile holds one
    position at least that likely. Tiles outside ``W`` get upper -1; partial tiles lower 0.
    """
    row = tl.program_id(0)
    tiles = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    pos, u_lo, w_lo, c_lo = _row_sets(row, query_pos_ptr, mask_prefix_ptr, window_ptr, sink_tokens_ptr)
    first = tiles * TILE_N
    last = first + (TILE_N - 1)
    valid = (tiles < num_tiles) & (first <= pos) & (last >= w_lo)
    interior = (first >= w_lo) & (last <= pos)
    heads = tl.arange(0, HEADS_PAD)
    weight = tl.load(head_weights_ptr + row * stride_wr + heads, mask=heads < num_heads, other=0.0)
    lse = tl.load(lse_ptr + row * stride_lr + heads, mask=heads < num_heads, other=float("-inf"))
    counted = (weight > 0.0) & (lse > float("-inf"))
    peak = tl.load(tile_max_ptr + row * stride_tr + heads[:, None] * stride_th + tiles[None, :],
                   mask=counted[:, None] & valid[None, :], other=float("-inf"))
    mass = tl.where(counted[:, None], weight[:, None] * tl.exp(peak - tl.where(counted, lse, 0.0)[:, None]), 0.0)
    upper = tl.sum(mass, axis=0)
    lower = tl.max(mass, axis=0)
    inside = tiles < num_tiles
    tl.store(upper_ptr + row * stride_br + tiles, tl.where(valid, upper, -1.0), mask=inside)
    tl.store(lower_ptr + row * stride_br + tiles, tl.where(valid & interior, lower, 0.0), mask=inside)


@triton.jit
def _tile_mean_probs(
    q_ptr,
    k_cache_ptr,
    block_table_row,
    head_weights_ptr,
    lse_ptr,
    cos_ptr,
    sin_ptr,
    row,
    tokens,
    in_w,
    scale,
    num_kv_heads,
    stride_qr,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_rope,
    stride_wr,
    stride_lr,
    GROUP_SIZE: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROPE: tl.constexpr,
):
    """``p̄[j] = sum_h w_h exp(s_h[j] - lse_h)`` of one row over the key tile ``tokens`` (0 outside ``in_w``).

    Logits are recomputed from the keys, for every KV group with a head of nonzero weight,
    summed over groups in a fixed order.
    """
    rows = tl.arange(0, GROUP_PAD)
    row_valid = rows < GROUP_SIZE
    physical_block = tl.load(block_table_row + tokens // BLOCK_SIZE, mask=in_w, other=0).to(tl.int64)
    p_bar = tl.zeros([TILE_N], dtype=tl.float32)
    for kv_head in range(num_kv_heads):
        heads = kv_head * GROUP_SIZE + rows
        weights = tl.load(head_weights_ptr + row * stride_wr + heads, mask=row_valid, other=0.0)
        if tl.max(weights, axis=0) > 0.0:
            lse = tl.load(lse_ptr + row * stride_lr + heads, mask=row_valid, other=0.0)
            lse = tl.where(lse == float("-inf"), 0.0, lse)
            q_a, q_b = _load_query(q_ptr, row, heads, row_valid, stride_qr, stride_qh, HEAD_DIM, ROPE)
            k_rows = physical_block * stride_kb + (tokens % BLOCK_SIZE) * stride_kt + kv_head * stride_kh
            logits = _key_logits(
                q_a, q_b, k_cache_ptr, k_rows, tokens, in_w, cos_ptr, sin_ptr, stride_rope, scale,
                HEAD_DIM, ROPE, DOT_PRECISION,
            )
            p_bar += tl.sum(weights[:, None] * tl.exp(logits - lse[:, None]), axis=0)
    return p_bar


@triton.jit
def _tile_mean_topk_kernel(
    q_ptr,
    k_cache_ptr,
    block_tables_ptr,
    query_pos_ptr,
    mask_prefix_ptr,
    window_ptr,
    sink_tokens_ptr,
    head_weights_ptr,
    lse_ptr,
    cos_ptr,
    sin_ptr,
    tile_ids_ptr,
    upper_ptr,
    floor_ptr,
    keys_ptr,
    recomputed_ptr,
    scale,
    num_listed,
    num_kv_heads,
    top_k,
    stride_qr,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_btr,
    stride_rope,
    stride_wr,
    stride_lr,
    stride_ir,
    stride_br,
    stride_kr,
    stride_kc,
    GROUP_SIZE: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    TILES_PER_PROGRAM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROPE: tl.constexpr,
    LISTED: tl.constexpr,
    FLOORED: tl.constexpr,
):
    """Exact ``p̄`` over the candidate key tiles of one row's chunk, reduced to the chunk's top-k keys.

    The chunk is ``TILES_PER_PROGRAM`` entries of the tile list (``tile_ids[row]`` when
    ``LISTED``, else tiles ``0 .. num_listed - 1``). A tile is recomputed -- its keys re-read
    for every KV group with a head of nonzero weight, ``p̄[j] = sum_h w_h exp(s_h[j] - lse_h)``
    summed over heads in a fixed order -- only when its upper bound reaches the
    row's floor (``FLOORED``: ``floor[row]`` less a 1e-3 relative margin for the bound's
    rounding; else any tile inside ``W``). Positions outside ``W`` or below the floor get the
    empty key. ``recomputed[row]`` counts the tiles re-read.
    """
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    pos, u_lo, w_lo, c_lo = _row_sets(row, query_pos_ptr, mask_prefix_ptr, window_ptr, sink_tokens_ptr)
    entries = chunk * TILES_PER_PROGRAM + tl.arange(0, TILES_PER_PROGRAM)
    listed = entries < num_listed
    if LISTED:
        tile_ids = tl.load(tile_ids_ptr + row * stride_ir + entries, mask=listed, other=0).to(tl.int32)
    else:
        tile_ids = entries
    upper = tl.load(upper_ptr + row * stride_br + tile_ids, mask=listed, other=-1.0)
    floor = 0.0
    if FLOORED:
        floor = tl.load(floor_ptr + row) * (1.0 - 1e-3)
    wanted = listed & (upper >= 0.0) & (upper >= floor)
    best = tl.full([1, SLOTS], EMPTY_KEY, tl.int64)
    num_wanted = tl.sum(wanted.to(tl.int32), axis=0)
    if num_wanted > 0:
        tile_offsets = tl.arange(0, TILE_N)
        block_table_row = block_tables_ptr + row * stride_btr
        for i in range(TILES_PER_PROGRAM):
            tile = tl.sum(tl.where(tl.arange(0, TILES_PER_PROGRAM) == i, tile_ids, 0), axis=0)
            take = tl.sum(tl.where(tl.arange(0, TILES_PER_PROGRAM) == i, wanted.to(tl.int32), 0), axis=0)
            if take > 0:
                tokens = tile * TILE_N + tile_offsets
                in_w = (tokens >= w_lo) & (tokens <= pos)
                p_bar = _tile_mean_probs(
                    q_ptr, k_cache_ptr, block_table_row, head_weights_ptr, lse_ptr, cos_ptr, sin_ptr,
                    row, tokens, in_w, scale, num_kv_heads, stride_qr, stride_qh, stride_kb, stride_kt, stride_kh,
                    stride_rope, stride_wr, stride_lr,
                    GROUP_SIZE, GROUP_PAD, HEAD_DIM, BLOCK_SIZE, TILE_N, DOT_PRECISION, ROPE,
                )
                keys = _pack_keys(p_bar[None, :], tokens[None, :], (in_w & (p_bar >= floor))[None, :])
                best = _update_topk(best, keys, top_k, 1, 0, TILE_N)
        tl.atomic_add(recomputed_ptr + row, num_wanted, sem="relaxed")
    slots = tl.arange(0, SLOTS)
    tl.store(keys_ptr + row * stride_kr + chunk * stride_kc + slots[None, :], best)


@triton.jit
def _dense_mean_probs_kernel(
    q_ptr,
    k_cache_ptr,
    block_tables_ptr,
    query_pos_ptr,
    mask_prefix_ptr,
    window_ptr,
    sink_tokens_ptr,
    head_weights_ptr,
    lse_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    scale,
    num_kv_heads,
    width,
    stride_qr,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_btr,
    stride_rope,
    stride_wr,
    stride_lr,
    stride_or,
    GROUP_SIZE: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROPE: tl.constexpr,
):
    """``p̄`` of one row over one key tile (``-inf`` outside ``W``), its keys read again (only tiles that
    touch ``W``) by the same ``_tile_mean_probs`` as Pass B's tile recompute."""
    row = tl.program_id(0)
    tokens = tl.program_id(1) * TILE_N + tl.arange(0, TILE_N)
    pos, u_lo, w_lo, c_lo = _row_sets(row, query_pos_ptr, mask_prefix_ptr, window_ptr, sink_tokens_ptr)
    in_w = (tokens >= w_lo) & (tokens <= pos)
    p_bar = tl.zeros([TILE_N], dtype=tl.float32)
    if tl.max(in_w.to(tl.int32), axis=0) > 0:
        p_bar = _tile_mean_probs(
            q_ptr, k_cache_ptr, block_tables_ptr + row * stride_btr, head_weights_ptr, lse_ptr, cos_ptr,
            sin_ptr, row, tokens, in_w, scale, num_kv_heads, stride_qr, stride_qh, stride_kb, stride_kt, stride_kh,
            stride_rope, stride_wr, stride_lr,
            GROUP_SIZE, GROUP_PAD, HEAD_DIM, BLOCK_SIZE, TILE_N, DOT_PRECISION, ROPE,
        )
    tl.store(out_ptr + row * stride_or + tokens, tl.where(in_w, p_bar, float("-inf")), mask=tokens < width)


@triton.jit
def _radix_digit(bits, kth, k, shift, width, RADIX_BITS: tl.constexpr):
    """``kth`` with its ``width``-bit digit at ``shift`` set to the largest value that keeps at least ``k`` of
    ``bits`` at or above it (``kth``'s lower bits are 0): one reduction counts every candidate digit."""
    digits = tl.arange(0, 2**RADIX_BITS)
    trials = kth | (digits << shift)
    reaching = tl.sum((bits[:, None] >= trials[None, :]).to(tl.int32), axis=0)
    taken = (reaching >= k) & (digits > 0) & (digits < (1 << width))
    return kth | (tl.sum(taken.to(tl.int32), axis=0) << shift)


@triton.jit
def _select_topk(values, positions, valid, k, scratch, N: tl.constexpr, RADIX_BITS: tl.constexpr):
    """The top ``k`` of ``N`` values (1-D, >= 0 where ``valid``) and more, as keys ``[1, SLOTS]`` sorted descending.

    Candidates first: the ``k``-th largest maximum ``t`` of the ``SLOTS`` strided groups
    ``{g, g + SLOTS, ...}`` (strided, so a run of large values spreads over groups) has at
    least ``k`` values at or above it, so every top-``k`` value is ``>= t``. When at most
    ``SLOTS`` values reach ``t`` (the rule for spread-out values) they are all taken;
    otherwise the k-th largest value is found digit by digit over its float32 pattern
    (non-negative floats order like their bits; :func:`_radix_digit`), ``RADIX_BITS`` bits a
    round, and the values above it are taken with the ties at it in array order until ``k``
    are (callers lay equal values out by ascending position). The taken keys go to their
    slot of ``scratch`` (``SLOTS`` int64, a prefix sum) and one bitonic sort orders them;
    the first ``k`` are the top ``k``, ties by position.
    """
    bits = tl.where(valid, tl.where(values == 0.0, 0.0, values).to(tl.int32, bitcast=True), -1)
    group_max = tl.max(tl.reshape(bits, [N // SLOTS, SLOTS]), axis=0)
    reaching = tl.sum((group_max[None, :] >= group_max[:, None]).to(tl.int32), axis=1)
    floor = tl.maximum(tl.max(tl.where(reaching >= k, group_max, -1), axis=0), 0)
    chosen = bits >= floor
    if tl.sum(chosen.to(tl.int32), axis=0) > SLOTS:
        kth = tl.full([], 0, tl.int32)
        if 31 % RADIX_BITS:  # the top bits that do not fill a whole digit
            kth = _radix_digit(bits, kth, k, 31 - 31 % RADIX_BITS, 31 % RADIX_BITS, RADIX_BITS)
        for digit in range(31 // RADIX_BITS):
            kth = _radix_digit(bits, kth, k, 31 - 31 % RADIX_BITS - RADIX_BITS * (digit + 1), RADIX_BITS, RADIX_BITS)
        above = bits > kth
        tied = (bits == kth).to(tl.int32)
        tied_before = tl.cumsum(tied, axis=0) - tied
        chosen = above | ((tied > 0) & (tied_before < k - tl.sum(above.to(tl.int32), axis=0)))
    slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    tl.store(scratch + slot, _pack_keys(values, positions, chosen), mask=chosen)
    slots = tl.arange(0, SLOTS)
    tl.store(scratch + slots, tl.full([SLOTS], EMPTY_KEY, tl.int64), mask=slots >= tl.sum(chosen.to(tl.int32), axis=0))
    tl.debug_barrier()
    listed = tl.load(scratch + slots[None, :], cache_modifier=".cg")
    return _merge_topk(tl.full([1, SLOTS], EMPTY_KEY, tl.int64), listed, 1, 0, SLOTS)


@triton.jit
def _store_topk(best, pos_ptr, value_ptr, k, empty_value):
    """Write the first ``k`` of sorted keys ``best`` ``[1, SLOTS]`` as positions and values (-1 / ``empty_value``
    where empty)."""
    slots = tl.arange(0, SLOTS)
    values, positions = _unpack_keys(best)
    empty = best == EMPTY_KEY
    keep = slots[None, :] < k
    tl.store(pos_ptr + slots[None, :], tl.where(empty, -1, positions), mask=keep)
    tl.store(value_ptr + slots[None, :], tl.where(empty, empty_value, values), mask=keep)


@triton.jit
def _chunk_topk(
    p_bar, tokens, valid, k, chunk, num_chunks, scratch_row, tree_tickets, pos_ptr, value_ptr, stride_scc, merge_tree,
    CHUNK: tl.constexpr, LOG_LISTS: tl.constexpr, RADIX_BITS: tl.constexpr,
):
    """Exact top-k of one chunk of a row's dense ``p̄``; the chunk that completes the row's merge writes its top-k.

    ``scratch_row`` holds ``num_chunks`` slots of ``SLOTS`` keys; ``tree_tickets`` ``2^LOG_LISTS
    - 1`` tickets zeroed before the launch. A row of one chunk writes its top-k directly.
    Otherwise, with ``merge_tree`` (non-zero), the chunks' sorted lists merge up a binary tree
    as they finish (:func:`_climb_tree`), so only the tree's height follows the last chunk;
    without it each chunk leaves its list in its slot and takes the first ticket, and the chunk
    drawing the last one merges every list (:func:`_fold_lists`). Keys order ties by position.
    Both are run-time branches, so one compiled kernel serves every row count and width.
    """
    best = _select_topk(p_bar, tokens, valid, k, scratch_row + chunk * stride_scc, CHUNK, RADIX_BITS)
    if num_chunks > 1:
        if merge_tree != 0:
            best, done = _climb_tree(best, chunk, num_chunks, scratch_row, stride_scc, tree_tickets, LOG_LISTS)
            if done:
                _store_topk(best, pos_ptr, value_ptr, k, 0.0)
        else:
            slots = tl.arange(0, SLOTS)
            tl.store(scratch_row + chunk * stride_scc + slots[None, :], best)
            tl.debug_barrier()
            if tl.atomic_add(tree_tickets, 1, sem="acq_rel", scope="gpu") == num_chunks - 1:
                best = _fold_lists(scratch_row, stride_scc, num_chunks, LOG_LISTS)
                _store_topk(best, pos_ptr, value_ptr, k, 0.0)
    else:
        _store_topk(best, pos_ptr, value_ptr, k, 0.0)


@triton.jit
def _climb_tree(best, leaf, num_lists, row_keys, stride_ks, tree_tickets, LOG_LISTS: tl.constexpr):
    """Merge list ``leaf`` (sorted keys ``best`` ``[1, SLOTS]``) up a row's binary merge tree of ``num_lists`` lists.

    At each level a list with a sibling stores itself in its slot (``node << level``, the
    first leaf slot of its subtree) and takes the parent's ticket (``tree_tickets``, ``2^LOG_LISTS - 1``
    of them, zeroed before the launch; the parents of level ``l`` from index
    ``2^(LOG_LISTS - 1 - l) - 1``): the first of the pair to arrive stops there, the second
    merges the sibling's list (read reversed, ascending: :func:`_merge_sorted`) and climbs
    on; a list without a sibling climbs unchanged. Returns the merged keys and whether this
    program merged the root (it then holds the row's top keys).
    """
    slots = tl.arange(0, SLOTS)
    reversed_slots = slots * -1 + (SLOTS - 1)
    node = leaf
    width = num_lists
    climbing = tl.full([], 1, tl.int1)
    for level in range(LOG_LISTS):
        if climbing & (width > 1):
            if (node ^ 1) < width:
                tl.store(row_keys + (node << level) * stride_ks + slots[None, :], best)
                tl.debug_barrier()
                ticket = tree_tickets + (1 << (LOG_LISTS - 1 - level)) - 1 + (node >> 1)
                if tl.atomic_add(ticket, 1, sem="acq_rel", scope="gpu") == 0:
                    climbing = tl.full([], 0, tl.int1)
                else:
                    ascending = tl.load(row_keys + ((node ^ 1) << level) * stride_ks + reversed_slots[None, :],
                                        cache_modifier=".cg")
                    best = _merge_sorted(best, ascending, 1, 0)
            node = node >> 1
            width = (width + 1) >> 1
    return best, climbing


@triton.jit(do_not_specialize=DENSE_TOPK_RUNTIME_INTS)
def _dense_topk_kernel(
    probs_ptr,
    scratch_ptr,
    tickets_ptr,
    pos_ptr,
    value_ptr,
    width,
    k,
    num_chunks,
    stride_pr,
    stride_scr,
    stride_scc,
    stride_or,
    merge_tree,
    CHUNK: tl.constexpr,
    LOG_LISTS: tl.constexpr,
    RADIX_BITS: tl.constexpr,
):
    """Exact top-k of one row's ``CHUNK`` dense ``p̄`` values (``-inf`` outside ``W``) by :func:`_chunk_topk`."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    tokens = chunk * CHUNK + tl.arange(0, CHUNK)
    p_bar = tl.load(probs_ptr + row * stride_pr + tokens, mask=tokens < width, other=float("-inf"))
    _chunk_topk(
        p_bar, tokens, p_bar >= 0.0, k, chunk, num_chunks, scratch_ptr + row * stride_scr,
        tickets_ptr + row * (1 << LOG_LISTS),
        pos_ptr + row * stride_or, value_ptr + row * stride_or, stride_scc, merge_tree, CHUNK, LOG_LISTS, RADIX_BITS,
    )


@triton.jit
def _heads_lse(stats_ptr, row_stats, heads, head_valid, num_splits, stride_sh, stride_ss, stride_sf,
               SPLITS_PAD: tl.constexpr):
    """``lse_U`` of ``heads`` (one row, its Pass A partials at ``row_stats``) merged over the splits."""
    splits = tl.arange(0, SPLITS_PAD)
    valid = head_valid[:, None] & (splits < num_splits)[None, :]
    base = stats_ptr + row_stats + heads[:, None] * stride_sh + splits[None, :] * stride_ss
    m = tl.load(base + 16 * stride_sf, mask=valid, other=float("-inf"))
    l_u = tl.load(base + 17 * stride_sf, mask=valid, other=0.0)
    m_max = tl.max(m, axis=1)
    shift = tl.where(m_max == float("-inf"), 0.0, m_max)
    total_u = tl.sum(tl.exp(m - shift[:, None]) * l_u, axis=1)
    return tl.where(total_u > 0.0, shift + tl.log(tl.where(total_u > 0.0, total_u, 1.0)), float("-inf"))


@triton.jit
def _stored_block_topk(
    row, block, logits_ptr, stats_ptr, head_weights_ptr, query_pos_ptr, mask_prefix_ptr, window_ptr, sink_tokens_ptr,
    probs_ptr, scratch_ptr, tickets_ptr, pos_ptr, value_ptr, num_heads, num_splits, width, num_chunks, k, row_period,
    stride_lgr, stride_lgh, stride_sr, stride_sh, stride_ss, stride_sf, stride_wr, stride_pr, stride_scr, stride_scc,
    stride_tr, stride_or, merge_tree,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr, HEADS_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
    LOG_LISTS: tl.constexpr, RADIX_BITS: tl.constexpr,
):
    """Pass B from stored logits for ``BLOCK`` positions of a row; the last block of a chunk ranks the chunk.

    ``p̄[j] = sum_h w_h exp(s_h[j] - lse_h)`` over the block's positions in ``W`` (every
    head's logits in one load, each head's ``lse`` merged from the split partials here, so
    this runs beside the combine) goes to ``probs`` (``-inf`` outside ``W``). Then the block
    takes its chunk's ticket (``tickets[row, 2^LOG_LISTS + chunk]``); the block drawing the
    last one reads the chunk's ``p̄`` back and ranks it (:func:`_chunk_topk`; the row's merge
    tree takes ``tickets[row, 1 : 2^LOG_LISTS]``). The request's per-row settings are those of
    row ``row % row_period`` (layers stacked over the same rows share them).
    """
    tokens = block * BLOCK + tl.arange(0, BLOCK)
    settings_row = row % row_period
    pos, u_lo, w_lo, c_lo = _row_sets(settings_row, query_pos_ptr, mask_prefix_ptr, window_ptr, sink_tokens_ptr)
    in_w = (tokens >= w_lo) & (tokens <= pos)
    p_bar = tl.zeros([BLOCK], dtype=tl.float32)
    if tl.max(in_w.to(tl.int32), axis=0) > 0:
        heads = tl.arange(0, HEADS_PAD)
        head_valid = heads < num_heads
        weights = tl.load(head_weights_ptr + settings_row * stride_wr + heads, mask=head_valid, other=0.0)
        lse = _heads_lse(stats_ptr, row * stride_sr, heads, head_valid, num_splits, stride_sh, stride_ss, stride_sf,
                         SPLITS_PAD)
        lse = tl.where(lse == float("-inf"), 0.0, lse)
        logits = tl.load(logits_ptr + row * stride_lgr + heads[:, None] * stride_lgh + tokens[None, :],
                         mask=(weights > 0.0)[:, None] & in_w[None, :], other=float("-inf"))
        p_bar = tl.sum(weights[:, None] * tl.exp(logits - lse[:, None]), axis=0)
    tl.store(probs_ptr + row * stride_pr + tokens, tl.where(in_w, p_bar, float("-inf")), mask=tokens < width)
    chunk = block // (CHUNK // BLOCK)
    blocks_in_chunk = tl.minimum(CHUNK // BLOCK, tl.cdiv(width, BLOCK) - chunk * (CHUNK // BLOCK))
    tl.debug_barrier()
    chunk_ticket = tickets_ptr + row * stride_tr + (1 << LOG_LISTS) + chunk
    if tl.atomic_add(chunk_ticket, 1, sem="acq_rel", scope="gpu") == blocks_in_chunk - 1:
        chunk_tokens = chunk * CHUNK + tl.arange(0, CHUNK)
        chunk_probs = tl.load(probs_ptr + row * stride_pr + chunk_tokens, mask=chunk_tokens < width,
                              other=float("-inf"), cache_modifier=".cg")
        _chunk_topk(
            chunk_probs, chunk_tokens, chunk_probs >= 0.0, k, chunk, num_chunks, scratch_ptr + row * stride_scr,
            tickets_ptr + row * stride_tr + 1, pos_ptr + row * stride_or, value_ptr + row * stride_or, stride_scc,
            merge_tree, CHUNK, LOG_LISTS, RADIX_BITS,
        )


@triton.jit
def _combine_heads(
    row, first_head, stats_ptr, head_weights_ptr, query_pos_ptr, mask_prefix_ptr, window_ptr, sink_tokens_ptr,
    tickets_ptr, lse_ptr, head_stats_ptr, hist_ptr, entropy_ptr, sink_mass_ptr, num_stat_ptr, num_heads, num_splits,
    num_head_groups, row_period, stride_sr, stride_sh, stride_ss, stride_sf, stride_wr, stride_tr,
    SPLITS_PAD: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_GROUP: tl.constexpr,
):
    """Merge the per-split Pass A partials of one row's ``HEAD_GROUP`` heads from ``first_head``; the row's last
    head group to finish sums the heads.

    Writes each head's ``lse`` and ``head_stats[row, head] = [w H_h, w l_S / l_U, w hist_h /
    l_C ...]``, then takes a ticket (``tickets[row, 0]``, zeroed by Pass A): the group drawing
    the last one adds every head's weighted entropy, sink mass and histogram in a fixed order
    and writes the row's ``num_stat``. Per-row settings are those of row ``row % row_period``.
    """
    heads = first_head + tl.arange(0, HEAD_GROUP)
    head_valid = heads < num_heads
    splits = tl.arange(0, SPLITS_PAD)
    valid = head_valid[:, None] & (splits < num_splits)[None, :]
    base = stats_ptr + row * stride_sr + heads[:, None] * stride_sh + splits[None, :] * stride_ss
    m = tl.load(base + 16 * stride_sf, mask=valid, other=float("-inf"))
    l_u = tl.load(base + 17 * stride_sf, mask=valid, other=0.0)
    l_s = tl.load(base + 18 * stride_sf, mask=valid, other=0.0)
    l_c = tl.load(base + 19 * stride_sf, mask=valid, other=0.0)
    e_c = tl.load(base + 20 * stride_sf, mask=valid, other=0.0)
    bins = tl.arange(0, 16)
    hist = tl.load(base[:, None, :] + bins[None, :, None] * stride_sf, mask=valid[:, None, :], other=0.0)
    m_max = tl.max(m, axis=1)
    shift = tl.where(m_max == float("-inf"), 0.0, m_max)
    scale = tl.exp(m - shift[:, None])  # 0 for empty splits
    total_u = tl.sum(scale * l_u, axis=1)
    total_s = tl.sum(scale * l_s, axis=1)
    total_c = tl.sum(scale * l_c, axis=1)
    total_e = tl.sum(scale * (e_c + tl.where(l_c > 0.0, m - shift[:, None], 0.0) * l_c), axis=1)
    head_hist = tl.sum(scale[:, None, :] * hist, axis=2)
    has_u = total_u > 0.0
    has_c = total_c > 0.0
    safe_u = tl.where(has_u, total_u, 1.0)
    safe_c = tl.where(has_c, total_c, 1.0)
    tl.store(lse_ptr + row * num_heads + heads, tl.where(has_u, shift + tl.log(safe_u), float("-inf")),
             mask=head_valid)
    weight = tl.load(head_weights_ptr + (row % row_period) * stride_wr + heads, mask=head_valid, other=0.0)
    out = head_stats_ptr + (row * num_heads + heads) * STATS_PER_HEAD
    tl.store(out, tl.where(has_c, weight * (tl.log(safe_c) - total_e / safe_c), 0.0), mask=head_valid)
    tl.store(out + 1, tl.where(has_u, weight * total_s / safe_u, 0.0), mask=head_valid)
    tl.store(out[:, None] + 2 + bins[None, :], (tl.where(has_c, weight / safe_c, 0.0))[:, None] * head_hist,
             mask=head_valid[:, None])
    tl.debug_barrier()
    if tl.atomic_add(tickets_ptr + row * stride_tr, 1, sem="acq_rel", scope="gpu") == num_head_groups - 1:
        all_heads = tl.arange(0, HEADS_PAD)
        cols = tl.arange(0, 32)
        block = tl.load(head_stats_ptr + (row * num_heads + all_heads[:, None]) * STATS_PER_HEAD + cols[None, :],
                        mask=(all_heads < num_heads)[:, None] & (cols < STATS_PER_HEAD)[None, :], other=0.0,
                        cache_modifier=".cg")
        sums = tl.sum(block, axis=0)
        tl.store(entropy_ptr + row, tl.sum(tl.where(cols == 0, sums, 0.0), axis=0))
        tl.store(sink_mass_ptr + row, tl.sum(tl.where(cols == 1, sums, 0.0), axis=0))
        tl.store(hist_ptr + row * 16 + cols - 2, sums, mask=(cols >= 2) & (cols < STATS_PER_HEAD))
        pos, u_lo, w_lo, c_lo = _row_sets(row % row_period, query_pos_ptr, mask_prefix_ptr, window_ptr,
                                          sink_tokens_ptr)
        tl.store(num_stat_ptr + row, tl.maximum(pos + 1 - c_lo, 0))


@triton.jit(do_not_specialize=FINISH_RUNTIME_INTS)
def _capture_finish_kernel(
    stats_ptr, head_weights_ptr, query_pos_ptr, mask_prefix_ptr, window_ptr, sink_tokens_ptr, tickets_ptr,
    lse_ptr, head_stats_ptr, hist_ptr, entropy_ptr, sink_mass_ptr, num_stat_ptr,
    logits_ptr, probs_ptr, scratch_ptr, pos_ptr, value_ptr,
    part_out_ptr, part_lse_ptr, out_ptr, out_lse_ptr,
    rows, num_heads, num_head_groups, num_splits, width, num_blocks, num_chunks, k, row_period, merge_tree,
    stride_sr, stride_sh, stride_ss, stride_sf, stride_wr, stride_tr, stride_lgr, stride_lgh, stride_pr, stride_scr,
    stride_scc, stride_or,
    stride_pob, stride_poh, stride_pos, stride_plb, stride_plh, stride_pls, stride_ob, stride_oh, stride_lb, stride_lh,
    SPLITS_PAD: tl.constexpr, HEADS_PAD: tl.constexpr, TOPK: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
    LOG_LISTS: tl.constexpr, RADIX_BITS: tl.constexpr, COMBINE_OUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_GROUP: tl.constexpr,
):
    """Everything after Pass A in one launch, one job per program (1-D grid).

    ``rows * num_blocks`` programs (``TOPK``, logits stored) run :func:`_stored_block_topk`;
    ``rows * num_head_groups`` run :func:`_combine_heads` (``HEAD_GROUP`` heads each); with
    ``COMBINE_OUT`` (a split decode kernel), the attention's own split merge for every
    (sequence, head) follows (``_combine_split_row``). None waits for another: each block merges the ``lse`` it needs
    from the partials itself, and the last program to finish a share of a row's work (its
    head groups, a chunk's blocks, its chunks) takes the next step, counted by tickets ``[R,
    FINISH_TICKETS]`` (the head sum, the chunks' merge, one per chunk) that Pass A zeroed. The
    request's per-row settings repeat every ``row_period`` rows: several layers' Pass A outputs
    over the same rows, stacked, finish in one launch (:class:`DeferredFinish`).
    """
    pid = tl.program_id(0)
    job = pid - rows * num_blocks  # num_blocks is 0 without TOPK
    if job < 0:
        if TOPK:
            _stored_block_topk(
                pid // num_blocks, pid % num_blocks, logits_ptr, stats_ptr, head_weights_ptr, query_pos_ptr,
                mask_prefix_ptr, window_ptr, sink_tokens_ptr, probs_ptr, scratch_ptr, tickets_ptr, pos_ptr, value_ptr,
                num_heads, num_splits, width, num_chunks, k, row_period, stride_lgr, stride_lgh, stride_sr, stride_sh,
                stride_ss, stride_sf, stride_wr, stride_pr, stride_scr, stride_scc, stride_tr, stride_or, merge_tree,
                BLOCK, CHUNK, HEADS_PAD, SPLITS_PAD, LOG_LISTS, RADIX_BITS,
            )
    elif job < rows * num_head_groups:
        _combine_heads(
            job // num_head_groups, (job % num_head_groups) * HEAD_GROUP, stats_ptr, head_weights_ptr, query_pos_ptr,
            mask_prefix_ptr, window_ptr, sink_tokens_ptr, tickets_ptr, lse_ptr, head_stats_ptr, hist_ptr, entropy_ptr,
            sink_mass_ptr, num_stat_ptr, num_heads, num_splits, num_head_groups, row_period, stride_sr, stride_sh,
            stride_ss, stride_sf, stride_wr, stride_tr, SPLITS_PAD, HEADS_PAD, HEAD_GROUP,
        )
    elif COMBINE_OUT:
        job -= rows * num_head_groups
        _combine_split_row(
            job // num_heads, job % num_heads, part_out_ptr, part_lse_ptr, out_ptr, out_lse_ptr, num_splits,
            stride_pob, stride_poh, stride_pos, stride_plb, stride_plh, stride_pls, stride_ob, stride_oh,
            stride_lb, stride_lh, HEAD_DIM, SPLITS_PAD,
        )


@triton.jit
def _fold_lists(row_keys, stride_ks, num_lists, LOG_LISTS: tl.constexpr):
    """The top ``SLOTS`` keys, sorted descending, of ``num_lists`` lists (each sorted descending, at most
    ``2^LOG_LISTS``) at ``row_keys + list * stride_ks``; overwrites the lists.

    A merge tree, each level all at once: with ``half`` the level's width, list ``i + half``
    (read reversed, ascending) merges into list ``i`` for every ``i < half``
    (:func:`_merge_sorted`), so ``LOG_LISTS`` levels leave the top keys in list 0 -- against
    one merge after another in :func:`_merge_lists`, a serial chain that dominated the
    finish of rows with many chunks. Levels whose upper half is empty are skipped.
    """
    slots = tl.arange(0, SLOTS)
    reversed_slots = slots * -1 + (SLOTS - 1)
    for level in tl.static_range(1, LOG_LISTS):
        lists = tl.arange(0, 1 << (LOG_LISTS - level))
        if num_lists > (1 << (LOG_LISTS - level)):
            kept = lists < num_lists
            best = tl.load(row_keys + lists[:, None] * stride_ks + slots[None, :], mask=kept[:, None],
                           other=EMPTY_KEY, cache_modifier=".cg")
            folded = lists + (1 << (LOG_LISTS - level))
            ascending = tl.load(row_keys + folded[:, None] * stride_ks + reversed_slots[None, :],
                                mask=(folded < num_lists)[:, None], other=EMPTY_KEY, cache_modifier=".cg")
            merged = _merge_sorted(best, ascending, 1 << (LOG_LISTS - level), LOG_LISTS - level)
            tl.store(row_keys + lists[:, None] * stride_ks + slots[None, :], merged, mask=kept[:, None])
            tl.debug_barrier()
    best = tl.load(row_keys + slots[None, :], cache_modifier=".cg")
    ascending = tl.load(row_keys + stride_ks + reversed_slots[None, :], mask=(slots * 0 + 1 < num_lists)[None, :],
                        other=EMPTY_KEY, cache_modifier=".cg")
    return _merge_sorted(best, ascending, 1, 0)


@triton.jit
def _merge_lists(row_keys, stride_ks, first_list, num_lists, k, LISTS_PAD: tl.constexpr):
    """The top ``SLOTS`` keys, sorted descending, of lists ``first_list ..`` (``num_lists`` of them, each sorted
    descending) at ``row_keys + list * stride_ks``.

    A list whose best key does not beat the running ``k``-th is skipped unread. Another is
    read reversed (ascending); its elementwise max with the running best is a bitonic
    sequence holding exactly the top ``SLOTS`` of the union, which one bitonic merge sorts.
    """
    slots = tl.arange(0, SLOTS)
    lists = tl.arange(0, LISTS_PAD)
    firsts = tl.load(row_keys + (first_list + lists) * stride_ks, mask=lists < num_lists, other=EMPTY_KEY,
                     cache_modifier=".cg")
    reversed_slots = tl.expand_dims(slots * -1 + (SLOTS - 1), 0)
    best = tl.full([1, SLOTS], EMPTY_KEY, tl.int64)
    for i in range(num_lists):
        first = tl.max(tl.where(lists == i, firsts, EMPTY_KEY), axis=0)
        if first > tl.max(_kth_key(best, k, SLOTS), axis=0):
            ascending = tl.load(row_keys + (first_list + i) * stride_ks + reversed_slots, cache_modifier=".cg")
            best = _merge_sorted(best, ascending, 1, 0)
    return best


@triton.jit
def _merge_lists_kernel(keys_ptr, out_ptr, num_lists, k, stride_kr, stride_ks, stride_or, stride_os,
                        FAN_IN: tl.constexpr):
    """First merge level: lists ``FAN_IN * g ..`` of one row into its sorted list ``g`` of ``out``."""
    row = tl.program_id(0)
    group = tl.program_id(1)
    first = group * FAN_IN
    best = _merge_lists(keys_ptr + row * stride_kr, stride_ks, first, tl.minimum(num_lists - first, FAN_IN), k, FAN_IN)
    slots = tl.arange(0, SLOTS)
    tl.store(out_ptr + row * stride_or + group * stride_os + slots[None, :], best)


@triton.jit
def _merge_topk_kernel(
    keys_ptr, pos_ptr, value_ptr, num_lists, k, empty_value, stride_kr, stride_ks, stride_or,
    LISTS_PAD: tl.constexpr,
):
    """Merge one row's top-k key lists (each sorted descending) into its final top-``k`` positions and values."""
    row = tl.program_id(0)
    best = _merge_lists(keys_ptr + row * stride_kr, stride_ks, 0, num_lists, k, LISTS_PAD)
    _store_topk(best, pos_ptr + row * stride_or, value_ptr + row * stride_or, k, empty_value)


# ----------------------------------------------------------------------------- launchers


@dataclass
class PassAOutputs:
    """Buffers Pass A fills for the combine and Pass B (see :func:`_empty_partials`)."""

    stats: torch.Tensor
    head_keys: torch.Tensor
    tile_max: torch.Tensor
    logits: torch.Tensor
    stores_logits: bool
    tickets: torch.Tensor


def _fused_maxnreg(head_top_k: int, programs: int, device: torch.device) -> int | None:
    """The fused kernel's register cap: ``FUSED_MAXNREG``, lifted for per-head top-k when its launch of
    ``programs`` fits one wave at the uncapped occupancy (``HEAD_TOPK_UNCAPPED_PROGRAMS_PER_SM``)."""
    if head_top_k and programs <= HEAD_TOPK_UNCAPPED_PROGRAMS_PER_SM * _num_sms(device):
        return None
    return FUSED_MAXNREG


def _group_pad(group: int) -> int:
    """Query rows of a KV group as the ``tl.dot`` M dimension: a power of two >= MIN_DOT_ROWS."""
    return max(MIN_DOT_ROWS, triton.next_power_of_2(group))


def _pass_a_group_args(group: int) -> dict[str, int]:
    """A Pass A kernel's KV-group constants: the group's heads, its dot rows (:func:`_group_pad`) and the
    per-head top-k's rows (the heads rounded up to a power of two) with their log2."""
    head_rows = triton.next_power_of_2(group)
    return {"GROUP_SIZE": group, "GROUP_PAD": _group_pad(group), "HEAD_ROWS": head_rows,
            "LOG_HEAD_ROWS": head_rows.bit_length() - 1}


def _dot_precision(dtype: torch.dtype) -> str:
    """IEEE float32 dots for float32 inputs; half-precision inputs use tensor cores either way."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_request(k_cache: torch.Tensor, req: CaptureRequest) -> None:
    """Reject requests the kernels do not handle, with a readable error."""
    rows, num_heads, head_dim = req.q.shape
    if k_cache.dim() != 4 or k_cache.shape[3] != head_dim or num_heads % k_cache.shape[2]:
        raise ValueError(f"q {tuple(req.q.shape)} does not fit cache {tuple(k_cache.shape)}")
    if head_dim < 16 or head_dim & (head_dim - 1) or (req.rope_cos is not None and head_dim < 32):
        raise ValueError(f"head_dim must be a power of two >= 16 (>= 32 with rope), got {head_dim}")
    block_size = k_cache.shape[1]
    if block_size < 8 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 8, got {block_size}")
    if req.q.dtype != k_cache.dtype or req.q.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("q and k_cache must share a dtype and be contiguous in head_dim")
    for name in ("query_pos", "mask_prefix", "window", "sink_tokens"):
        t = getattr(req, name)
        if t.dtype != torch.int32 or t.shape != (rows,) or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous int32 [{rows}] tensor")
    if req.block_tables.dtype != torch.int32 or req.block_tables.shape[0] != rows or req.block_tables.stride(1) != 1:
        raise ValueError("block_tables must be int32 [R, max_blocks] with contiguous rows")
    if req.head_weights.dtype != torch.float32 or req.head_weights.shape != (rows, num_heads):
        raise ValueError(f"head_weights must be float32 [{rows}, {num_heads}]")
    if req.head_weights.stride(1) != 1:
        raise ValueError("head_weights rows must be contiguous")
    for name, k in (("top_k", req.top_k), ("head_top_k", req.head_top_k)):
        if not 0 <= k <= MAX_TOP_K:
            raise ValueError(f"{name}={k} is outside [0, {MAX_TOP_K}]")
    if (req.rope_cos is None) != (req.rope_sin is None):
        raise ValueError("rope_cos and rope_sin must be given together")
    if req.rope_cos is not None:
        if req.rope_cos.shape[1:] != (head_dim,) or req.rope_sin.shape != req.rope_cos.shape:
            raise ValueError(f"rope tables must be [max_pos, {head_dim}]")
        if req.rope_cos.stride() != req.rope_sin.stride() or req.rope_cos.stride(1) != 1:
            raise ValueError("rope tables must share a row-major layout")
        # One host sync, de-rotation only, and skipped while a CUDA graph records (a sync would end the
        # recording): graph launches come from the engine, whose tables cover its whole context length.
        capturing = req.q.is_cuda and torch.cuda.is_current_stream_capturing()
        if rows and not capturing and req.rope_cos.shape[0] < int(req.query_pos.max()) + 1:
            raise ValueError("rope tables cover fewer positions than the rows attend")


def _logits_fit(rows: int, num_heads: int, positions: int, logit_store_bytes: int) -> bool:
    """Whether Pass A stores the logits of ``rows`` rows (float32 ``[rows, num_heads, positions]``): they fit in
    ``logit_store_bytes`` and a row spans at most ``DENSE_MAX_LISTS`` chunks."""
    return rows * num_heads * positions * 4 <= logit_store_bytes and positions <= DENSE_MAX_LISTS * DENSE_MAX_CHUNK


def _empty_partials(rows: int, num_heads: int, num_splits: int, req: CaptureRequest, num_tiles: int,
                    device: torch.device, logit_store_bytes: int) -> PassAOutputs:
    """Pass A outputs: stats ``[R, Hq, S, STAT_WIDTH]``, per-head keys ``[R, Hq, S, TOPK_SLOTS]``, and
    for the head-mean top-k either logits ``[R, Hq, num_tiles * TILE_N]`` (when they fit in
    ``logit_store_bytes`` and ``DENSE_MAX_LISTS`` chunks) or tile maxima ``[R, Hq, num_tiles]``
    (for re-reading keys); 1-element dummies for what is not needed; and the finish tickets
    (``[R, FINISH_TICKETS]`` int32, zeroed by Pass A).

    The stats are a view of a ``[R, STAT_WIDTH, Hq, S]`` buffer, so the combine kernel reads
    each statistic of all heads and splits as one contiguous block.
    """
    stats = torch.empty((rows, STAT_WIDTH, num_heads, num_splits), dtype=torch.float32,
                        device=device).permute(0, 2, 3, 1)
    if req.head_top_k:
        keys = torch.empty((rows, num_heads, num_splits, TOPK_SLOTS), dtype=torch.int64, device=device)
    else:
        keys = torch.empty((1, 1, 1, 1), dtype=torch.int64, device=device)
    dummy = torch.empty((1, 1, 1), dtype=torch.float32, device=device)
    tile_max = logits = dummy
    if req.top_k:
        positions = num_tiles * _tile_tokens(req.q.shape[2])
        if _logits_fit(rows, num_heads, positions, logit_store_bytes):
            logits = torch.empty((rows, num_heads, positions), dtype=torch.float32, device=device)
        else:
            tile_max = torch.empty((rows, num_heads, num_tiles), dtype=torch.float32, device=device)
    tickets = torch.empty((max(rows, 1), FINISH_TICKETS), dtype=torch.int32, device=device)
    return PassAOutputs(stats, keys, tile_max, logits, logits is not dummy, tickets)


def _final_topk(keys: torch.Tensor, k: int, empty_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Final top-``k`` positions (int32) and values (float32) of per-split keys ``[..., S, TOPK_SLOTS]``."""
    lead, num_splits = keys.shape[:-2], keys.shape[-2]
    flat = keys.reshape(-1, num_splits, TOPK_SLOTS)
    if flat.shape[0] and num_splits > MERGE_FAN_IN:  # a first level in parallel, so no row merges many lists
        groups = triton.cdiv(num_splits, MERGE_FAN_IN)
        merged = torch.empty((flat.shape[0], groups, TOPK_SLOTS), dtype=torch.int64, device=keys.device)
        _merge_lists_kernel[(flat.shape[0], groups)](
            flat, merged, num_splits, k, flat.stride(0), flat.stride(1), merged.stride(0), merged.stride(1),
            FAN_IN=MERGE_FAN_IN, num_warps=MERGE_NUM_WARPS,
        )
        flat, num_splits = merged, groups
    pos = torch.empty((flat.shape[0], k), dtype=torch.int32, device=keys.device)
    values = torch.empty((flat.shape[0], k), dtype=torch.float32, device=keys.device)
    if flat.shape[0]:
        _merge_topk_kernel[(flat.shape[0],)](
            flat, pos, values, num_splits, k, empty_value, flat.stride(0), flat.stride(1), pos.stride(0),
            LISTS_PAD=max(2, triton.next_power_of_2(num_splits)),
            num_warps=MERGE_NUM_WARPS,
        )
    return pos.view(*lead, k), values.view(*lead, k)


def _num_key_tiles(block_tables: torch.Tensor, block_size: int, head_dim: int) -> int:
    """Key tiles of ``TILE_N`` positions covering the block tables' width."""
    return triton.cdiv(block_tables.shape[1] * block_size, _tile_tokens(head_dim))


def _rope_args(req: CaptureRequest, k_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """Kernel arguments for de-rotation: tables (``k_cache`` as unused dummies), row stride, flag."""
    if req.rope_cos is None:
        return k_cache, k_cache, 0, False
    return req.rope_cos, req.rope_sin, req.rope_cos.stride(0), True


def _tiles_per_program(rows: int, num_listed: int, device: torch.device) -> int:
    """Tiles per Pass B program: about ``PASS_B_PROGRAMS_PER_SM`` programs per SM over ``rows * num_listed``
    tiles (a power of two, <= MAX_TILES_PER_PROGRAM)."""
    wanted = triton.cdiv(max(rows * num_listed, 1), PASS_B_PROGRAMS_PER_SM * _num_sms(device))
    return min(MAX_TILES_PER_PROGRAM, triton.next_power_of_2(wanted))


@dataclass
class DeferredFinish:
    """One finish launch for the captures of ``slots`` layers over the same rows (:func:`paged_decode_attention_capture`).

    Each layer's call runs Pass A into its slot of buffers stacked ``[slots * R, ...]`` and the
    attention's own split merge, and returns its result as views of stacked result tensors;
    the call that fills the last slot runs the finish for every slot at once (its per-row
    settings repeat every ``R`` rows). One launch over all captured layers replaces one per
    layer: on an H100 a finish over 128 rows took 95 us against 4 x 32.6 us over 32 rows each
    (Llama-1B heads, 8K context, raw top-32). The calls must share the batch, rows, request
    settings and split count (the same decode step's layers) and run in slot order on one
    stream; readers of any slot's result come after the last call. Where the stacked logits
    do not fit the store budget, or with per-head top-k, the calls finish one by one
    (``active`` turns false at the first call).
    """

    slots: int
    taken: int = 0
    active: bool = True
    partials: PassAOutputs | None = None
    outputs: CaptureResult | None = None


@dataclass
class SplitCombine:
    """A split decode kernel's per-split outputs, merged into ``out``/``lse`` by the capture's finish launch."""

    part_out: torch.Tensor
    part_lse: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor


def _dense_chunk(width: int) -> int:
    """Positions per Pass B chunk program over a ``width``-wide row of stored logits (a power of two)."""
    return max(DENSE_CHUNK, triton.next_power_of_2(triton.cdiv(width, DENSE_MAX_LISTS)))


def _finish_outputs(rows: int, num_heads: int, top_k: int, device: torch.device) -> CaptureResult:
    """The finish launch's result tensors for ``rows`` capture rows (``topk_pos``/``topk_prob`` when
    ``top_k``), allocated before it so that stacked layers can hand out views of them early."""
    f32 = {"dtype": torch.float32, "device": device}
    topk_pos = torch.empty((rows, top_k), dtype=torch.int32, device=device) if top_k else None
    topk_prob = torch.empty((rows, top_k), **f32) if top_k else None
    return CaptureResult(torch.empty((rows, num_heads), **f32), torch.empty((rows, NUM_BINS), **f32),
                         torch.empty((rows,), **f32), torch.empty((rows,), **f32),
                         torch.empty((rows,), dtype=torch.int32, device=device), topk_pos, topk_prob, None, None, None)


def _finish(k_cache: torch.Tensor, req: CaptureRequest, scale: float, partials: PassAOutputs,
            combine: SplitCombine | None = None, outputs: CaptureResult | None = None) -> CaptureResult:
    """Everything after Pass A: the combine and, from stored logits, Pass B in one launch of
    :func:`_capture_finish_kernel` (with ``combine``, the attention's split merge too); then the
    per-head top-k merge and the key re-reading Pass B where they apply.

    ``partials`` may stack several layers' Pass A outputs over ``req``'s rows (a multiple of
    its ``R`` rows; :class:`DeferredFinish`); ``outputs`` (from :func:`_finish_outputs`) are
    filled in place of new tensors when given."""
    row_period, num_heads, head_dim = req.q.shape
    stats = partials.stats
    rows, num_splits = stats.shape[0], stats.shape[2]
    device = k_cache.device
    k = req.top_k
    head_pos = head_logit = recomputed = None
    stored_topk = bool(k) and partials.stores_logits
    if outputs is None:
        outputs = _finish_outputs(rows, num_heads, k if stored_topk else 0, device)
    lse, hist, entropy, sink_mass, num_stat, topk_pos, topk_prob = (
        outputs.lse, outputs.hist, outputs.entropy, outputs.sink_mass, outputs.num_stat_positions, outputs.topk_pos,
        outputs.topk_prob)
    head_stats = torch.empty((rows, num_heads, HEAD_STATS), dtype=torch.float32, device=device)
    heads_pad = max(2, triton.next_power_of_2(num_heads))
    width, num_blocks, num_chunks, block, chunk = 0, 0, 0, TOPK_SLOTS, TOPK_SLOTS
    probs = scratch = partials.tickets
    if stored_topk:
        width = partials.logits.shape[2]
        chunk = _dense_chunk(width)
        block = min(chunk, DENSE_BLOCK, max(TOPK_SLOTS, DENSE_LOAD_ELEMENTS // heads_pad))
        num_blocks, num_chunks = triton.cdiv(width, block), triton.cdiv(width, chunk)
        probs = torch.empty((rows, width), dtype=torch.float32, device=device)
        scratch = torch.empty((rows, num_chunks, TOPK_SLOTS), dtype=torch.int64, device=device)
    attention = combine or SplitCombine(stats, stats, stats, stats)
    splits_pad = max(2, triton.next_power_of_2(num_splits))
    num_sms = _num_sms(device)
    head_group = 1
    if rows * num_heads > num_sms:
        head_group = max(1, min(heads_pad, COMBINE_ELEMENTS // (NUM_BINS * splits_pad)))
    num_head_groups = triton.cdiv(num_heads, head_group)
    programs = rows * (num_blocks + num_head_groups) + (combine.out.shape[0] * num_heads if combine else 0)
    wide = rows * num_blocks >= FINISH_WIDE_BLOCKS_PER_SM * num_sms
    if programs:
        _capture_finish_kernel[(programs,)](
            stats, req.head_weights, req.query_pos, req.mask_prefix, req.window, req.sink_tokens, partials.tickets,
            lse, head_stats, hist, entropy, sink_mass, num_stat,
            partials.logits, probs, scratch, topk_pos if stored_topk else scratch, topk_prob if stored_topk else lse,
            attention.part_out, attention.part_lse, attention.out, attention.lse,
            rows, num_heads, num_head_groups, num_splits, width, num_blocks, num_chunks, k, row_period,
            int(rows <= MERGE_TREE_MAX_ROWS), *stats.stride(), req.head_weights.stride(0), partials.tickets.stride(0),
            *partials.logits.stride()[:2],
            probs.stride(0), *scratch.stride()[:2], topk_pos.stride(0) if stored_topk else 0,
            *attention.part_out.stride()[:3], *attention.part_lse.stride()[:3], *attention.out.stride()[:2],
            *attention.lse.stride()[:2],
            SPLITS_PAD=splits_pad,
            HEADS_PAD=heads_pad,
            TOPK=stored_topk,
            BLOCK=block,
            CHUNK=chunk,
            LOG_LISTS=LOG_DENSE_MAX_LISTS,
            RADIX_BITS=DENSE_TOPK_RADIX_BITS,
            COMBINE_OUT=combine is not None,
            HEAD_DIM=head_dim,
            HEAD_GROUP=head_group,
            num_warps=SPLIT_COMBINE_NUM_WARPS,
            maxnreg=FINISH_WIDE_MAXNREG if wide else None,
        )
    if req.head_top_k:
        head_pos, head_logit = _final_topk(partials.head_keys, req.head_top_k, float("-inf"))
    if k and not stored_topk:
        topk_pos, topk_prob, recomputed = _mean_topk(k_cache, req, scale, lse, partials)
    return CaptureResult(lse, hist, entropy, sink_mass, num_stat, topk_pos, topk_prob, head_pos, head_logit,
                         recomputed)


def dense_topk(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` positions (int32) and values of dense ``p̄`` rows ``[R, width]`` (``-inf`` outside ``W``).

    Ranked by value descending, then position ascending; -1 / 0 past ``|W|`` -- the
    ordering of ``capture_rows_ref``. One program per row and chunk finds its chunk's top-k
    without sorting the chunk, the row's last chunk merging the chunks' lists
    (:func:`_chunk_topk`). No host sync.
    """
    rows, width = probs.shape
    device = probs.device
    pos = torch.empty((rows, k), dtype=torch.int32, device=device)
    values = torch.empty((rows, k), dtype=torch.float32, device=device)
    if not rows or not width:
        return pos.fill_(-1), values.zero_()
    if width > DENSE_TOPK_MAX_WIDTH:
        raise ValueError(f"dense_topk ranks rows of up to {DENSE_TOPK_MAX_WIDTH} positions, got {width}")
    chunk = _dense_chunk(width)
    num_chunks = triton.cdiv(width, chunk)
    scratch = torch.empty((rows, num_chunks, TOPK_SLOTS), dtype=torch.int64, device=device)
    tickets = torch.zeros((rows, DENSE_MAX_LISTS), dtype=torch.int32, device=device)
    _dense_topk_kernel[(rows, num_chunks)](
        probs, scratch, tickets, pos, values, width, k, num_chunks, probs.stride(0), *scratch.stride()[:2],
        pos.stride(0), int(rows <= MERGE_TREE_MAX_ROWS),
        CHUNK=chunk, LOG_LISTS=LOG_DENSE_MAX_LISTS, RADIX_BITS=DENSE_TOPK_RADIX_BITS, num_warps=DENSE_TOPK_NUM_WARPS,
    )
    return pos, values


def _mean_topk(
    k_cache: torch.Tensor, req: CaptureRequest, scale: float, lse: torch.Tensor, partials: PassAOutputs
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pass B when Pass A kept tile maxima instead of logits: exact head-mean top-k positions and ``p̄``.

    (Stored logits -- 4 bytes per head and position, a small fraction of the key bytes a
    re-read moves -- are ranked in the finish launch instead: :func:`_stored_block_topk`.)
    Only candidate key tiles are re-read: from Pass A's per-head tile maxima and the final
    ``lse``, ``_tile_bounds_kernel`` bounds ``p̄`` per tile from above and below. Round 1 recomputes ``p̄`` exactly on the ``k`` tiles
    with the best lower bounds; the ``k``-th best value found there is a floor under the
    true ``k``-th value. Round 2 recomputes every tile whose upper bound reaches that floor
    (with a relative margin for rounding), keeps each chunk's top-k keys at or above the
    floor, and ``_merge_topk_kernel`` merges the chunks -- exact, ties broken by position,
    since a skipped tile or key holds only values below the true ``k``-th. How many tiles are re-read
    depends on the attention: peaked rows re-read a few tiles, flat ones (where no tile's
    bound falls below the floor) all of ``W``. Returns ``(pos, prob, recomputed_tiles)``
    (key tiles re-read per row); ranks past ``|W|`` are position -1 / value 0. Temporary
    memory per row: 4 bytes per head and tile (Pass A's maxima), 8 per tile for the bounds,
    512 per program's chunk keys. No host sync.
    """
    tile_max = partials.tile_max
    rows, num_heads, head_dim = req.q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    num_tiles = tile_max.shape[2]
    tile_n = _tile_tokens(head_dim)
    k = req.top_k
    device = k_cache.device
    recomputed = torch.zeros((rows,), dtype=torch.int32, device=device)
    if not rows:
        empty = torch.empty((0, k), device=device)
        return empty.int(), empty, recomputed
    upper = torch.empty((rows, num_tiles), dtype=torch.float32, device=device)
    lower = torch.empty_like(upper)
    _tile_bounds_kernel[(rows, triton.cdiv(num_tiles, BOUNDS_BLOCK))](
        tile_max, req.head_weights, lse, req.query_pos, req.mask_prefix, req.window, req.sink_tokens,
        upper, lower, num_heads, num_tiles, tile_max.stride(0), tile_max.stride(1), req.head_weights.stride(0),
        lse.stride(0), upper.stride(0),
        TILE_N=tile_n, BLOCK_T=BOUNDS_BLOCK, HEADS_PAD=max(2, triton.next_power_of_2(num_heads)),
        num_warps=BOUNDS_NUM_WARPS,
    )
    cos, sin, stride_rope, rope = _rope_args(req, k_cache)

    def chunk_topk(tile_ids: torch.Tensor | None, num_listed: int,
                   floor: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k positions and ``p̄`` (-1 / 0 padded) over the listed tiles whose bound reaches ``floor``."""
        per_program = _tiles_per_program(rows, num_listed, device)
        num_chunks = triton.cdiv(num_listed, per_program)
        keys = torch.empty((rows, num_chunks, TOPK_SLOTS), dtype=torch.int64, device=device)
        ids = upper if tile_ids is None else tile_ids
        _tile_mean_topk_kernel[(rows, num_chunks)](
            req.q, k_cache, req.block_tables, req.query_pos, req.mask_prefix, req.window, req.sink_tokens,
            req.head_weights, lse, cos, sin, ids, upper, upper if floor is None else floor, keys,
            recomputed, scale, num_listed, num_kv_heads, k,
            req.q.stride(0), req.q.stride(1), *k_cache.stride()[:3], req.block_tables.stride(0), stride_rope,
            req.head_weights.stride(0), lse.stride(0), ids.stride(0), upper.stride(0), keys.stride(0),
            keys.stride(1),
            GROUP_SIZE=group,
            GROUP_PAD=_group_pad(group),
            HEAD_DIM=head_dim,
            BLOCK_SIZE=block_size,
            TILE_N=tile_n,
            TILES_PER_PROGRAM=per_program,
            DOT_PRECISION=_dot_precision(req.q.dtype),
            ROPE=rope,
            LISTED=tile_ids is not None,
            FLOORED=floor is not None,
            num_warps=PASS_B_ROPE_NUM_WARPS if rope else PASS_B_NUM_WARPS,
        )
        return _final_topk(keys, k, 0.0)

    floor = None
    if num_tiles > FLOOR_MIN_TILES_PER_K * k:
        seeds = torch.topk(lower, k, dim=1, sorted=False).indices
        floor = chunk_topk(seeds, k, None)[1][:, k - 1].contiguous()
    pos, prob = chunk_topk(None, num_tiles, floor)
    return pos, prob, recomputed


def attention_capture(
    k_cache: torch.Tensor, req: CaptureRequest, scale: float, num_splits: int | None = None,
    logit_store_bytes: int = LOGIT_STORE_MAX_BYTES,
) -> CaptureResult:
    """Capture every row of ``req`` from the paged ``k_cache`` ``[blocks, block_size, Hkv, D]``.

    Same contract and results as ``capture_rows_ref`` (float32 outputs on ``k_cache``'s
    device), computed by standalone Pass A over ``U`` (``num_splits`` splits per row, picked
    from the table width by default), the combine kernel, and Pass B when ``req.top_k > 0``
    (from logits Pass A stored when they fit in ``logit_store_bytes``, else re-reading keys).
    Handles de-rotation (``rope_cos``/``rope_sin``).
    """
    _check_request(k_cache, req)
    rows, num_heads, head_dim = req.q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    if num_splits is None:
        max_len = req.block_tables.shape[1] * block_size
        num_splits = default_num_splits(rows, num_kv_heads, max_len, _num_sms(k_cache.device), head_dim)
    partials = _empty_partials(rows, num_heads, num_splits, req, _num_key_tiles(req.block_tables, block_size, head_dim),
                               k_cache.device, logit_store_bytes)
    cos, sin, stride_rope, rope = _rope_args(req, k_cache)
    if rows:
        _capture_split_kernel[(rows, num_kv_heads, num_splits)](
            req.q, k_cache, req.block_tables, req.query_pos, req.mask_prefix, req.window, req.sink_tokens,
            cos, sin, partials.stats, partials.head_keys, partials.tile_max, partials.logits, partials.tickets,
            scale, num_splits, req.head_top_k,
            req.q.stride(0), req.q.stride(1), *k_cache.stride()[:3], req.block_tables.stride(0), stride_rope,
            *partials.stats.stride(), *partials.head_keys.stride()[:3], *partials.tile_max.stride()[:2],
            *partials.logits.stride()[:2],
            **_pass_a_group_args(group),
            HEAD_DIM=head_dim,
            BLOCK_SIZE=block_size,
            TILE_N=_tile_tokens(head_dim),
            DOT_PRECISION="ieee" if rope else _dot_precision(req.q.dtype),
            ROPE=rope,
            HEAD_TOPK=req.head_top_k > 0,
            TILE_MAX=req.top_k > 0 and not partials.stores_logits,
            STORE_LOGITS=partials.stores_logits,
            STATS=req.statistics,
            num_warps=PASS_A_NUM_WARPS,
        )
    return _finish(k_cache, req, scale, partials)


def dense_mean_probs(k_cache: torch.Tensor, req: CaptureRequest, scale: float, lse: torch.Tensor) -> torch.Tensor:
    """Dense ``p̄`` ``[R, max_blocks * block_size]`` float32 of every row over ``W`` (``-inf`` elsewhere).

    ``lse`` ``[R, Hq]`` are the heads' logsumexps over ``U`` (a capture's ``lse``). A
    tensor-parallel rank's share of the head mean: with ``req`` holding the rank's heads and
    their global weights, the ranks' outputs sum to ``p̄`` over all heads. Re-reads the keys
    of the tiles touching ``W`` (one program per row and key tile); no host sync.
    """
    _check_request(k_cache, req)
    rows, num_heads, head_dim = req.q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    width = req.block_tables.shape[1] * block_size
    tile_n = _tile_tokens(head_dim)
    out = torch.empty((rows, width), dtype=torch.float32, device=k_cache.device)
    cos, sin, stride_rope, rope = _rope_args(req, k_cache)
    if rows and width:
        _dense_mean_probs_kernel[(rows, triton.cdiv(width, tile_n))](
            req.q, k_cache, req.block_tables, req.query_pos, req.mask_prefix, req.window, req.sink_tokens,
            req.head_weights, lse, cos, sin, out, scale, num_kv_heads, width,
            req.q.stride(0), req.q.stride(1), *k_cache.stride()[:3], req.block_tables.stride(0), stride_rope,
            req.head_weights.stride(0), lse.stride(0), out.stride(0),
            GROUP_SIZE=group,
            GROUP_PAD=_group_pad(group),
            HEAD_DIM=head_dim,
            BLOCK_SIZE=block_size,
            TILE_N=tile_n,
            DOT_PRECISION="ieee" if rope else _dot_precision(req.q.dtype),
            ROPE=rope,
            num_warps=PASS_B_ROPE_NUM_WARPS if rope else PASS_B_NUM_WARPS,
        )
    return out


def partial_capture(k_cache: torch.Tensor, req: CaptureRequest, scale: float,
                    stats: CaptureResult | None = None) -> PartialCapture:
    """A tensor-parallel rank's ``PartialCapture`` of ``req`` (the rank's heads, global head weights).

    Same contract as ``partial_capture_ref``: statistics from Pass A and the combine
    (:func:`attention_capture` without top-k, unless the decode kernel already computed them
    as ``stats``), and when ``req.top_k > 0`` the dense ``p̄`` share of :func:`dense_mean_probs`.
    """
    if stats is None:
        stats = attention_capture(k_cache, replace(req, top_k=0, head_top_k=0), scale)
    return PartialCapture(stats, dense_mean_probs(k_cache, req, scale, stats.lse) if req.top_k else None)


def paged_decode_attention_capture(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    capture: CaptureRequest,
    capture_rows: torch.Tensor,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    logit_store_bytes: int = LOGIT_STORE_MAX_BYTES,
    deferred: DeferredFinish | None = None,
) -> tuple[torch.Tensor, torch.Tensor, CaptureResult]:
    """Decode attention of the whole batch with capture of the decode rows ``capture_rows``.

    ``paged_decode_attention(..., capture=, capture_rows=)`` lands here. ``capture_rows``
    ``[R]`` indexes the batch (a row of ``-1`` matches no decode row: padding whose results
    are not read), and each captured row's ``query_pos`` must be its ``context_lens - 1``
    (its keys are read through the decode ``block_tables``). Pass A runs inside the
    attention kernel: captured rows reuse the attention's logits and running max, other rows
    run the plain tile loop (one branch per program). Returns ``(out, lse, CaptureResult)``
    with ``out``/``lse`` as the plain kernel's. ``logit_store_bytes`` as in
    :func:`attention_capture`.

    Without rope tables ``capture.q`` (``[R, Hq, D]``) is read for its shape only: the
    kernels take the captured rows' queries from ``q`` through ``capture_rows`` (gathered
    here only when Pass B re-reads keys), so a caller need not gather them -- a gather
    kernel per captured layer that the CUDA-graph step would otherwise run. With rope
    tables (de-rotated logits differ from the attention's) ``capture.q`` holds the
    un-rotated queries, and the plain kernel and :func:`attention_capture` run one after
    the other instead.

    With ``deferred`` the call takes the next slot of a :class:`DeferredFinish` shared by the
    step's captured layers: its result's tensors are filled by the finish launch of the call
    that takes the last slot.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, context_lens, out)
    _check_request(k_cache, capture)
    batch, num_heads, head_dim = q.shape
    rows = capture.q.shape[0]
    if capture.q.shape[1:] != q.shape[1:] or capture_rows.shape != (rows,):
        raise ValueError(f"capture.q {tuple(capture.q.shape)} / capture_rows do not fit q {tuple(q.shape)}")
    if capture_rows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"capture_rows must be int32 or int64, got {capture_rows.dtype}")
    if capture.rope_cos is not None:
        out, lse = paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, out)
        return out, lse, attention_capture(k_cache, capture, scale, logit_store_bytes=logit_store_bytes)

    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    if num_splits is None:
        max_len = block_tables.shape[1] * block_size
        num_splits = default_num_splits(batch, num_kv_heads, max_len, _num_sms(q.device), head_dim)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty((batch, num_heads), dtype=torch.float32, device=q.device)
    if num_splits == 1:
        part_out, part_lse = out, lse
        part_out_strides = (out.stride(0), out.stride(1), 0)
        part_lse_strides = (lse.stride(0), lse.stride(1), 0)
    else:
        part_out = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
        part_out_strides = part_out.stride()[:3]
        part_lse_strides = part_lse.stride()
    capture_rows = capture_rows.to(q.device)
    num_tiles = _num_key_tiles(block_tables, block_size, head_dim)
    slot = _take_slot(deferred, rows, num_heads, num_splits, capture, num_tiles, q.device, logit_store_bytes)
    if slot is None:
        partials = _empty_partials(rows, num_heads, num_splits, capture, num_tiles, q.device, logit_store_bytes)
    else:  # no per-head keys or tile maxima here (see _take_slot): those buffers are placeholders
        stacked = deferred.partials
        partials = PassAOutputs(stacked.stats[slot], stacked.head_keys, stacked.tile_max,
                                stacked.logits[slot] if stacked.stores_logits else stacked.logits,
                                stacked.stores_logits, stacked.tickets[slot])

    _fused_decode_capture_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, part_out, part_lse, capture_rows,
        capture.query_pos, capture.mask_prefix, capture.window, capture.sink_tokens, partials.stats,
        partials.head_keys, partials.tile_max, partials.logits, partials.tickets, scale, num_splits,
        capture.head_top_k, rows,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
        *part_out_strides, *part_lse_strides, *partials.stats.stride(), *partials.head_keys.stride()[:3],
        *partials.tile_max.stride()[:2], *partials.logits.stride()[:2],
        **_pass_a_group_args(group),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        TILE_N=_tile_tokens(head_dim),
        DOT_PRECISION=_dot_precision(q.dtype),
        HEAD_TOPK=capture.head_top_k > 0,
        TILE_MAX=capture.top_k > 0 and not partials.stores_logits,
        STORE_LOGITS=partials.stores_logits,
        ROWS_PAD=max(2, triton.next_power_of_2(rows)),
        STATS=capture.statistics,
        num_warps=FUSED_NUM_WARPS,
        maxnreg=_fused_maxnreg(capture.head_top_k, batch * num_kv_heads * num_splits, q.device),
        num_stages=FUSED_NUM_STAGES if capture.statistics else FUSED_NO_STATS_NUM_STAGES,
    )
    if slot is not None:
        if num_splits > 1:
            combine_splits(part_out, part_lse, out, lse)
        if deferred.taken == deferred.slots:
            _finish(k_cache, capture, scale, deferred.partials, outputs=deferred.outputs)
        results = deferred.outputs
        return out, lse, CaptureResult(*(None if t is None else t[slot] for t in (
            results.lse, results.hist, results.entropy, results.sink_mass, results.num_stat_positions,
            results.topk_pos, results.topk_prob)), None, None, None)
    if capture.top_k and not partials.stores_logits:  # Pass B re-reads keys: it needs the rows' queries
        capture = replace(capture, q=q.index_select(0, capture_rows.clamp(min=0)))
    combine = SplitCombine(part_out, part_lse, out, lse) if num_splits > 1 else None
    return out, lse, _finish(k_cache, capture, scale, partials, combine)


def _take_slot(deferred: DeferredFinish | None, rows: int, num_heads: int, num_splits: int, req: CaptureRequest,
               num_tiles: int, device: torch.device, logit_store_bytes: int) -> slice | None:
    """The rows of the stacked buffers this call fills (allocating them at the first call), or ``None`` when the
    call finishes on its own: no ``deferred``, per-head top-k, or stacked logits over the store budget."""
    if deferred is None or not deferred.active or req.head_top_k or deferred.slots < 2:
        return None
    if deferred.taken == deferred.slots:
        raise ValueError(f"a DeferredFinish of {deferred.slots} slots got a call more")
    if deferred.partials is None:
        positions = num_tiles * _tile_tokens(req.q.shape[2])
        if req.top_k and not _logits_fit(deferred.slots * rows, num_heads, positions, logit_store_bytes):
            deferred.active = False
            return None
        deferred.partials = _empty_partials(deferred.slots * rows, num_heads, num_splits, req, num_tiles, device,
                                            logit_store_bytes)
        deferred.outputs = _finish_outputs(deferred.slots * rows, num_heads, req.top_k, device)
    first = deferred.taken * rows
    deferred.taken += 1
    return slice(first, first + rows)
