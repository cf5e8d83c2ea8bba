"""Fused probe estimator, the two Triton kernels (see :mod:`.probe_op` for the definition).

``_log_mass_kernel`` — launch 1, one program per (tile of ``QB`` query blocks, b · KV head). Its
``BLOCK_M`` rows are (query block, GQA head, probe) triples, ``M = QB · G · P`` of them valid;
the probe queries are gathered from q by row index (no copy of q or K is made). It walks the KV
blocks the tile can see: the blocks every row sees in full first (no causal mask), then the
frontier blocks with the causal mask ``key <= probe position``. Per KV block: one ``tl.dot``
``[M, D] x [D, BS]``, the block-local max and ``Σ 2^(s - max)`` in base-2 logits, and one
float32 written per row: ``max + log2(sum)``.

``_log_mass_kstat_kernel`` — launch 1, K-stationary (the default): one program per (chunk of
``KB`` KV blocks, b · KV head) loads its K blocks once and walks the query tiles that see them
(tiles on the causal frontier masked, the rest not), writing the same entries with the same
per-block arithmetic. Each step re-reads a [M, D] probe tile (L2-resident: the probes of a
128K pre-fill are 16 MiB) instead of a [BS, D] K block, so the bytes read per FLOP fall by
``KB · BS / M``.

``_probe_select_kernel`` — launch 2, one program per tile of ``R = BLOCK_G x BLOCK_Q`` rows
(query head, query block), each holding its whole row of KV blocks: per probe the base-2 softmax
of the log-masses over the block-causal row (the exact probe softmax, block-summed), the weighted
average over the probes, then the rule and the block lists through the Prism select kernel's own
pieces (:func:`.select._tile_rows`, :func:`.select._threshold_keep`, :func:`.select._forced_clip`,
:func:`.select._write_lists`, whose top-p rule and tie handling are documented there).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .op import RULE_CODES, _next_pow2
from .select import (
    _forced_clip,
    _program_tile,
    _threshold_keep,
    _threshold_keep_quad,
    _tile_nvis,
    _tile_rows,
    _write_lists,
    pick_search,
)

LOG2E = 1.4426950408889634
# The fixed reference (``reference="fixed"``): each probe row's exponent offset is its own score
# (the probe against its own key, base-2) + REF_MARGIN. A block whose true log-mass is below
# ref - FLUSH_BITS may come back low or -inf (exp2 flushes terms below 2^-126 to zero; the sum
# of a block's flushed terms is below 2^(ref - 119)); its probability in the probe's softmax is
# then below 2^(REF_MARGIN - FLUSH_BITS) = 2^-67 (the own key alone holds 2^-REF_MARGIN of the
# reference). A row in which a block sum overflows (a score above ref + ~120) is recomputed with
# the block max by the repair pass: every entry of such a row is exact. (Blocks of up to 128 keys
# in these bounds; 256, the largest block the estimator takes, moves each by one bit.)
REF_MARGIN = 32.0
FLUSH_BITS = 99.0
REFERENCES = ("block_max", "fixed")


@triton.jit
def _load_kt(k_base, cols, col_ok, offs_d, d_ok, sks, skd):
    """One KV block of K, transposed: [BLOCK_D, BLOCK_N] (zeros outside ``col_ok`` / ``d_ok``)."""
    return tl.load(
        k_base + cols[None, :].to(tl.int64) * sks + offs_d[:, None] * skd,
        mask=d_ok[:, None] & col_ok[None, :],
        other=0.0,
    )


@triton.jit
def _scores(qt, kt, cols, col_ok, apos, CAUSAL: tl.constexpr, IS_F32: tl.constexpr):
    """[M, BLOCK_N] raw dot products of the tile's probes with one KV block (``-inf`` where
    ``CAUSAL`` masks a key: past the probe or outside ``col_ok``)."""
    if IS_F32:
        s = tl.dot(qt, kt, input_precision="ieee")
    else:
        s = tl.dot(qt, kt)
    if CAUSAL:
        s = tl.where(col_ok[None, :] & (cols[None, :] <= apos[:, None]), s, float("-inf"))
    return s


@triton.jit
def _log_mass_of(qt, kt, cols, col_ok, apos, qk_scale, CAUSAL: tl.constexpr,
                 IS_F32: tl.constexpr):  # fmt: skip
    """[M] base-2 log-mass of one KV block (K already loaded as ``kt``) for the tile's rows
    (``-inf`` where a row sees none of its keys).

    The max is taken on the raw dot products (``qk_scale > 0``), the scale folded into the
    exponent: one FMA + one exp2 per score."""
    s = _scores(qt, kt, cols, col_ok, apos, CAUSAL, IS_F32)
    m = tl.max(s, 1)
    if CAUSAL:
        m = tl.where(m == float("-inf"), 0.0, m)
    ms = m * qk_scale
    return ms + tl.log2(tl.sum(tl.exp2(s * qk_scale - ms[:, None]), 1))


@triton.jit
def _ref_log_mass_of(qt, kt, cols, col_ok, apos, qk_scale, ref, CAUSAL: tl.constexpr,
                     IS_F32: tl.constexpr):  # fmt: skip
    """:func:`_log_mass_of` against the rows' fixed references ``ref`` [M] (no block max):
    returns (log-mass [M], overflowed [M]: the block sum is +inf, the row needs the repair)."""
    s = _scores(qt, kt, cols, col_ok, apos, CAUSAL, IS_F32)
    tot = tl.sum(tl.exp2(s * qk_scale - ref[:, None]), 1)
    return ref + tl.log2(tot), tot == float("inf")


@triton.jit
def _block_log_mass(qt, k_base, cols, col_ok, offs_d, d_ok, apos, sks, skd, qk_scale,
                    CAUSAL: tl.constexpr, IS_F32: tl.constexpr):  # fmt: skip
    """:func:`_log_mass_of` of the KV block at ``cols`` (loaded here)."""
    kt = _load_kt(k_base, cols, col_ok, offs_d, d_ok, sks, skd)
    return _log_mass_of(qt, kt, cols, col_ok, apos, qk_scale, CAUSAL, IS_F32)


@triton.jit
def _tile_probe_rows(q_ptr, rows_ptr, t, b, kvh, sqb, sqh, sqs, sqd, offs_d, d_ok,
                     HQ, G, P, SROW, NQB, PREFIX, QB: tl.constexpr,
                     BLOCK_M: tl.constexpr):  # fmt: skip
    """Query tile ``t`` of KV head (b, kvh): its ``BLOCK_M`` rows are (query block, GQA head,
    probe) triples. Returns (row valid [M], the probe queries [M, BLOCK_D], their absolute
    positions [M], their flat index [M] into ``[B, Hq, NQB, P]``, int64)."""
    r = tl.arange(0, BLOCK_M)
    gp = G * P
    il = r // gp
    g = (r // P) % G
    p = r % P
    qi = t * QB + il
    ok = (il < QB) & (qi < NQB)
    qi = tl.where(ok, qi, 0)
    qrow = tl.load(rows_ptr + qi * SROW + p, mask=ok, other=0)
    h = kvh * G + g
    q_rows = q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + qrow.to(tl.int64) * sqs
    qt = tl.load(
        q_rows[:, None] + offs_d[None, :] * sqd, mask=ok[:, None] & d_ok[None, :], other=0.0
    )
    ridx = ((b * HQ + h).to(tl.int64) * NQB + qi) * P + p
    return ok, qt, PREFIX + qrow, ridx


@triton.jit
def _probe_ref_kernel(
    q_ptr,
    k_ptr,
    rows_ptr,
    ref_ptr,
    sqb,
    sqh,
    sqs,
    sqd,
    skb,
    skh,
    sks,
    skd,
    HQ,
    HKV,
    G,
    P,
    SROW,
    D,
    NQB,
    PREFIX,
    qk_scale,
    margin,
    QB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The fixed references, float32 [B, Hq, NQB, P]: each probe's base-2 score against its own
    key + ``margin``. One program per (query tile, b · KV head), the tiles of launch 1."""
    t = tl.program_id(0)
    bkv = tl.program_id(1)
    b = bkv // HKV
    kvh = bkv % HKV
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    ok, qt, apos, ridx = _tile_probe_rows(
        q_ptr, rows_ptr, t, b, kvh, sqb, sqh, sqs, sqd, offs_d, d_ok,
        HQ, G, P, SROW, NQB, PREFIX, QB, BLOCK_M,
    )  # fmt: skip
    k_rows = k_ptr + b.to(tl.int64) * skb + kvh.to(tl.int64) * skh + apos.to(tl.int64) * sks
    kown = tl.load(
        k_rows[:, None] + offs_d[None, :] * skd, mask=ok[:, None] & d_ok[None, :], other=0.0
    )
    own = tl.sum(qt.to(tl.float32) * kown.to(tl.float32), 1)
    tl.store(ref_ptr + ridx, own * qk_scale + margin, mask=ok)


@triton.jit
def _log_mass_kernel(
    q_ptr,
    k_ptr,
    rows_ptr,
    out_ptr,
    flag_ptr,
    sqb,
    sqh,
    sqs,
    sqd,
    skb,
    skh,
    sks,
    skd,
    HQ,
    HKV,
    G,
    P,
    SROW,
    D,
    SQ,
    SK,
    NQB,
    NKB,
    PREFIX,
    qk_scale,
    n_tiles,
    QB: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IS_F32: tl.constexpr,
    REPAIR: tl.constexpr,
):
    """Launch 1, query schedule (block max). ``REPAIR``: the fixed reference's repair pass —
    only the rows flagged in ``flag_ptr`` [B, Hq, NQB, P] are computed and written (a tile with
    none walks no KV block)."""
    t = n_tiles - 1 - tl.program_id(0)  # largest tiles (most KV blocks) first
    bkv = tl.program_id(1)
    b = bkv // HKV
    kvh = bkv % HKV
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    ok, qt, apos, ridx = _tile_probe_rows(
        q_ptr, rows_ptr, t, b, kvh, sqb, sqh, sqs, sqd, offs_d, d_ok,
        HQ, G, P, SROW, NQB, PREFIX, QB, BLOCK_M,
    )  # fmt: skip
    out_rows = out_ptr + ridx * NKB
    k_base = k_ptr + b.to(tl.int64) * skb + kvh.to(tl.int64) * skh

    i_first = t * QB
    i_last = tl.minimum(i_first + QB, NQB) - 1
    n_kv = (PREFIX + tl.minimum((i_last + 1) * BS, SQ) - 1) // BS + 1
    if REPAIR:
        ok = ok & (tl.load(flag_ptr + ridx, mask=ok, other=0) != 0)
        n_kv = tl.where(tl.max(ok.to(tl.int32), 0) > 0, n_kv, 0)
    # every row of the tile sits at or after the tile's first query row: the KV blocks that end
    # there are seen in full by every row
    n_full = tl.minimum((PREFIX + i_first * BS + 1) // BS, n_kv)
    offs_n = tl.arange(0, BLOCK_N)
    for j in range(0, n_full):
        cols = j * BS + offs_n
        if BLOCK_N == BS:
            lm = _block_log_mass(qt, k_base, cols, offs_n < BS, offs_d, d_ok, apos, sks, skd,
                                 qk_scale, False, IS_F32)  # fmt: skip
        else:
            lm = _block_log_mass(qt, k_base, cols, offs_n < BS, offs_d, d_ok, apos, sks, skd,
                                 qk_scale, True, IS_F32)  # fmt: skip
        tl.store(out_rows + j, lm, mask=ok)
    for j in range(n_full, n_kv):
        cols = j * BS + offs_n
        col_ok = (offs_n < BS) & (cols < SK)
        lm = _block_log_mass(qt, k_base, cols, col_ok, offs_d, d_ok, apos, sks, skd, qk_scale,
                             True, IS_F32)  # fmt: skip
        tl.store(out_rows + j, lm, mask=ok)


@triton.jit
def _stored_log_mass(qt, kt, cols, col_ok, apos, qk_scale, out_rows, j, store_ok, ref, flags,
                     CAUSAL: tl.constexpr, IS_F32: tl.constexpr,
                     FIXED: tl.constexpr):  # fmt: skip
    """One (tile, KV block) entry of launch 1 written: block max, or the fixed reference with
    its overflowed rows flagged for the repair pass."""
    if FIXED:
        lm, over = _ref_log_mass_of(qt, kt, cols, col_ok, apos, qk_scale, ref, CAUSAL, IS_F32)
        tl.store(flags, over.to(tl.int32), mask=store_ok & over)
    else:
        lm = _log_mass_of(qt, kt, cols, col_ok, apos, qk_scale, CAUSAL, IS_F32)
    tl.store(out_rows + j, lm, mask=store_ok)


@triton.jit
def _kstat_tile(q_ptr, rows_ptr, out_ptr, ref_ptr, flag_ptr, t, b, kvh, sqb, sqh, sqs, sqd,
                offs_d, d_ok, kt0, kt1, cols0, ok0, cols1, ok1, j0, j1, HQ, G, P, SROW, NQB,
                NKB, PREFIX, qk_scale, QB: tl.constexpr, KB: tl.constexpr,
                BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, IS_F32: tl.constexpr,
                FIXED: tl.constexpr):  # fmt: skip
    """Query tile ``t`` against the program's ``KB`` KV blocks (j0, j1): their log-masses stored.
    Only a masked tile can meet a second block past the last one (the chunk reaching past Sk
    is masked everywhere), so only there does that store need the ``j1 < NKB`` test."""
    ok, qt, apos, ridx = _tile_probe_rows(
        q_ptr, rows_ptr, t, b, kvh, sqb, sqh, sqs, sqd, offs_d, d_ok,
        HQ, G, P, SROW, NQB, PREFIX, QB, BLOCK_M,
    )  # fmt: skip
    out_rows = out_ptr + ridx * NKB
    if FIXED:
        ref = tl.load(ref_ptr + ridx, mask=ok, other=0.0)
    else:
        ref = apos  # unused
    _stored_log_mass(qt, kt0, cols0, ok0, apos, qk_scale, out_rows, j0, ok, ref,
                     flag_ptr + ridx, CAUSAL, IS_F32, FIXED)  # fmt: skip
    if KB == 2:
        if CAUSAL:  # (a tensor mask: the interpreter takes no scalar & tensor)
            ok1_rows = ok & ((apos * 0 + j1) < NKB)
        else:
            ok1_rows = ok
        _stored_log_mass(qt, kt1, cols1, ok1, apos, qk_scale, out_rows, j1, ok1_rows, ref,
                         flag_ptr + ridx, CAUSAL, IS_F32, FIXED)  # fmt: skip


@triton.jit
def _log_mass_kstat_kernel(
    q_ptr,
    k_ptr,
    rows_ptr,
    out_ptr,
    ref_ptr,
    flag_ptr,
    sqb,
    sqh,
    sqs,
    sqd,
    skb,
    skh,
    sks,
    skd,
    HQ,
    HKV,
    G,
    P,
    SROW,
    D,
    SQ,
    SK,
    NQB,
    NKB,
    PREFIX,
    qk_scale,
    n_tiles,
    QB: tl.constexpr,
    BS: tl.constexpr,
    KB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IS_F32: tl.constexpr,
    FIXED: tl.constexpr,
):
    """Launch 1, K-stationary schedule: one program per (chunk of ``KB`` KV blocks, b · KV head)
    holds its K blocks and walks the query tiles that see them (Q is re-read, K read once).
    ``FIXED``: exponents against the rows' fixed references ``ref_ptr`` (overflowed rows flagged
    in ``flag_ptr``), else against each block's max."""
    c = tl.program_id(0)  # chunk 0 (seen by every query tile: the most work) first
    bkv = tl.program_id(1)
    b = bkv // HKV
    kvh = bkv % HKV
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_n = tl.arange(0, BLOCK_N)
    k_base = k_ptr + b.to(tl.int64) * skb + kvh.to(tl.int64) * skh
    j0 = c * KB
    cols0 = j0 * BS + offs_n
    ok0 = (offs_n < BS) & (cols0 < SK)
    kt0 = _load_kt(k_base, cols0, ok0, offs_d, d_ok, sks, skd)
    j1 = j0 + 1
    cols1 = j1 * BS + offs_n
    ok1 = (offs_n < BS) & (cols1 < SK)
    if KB == 2:
        kt1 = _load_kt(k_base, cols1, ok1, offs_d, d_ok, sks, skd)
    else:
        kt1 = kt0  # unused (KB == 1)
    # the first query block whose last row sees the chunk's first key, and its tile
    t_start = (tl.maximum(j0 * BS - PREFIX, 0) // BS) // QB
    # tiles whose first row sits at or after the chunk's last key see all of it (no mask);
    # a chunk that reaches past Sk or a padded block (BLOCK_N > BS) is masked everywhere
    key_hi = (j0 + KB) * BS - 1
    t_full = tl.maximum(key_hi - PREFIX + QB * BS - 1, 0) // (QB * BS)
    if BLOCK_N != BS:
        t_full = n_tiles
    t_full = tl.where(key_hi >= SK, n_tiles, t_full)
    t_full = tl.minimum(tl.maximum(t_full, t_start), n_tiles)
    for t in range(t_start, t_full):
        _kstat_tile(
            q_ptr, rows_ptr, out_ptr, ref_ptr, flag_ptr, t, b, kvh, sqb, sqh, sqs, sqd,
            offs_d, d_ok, kt0, kt1, cols0, ok0, cols1, ok1, j0, j1, HQ, G, P, SROW, NQB, NKB,
            PREFIX, qk_scale, QB, KB, BLOCK_M, True, IS_F32, FIXED,
        )  # fmt: skip
    for t in range(t_full, n_tiles):
        _kstat_tile(
            q_ptr, rows_ptr, out_ptr, ref_ptr, flag_ptr, t, b, kvh, sqb, sqh, sqs, sqd,
            offs_d, d_ok, kt0, kt1, cols0, ok0, cols1, ok1, j0, j1, HQ, G, P, SROW, NQB, NKB,
            PREFIX, qk_scale, QB, KB, BLOCK_M, False, IS_F32, FIXED,
        )  # fmt: skip


@triton.jit
def _probe_probs(row, j, vis, w):
    """``w`` x the base-2 softmax of one probe's log-masses over its visible KV blocks [R, N]
    (0 where not visible; a row that sees nothing gives 0)."""
    z = tl.load(row[:, None] + j[None, :], mask=vis, other=float("-inf"))
    m = tl.max(z, 1)
    m = tl.where(m == float("-inf"), 0.0, m)
    e = tl.exp2(z - m[:, None])
    den = tl.sum(e, 1)
    den = tl.where(den > 0.0, den, 1.0)
    return e * (w / den)[:, None]


@triton.jit
def _probe_tile(
    lm_ptr, w_ptr, pool_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr,
    b, qt, gt, kvh, HQ, G, SQ, NQB, NKB, PREFIX, target, alpha,
    P: tl.constexpr, RULE: tl.constexpr, KEEP_ALL: tl.constexpr, FORCE_SINK: tl.constexpr,
    FORCE_DIAG: tl.constexpr, BS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr, TUPLE_REDUCE: tl.constexpr, SHARED: tl.constexpr,
    QUAD: tl.constexpr, MIX: tl.constexpr,
):  # fmt: skip
    """One tile of R = BLOCK_G x BLOCK_Q rows whose visible KV blocks fit in BLOCK_N.

    ``SHARED``: the weights rows hold P + 1 slots, slot 0 for the probe shared with the previous
    query block (its last probe, launch 1's slot P - 1 of block i - 1; it sees the KV blocks up
    to the one holding position ``PREFIX + i·BS - 1``), slots 1..P for the P own probes.

    ``MIX``: the probe average is mixed with the pooled-key estimate, ``(1 - alpha)·probes +
    alpha·pooled`` (``pool_ptr``: float32 [B, Hq, NQB, NKB], read on the visible blocks only)."""
    R: tl.constexpr = BLOCK_G * BLOCK_Q
    r, qi, row_ok, bh, j, nvis, vis, part = _tile_rows(
        b, qt, gt, kvh, HQ, G, SQ, NQB, NKB, PREFIX, BS, BS, BLOCK_G, BLOCK_Q, BLOCK_N
    )
    qi_c = tl.where(row_ok, qi, 0)
    bh_c = tl.where(row_ok, bh, 0)
    if KEEP_ALL:
        sel = vis
    else:
        W_STRIDE: tl.constexpr = P + SHARED
        prob = tl.zeros([R, BLOCK_N], dtype=tl.float32)
        for pp in tl.static_range(P):
            w = tl.load(w_ptr + qi_c * W_STRIDE + pp + SHARED, mask=row_ok, other=0.0)
            row = lm_ptr + ((bh_c.to(tl.int64) * NQB + qi_c) * P + pp) * NKB
            prob += _probe_probs(row, j, vis, w)
        if SHARED:
            has_prev = row_ok & (qi > 0)
            w = tl.load(w_ptr + qi_c * W_STRIDE, mask=has_prev, other=0.0)
            q_prev = tl.where(has_prev, qi_c - 1, 0)
            row = lm_ptr + ((bh_c.to(tl.int64) * NQB + q_prev) * P + P - 1) * NKB
            # the last KV block the shared probe sees (-1: none); never past the row's own
            last_prev = tl.where(has_prev, (PREFIX + qi_c * BS - 1) // BS, -1)
            pvis = j[None, :] <= last_prev[:, None]
            prob += _probe_probs(row, j, pvis, w)
        if MIX:
            pool_row = pool_ptr + (bh_c.to(tl.int64) * NQB + qi_c) * NKB
            pooled = tl.load(pool_row[:, None] + j[None, :], mask=vis, other=0.0)
            prob = prob * (1.0 - alpha) + pooled * alpha
        if RULE == 2:
            sel = vis & (prob >= target)
        elif QUAD:
            sel = _threshold_keep_quad(prob, vis, nvis, target, RULE, TUPLE_REDUCE)
        else:
            sel = _threshold_keep(prob, vis, nvis, target, RULE, TUPLE_REDUCE)
    sel = _forced_clip(sel, j, vis, part, FORCE_SINK, FORCE_DIAG)
    _write_lists(
        sel, part, r, j, bh, qi, row_ok, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr,
        NQB, NKB, BLOCK_N,
    )  # fmt: skip


@triton.jit
def _probe_select_kernel(
    lm_ptr,
    w_ptr,
    pool_ptr,
    kv_num_ptr,
    kv_idx_ptr,
    full_num_ptr,
    full_idx_ptr,
    HQ,
    HKV,
    G,
    SQ,
    NQB,
    NKB,
    PREFIX,
    target,
    alpha,
    n_q_tiles,
    n_g_tiles,
    P: tl.constexpr,
    RULE: tl.constexpr,
    KEEP_ALL: tl.constexpr,
    FORCE_SINK: tl.constexpr,
    FORCE_DIAG: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TIERS: tl.constexpr,
    TUPLE_REDUCE: tl.constexpr,
    SHARED: tl.constexpr,
    QUAD: tl.constexpr,
    MIX: tl.constexpr,
):
    qt, gt, _, b, kvh = _program_tile(n_q_tiles, n_g_tiles, HKV)
    # causal tiers (as in the Prism select kernel): a tile whose rows see at most a quarter
    # (half) of BLOCK_N KV blocks runs the body compiled for that narrower register row
    tile_nvis = _tile_nvis(qt, NQB, NKB, SQ, PREFIX, BS, BS, BLOCK_Q)
    N4: tl.constexpr = BLOCK_N // 4
    N2: tl.constexpr = BLOCK_N // 2
    if TIERS and N4 >= 16:
        if tile_nvis <= N4:
            _probe_tile(
                lm_ptr, w_ptr, pool_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr,
                b, qt, gt, kvh, HQ, G, SQ, NQB, NKB, PREFIX, target, alpha,
                P, RULE, KEEP_ALL, FORCE_SINK, FORCE_DIAG, BS, BLOCK_G, BLOCK_Q, N4, TUPLE_REDUCE, SHARED, QUAD, MIX,
            )  # fmt: skip
        elif tile_nvis <= N2:
            _probe_tile(
                lm_ptr, w_ptr, pool_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr,
                b, qt, gt, kvh, HQ, G, SQ, NQB, NKB, PREFIX, target, alpha,
                P, RULE, KEEP_ALL, FORCE_SINK, FORCE_DIAG, BS, BLOCK_G, BLOCK_Q, N2, TUPLE_REDUCE, SHARED, QUAD, MIX,
            )  # fmt: skip
        else:
            _probe_tile(
                lm_ptr, w_ptr, pool_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr,
                b, qt, gt, kvh, HQ, G, SQ, NQB, NKB, PREFIX, target, alpha,
                P, RULE, KEEP_ALL, FORCE_SINK, FORCE_DIAG, BS, BLOCK_G, BLOCK_Q, BLOCK_N,
                TUPLE_REDUCE, SHARED, QUAD, MIX,
            )  # fmt: skip
    else:
        _probe_tile(
            lm_ptr, w_ptr, pool_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr,
            b, qt, gt, kvh, HQ, G, SQ, NQB, NKB, PREFIX, target, alpha,
            P, RULE, KEEP_ALL, FORCE_SINK, FORCE_DIAG, BS, BLOCK_G, BLOCK_Q, BLOCK_N,
            TUPLE_REDUCE, SHARED, QUAD, MIX,
        )  # fmt: skip


SCHEDULES = ("q", "k")


def launch_log_masses(
    q,
    k,
    rows,
    block_size: int,
    *,
    block_m=None,
    num_warps=None,
    num_stages=None,
    schedule: str = "k",
    kv_chunk: int = 2,
    first_slot: int = 0,
    reference: str = "block_max",
    return_state: bool = False,
):
    """Launch 1 (shapes already checked by :mod:`.probe_op`): float32 [B, Hq, NQB, P, NKB] for
    the probe slots ``rows[:, first_slot:]`` (P of them; the ``shared`` layout skips slot 0
    with ``first_slot=1``, read in place, no copy).

    ``schedule="k"`` (default, :func:`_log_mass_kstat_kernel`): a program per chunk of
    ``kv_chunk`` (1 or 2) KV blocks holds them and walks the query tiles that see them;
    ``"q"`` (:func:`_log_mass_kernel`): a program per query tile walks the KV blocks. Both write
    the same entries (every one launch 2 reads) with the same arithmetic. Default launch: 64
    probe rows per tile, 4 warps, 3 pipeline stages, 2 KV blocks per program — the fastest of
    the sweep in ``benchmarks/results/probe_estimator_sweep_h200.log`` (2 schedules x 64/128
    rows x 4/8 warps x 2/3 stages x 1/2 blocks) on the H200: 0.044 / 0.28 / 3.31 ms at 8K / 32K
    / 128K (Hq = 32, Hkv = 8, D = 128, bf16) vs 0.094 / 0.42 / 3.84 ms for the query schedule.

    ``reference="block_max"`` (default): every written entry is exact (each block's sum taken
    against its own max). ``"fixed"`` (K schedule only): three launches — the rows' references
    (own score + :data:`REF_MARGIN`), the K-stationary pass against them (no per-block max) and
    the repair pass that recomputes, with the block max, every row in which a block sum
    overflowed (a score ~120 bits above the reference, ~150 above the probe's own). Entries
    whose exact value is at least ``ref - FLUSH_BITS`` are exact to 2^-19 relative (the flushed
    subnormal terms of a block of <= 256 keys); lower ones (probability < 2^-67 in the probe's
    softmax) may be low or ``-inf``. Enough for top-p and for min-prob above 2^-67, which never
    keep such blocks; top-k, which may have to rank them, takes the block max
    (:func:`.probe_op.pick_reference`). ``return_state=True`` also returns the references
    (float32) and the overflow flags (int32), both ``[B, Hq, NQB, P]`` (``None`` for the block
    max), for tests.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {list(SCHEDULES)}")
    if reference not in REFERENCES:
        raise ValueError(f"unknown reference {reference!r}; valid: {list(REFERENCES)}")
    if reference == "fixed" and schedule != "k":
        raise ValueError("reference='fixed' runs on the K-stationary schedule (schedule='k')")
    if kv_chunk not in (1, 2):
        raise ValueError(f"kv_chunk must be 1 or 2, got {kv_chunk}")
    if not 0 <= first_slot < rows.shape[1]:
        raise ValueError(f"first_slot must be in [0, {rows.shape[1]}), got {first_slot}")
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    bs = int(block_size)
    nqb, nkb = math.ceil(sq / bs), math.ceil(sk / bs)
    rows = rows.to(device=q.device, dtype=torch.int32)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    rows = rows[:, first_slot:]  # a view: the kernels step rows by their stride
    p = rows.shape[1]
    gp = g * p
    block_m = max(16, _next_pow2(gp), _next_pow2(block_m or 64))
    qb = block_m // gp
    n_tiles = math.ceil(nqb / qb)
    block_d = max(16, _next_pow2(d))
    block_n = max(16, _next_pow2(bs))
    if num_warps is None:
        num_warps = 4 if block_m <= 64 else 8
    if num_stages is None:
        num_stages = 3
    out = torch.empty(b, hq, nqb, p, nkb, device=q.device, dtype=torch.float32)
    fixed = reference == "fixed"
    ref = torch.empty(b * hq * nqb * p, device=q.device, dtype=torch.float32) if fixed else out
    flags = torch.zeros(b * hq * nqb * p, device=q.device, dtype=torch.int32) if fixed else out
    qk_scale = LOG2E / math.sqrt(d)
    if fixed:
        _probe_ref_kernel[(n_tiles, b * hkv)](
            q, k, rows, ref, *q.stride(), *k.stride(), hq, hkv, g, p, rows.stride(0), d, nqb,
            sk - sq, qk_scale, REF_MARGIN, QB=qb, BLOCK_M=block_m, BLOCK_D=block_d,
            num_warps=4,
        )  # fmt: skip
    head = (q, k, rows, out)
    args = (
        *q.stride(),
        *k.stride(),
        hq,
        hkv,
        g,
        p,
        rows.stride(0),
        d,
        sq,
        sk,
        nqb,
        nkb,
        sk - sq,
        qk_scale,
        n_tiles,
    )
    meta = dict(
        QB=qb,
        BS=bs,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        IS_F32=q.dtype == torch.float32,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if schedule == "q":
        _log_mass_kernel[(n_tiles, b * hkv)](*head, out, *args, REPAIR=False, **meta)
    else:
        grid = (math.ceil(nkb / kv_chunk), b * hkv)
        _log_mass_kstat_kernel[grid](*head, ref, flags, *args, KB=kv_chunk, FIXED=fixed, **meta)
    if fixed:  # the rows flagged above, again with the block max (no work where none is)
        _log_mass_kernel[(n_tiles, b * hkv)](*head, flags, *args, REPAIR=True, **meta)
    if return_state:
        if not fixed:
            return out, None, None
        return out, ref.view(b, hq, nqb, p), flags.view(b, hq, nqb, p)
    return out


def launch_select(
    lm,
    weights,
    sq: int,
    sk: int,
    hkv: int,
    params,
    rows_per_program: int | None = None,
    num_warps=None,
    shared: bool = False,
    search: str = "auto",
    return_kernel: bool = False,
    pooled=None,
    alpha: float = 0.0,
):
    """Launch 2: the four block lists from launch 1's log-masses and the probe weights.

    ``pooled`` (float32 ``[B, Hq, NQB, NKB]``, :func:`.pooled_kernels.launch_pooled_probs`) with
    ``alpha`` in (0, 1): the rule runs on ``(1 - alpha)·probes + alpha·pooled`` (the probe
    scorer's ``pooled_mix``); only the visible entries of ``pooled`` are read.

    ``shared``: the ``shared`` probe placement — ``lm`` holds each block's P own probes (launch 1
    on slots 1..P of the layout) and ``weights`` is the whole ``[NQB, P + 1]`` layout, slot 0
    being the previous block's last probe, read from its row of ``lm`` (not computed twice).

    Default launch: one row (query head, query block) per program and one warp per 512 KV blocks
    of the row (1 to 16 warps) — the fastest of the CUDA-graph-timed sweep in
    ``benchmarks/results/select_search_s8c_h200.md`` (H200, Hq = 32, Hkv = 8, shared P = 2):
    0.0106 / 0.0255 / 0.284 ms at 8K / 32K / 128K vs 0.0126 / 0.0507 / 0.464 ms for the former
    4 rows x 4 warps. With ``rows_per_program`` R > 1 (the GQA group first when G is a power of
    two, else one head per row group): one warp per 1024 register slots of the [R, BLOCK_N]
    tile (2 to 16). The warp count changes the order of the row sums, so a row whose top-p
    boundary sits within rounding can differ between launch shapes (1 of 32,768 rows at 128K).

    ``search``: ``"bisect"`` (one threshold a round), ``"quad"`` (three: the bracket quartered,
    :func:`.select._threshold_keep_quad`) or ``"auto"`` (:func:`.select.pick_search`); the same
    lists. ``return_kernel=True`` also returns Triton's compiled-kernel handle (``n_regs``,
    ``n_spills``).
    """
    b, hq, nqb, p, nkb = lm.shape
    g = hq // hkv
    bs = int(params.block_size)
    rule = RULE_CODES[params.rule]
    if rule == 0:
        target = float(params.threshold)
        keep_all = target >= 1.0
    elif rule == 1:
        target, keep_all = float(int(params.top_k)), False
    else:
        target, keep_all = float(params.min_prob), False
    if rows_per_program is None:
        rows_per_program = 1
    if rows_per_program < 1 or _next_pow2(rows_per_program) != rows_per_program:
        raise ValueError(f"rows_per_program must be a power of two, got {rows_per_program}")
    block_n = max(16, _next_pow2(nkb))
    block_g = min(_next_pow2(g), rows_per_program) if _next_pow2(g) == g else 1
    block_q = max(1, rows_per_program // block_g)
    if block_g * block_q == 1:
        warps = max(1, min(16, _next_pow2(max(1, block_n // 512))))
    else:
        warps = max(2, min(16, _next_pow2(max(1, block_g * block_q * block_n // 1024))))
    if num_warps is not None:
        warps = int(num_warps)
    n_q_tiles = math.ceil(nqb / block_q)
    n_g_tiles = math.ceil(g / block_g)
    dev = lm.device
    weights = weights.to(device=dev, dtype=torch.float32).contiguous()
    if weights.shape != (nqb, p + int(shared)):
        raise ValueError(
            f"weights must be [NQB={nqb}, {p + int(shared)}] for {p} launch-1 probes"
            f"{' + the shared one' if shared else ''}, got {tuple(weights.shape)}"
        )
    kv_num = torch.empty(b, hq, nqb, device=dev, dtype=torch.int32)
    full_num = torch.empty(b, hq, nqb, device=dev, dtype=torch.int32)
    kv_idx = torch.empty(b, hq, nqb, nkb, device=dev, dtype=torch.int32)
    full_idx = torch.empty(b, hq, nqb, nkb, device=dev, dtype=torch.int32)
    alpha = float(alpha) if pooled is not None else 0.0
    mix = alpha > 0.0
    if mix and (pooled.shape != (b, hq, nqb, nkb) or pooled.dtype != torch.float32):
        raise ValueError(
            f"pooled must be float32 [{b}, {hq}, {nqb}, {nkb}], got {pooled.dtype} "
            f"{tuple(pooled.shape)}"
        )
    if mix and not pooled.is_contiguous():
        pooled = pooled.contiguous()
    kernel = _probe_select_kernel[(n_q_tiles * n_g_tiles * b * hkv,)](
        lm,
        weights,
        pooled if mix else lm,
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        hq,
        hkv,
        g,
        sq,
        nqb,
        nkb,
        sk - sq,
        target,
        alpha,
        n_q_tiles,
        n_g_tiles,
        P=p,
        RULE=rule,
        KEEP_ALL=keep_all,
        FORCE_SINK=bool(params.force_sink),
        FORCE_DIAG=bool(params.force_diagonal),
        BS=bs,
        BLOCK_G=block_g,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        TIERS=block_n >= 128,
        TUPLE_REDUCE=dev.type != "cpu",
        SHARED=bool(shared),
        QUAD=pick_search(search, rule, block_n) == "quad",
        MIX=mix,
        num_warps=warps,
    )
    lists = (kv_num, kv_idx, full_num, full_idx)
    return (lists, kernel) if return_kernel else lists
