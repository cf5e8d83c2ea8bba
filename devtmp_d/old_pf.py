"""Fused Prism estimator in Triton: pooled dual-band scores -> top-p -> BlockMask block lists.

Two launches (DESIGN.md §4 step by step, with the same numbers as ``PrismScorer``):

1. ``_pool_kernel`` — one program per block of Q *and* of K (one grid for both): the fp32 block
   mean (zero padding included, as ``pool_blocks``), written as ``qbar [B, Hq, NQB, D]`` and
   transposed ``kbarT [B, Hkv, D, NKB_P]`` (rows padded to a power of two), plus three per-block
   sums of squares of the mean (all dims, high band, low band) for the energy calibration.
2. ``_select_kernel`` — one program per tile of ``R = BLOCK_G x BLOCK_Q`` rows (16): ``BLOCK_G``
   query heads of one KV group (GQA: K̄ is read once for the group) times ``BLOCK_Q`` query
   blocks, each row holding ALL its KV blocks in registers. Per program: the calibration
   temperatures from the per-block sums (no extra launch); per band the pooled logits with
   ``tl.dot`` (``ieee`` fp32, or ``tf32x3`` = three TF32 tensor-core products, fp32-level accuracy,
   the CUDA default from 16K tokens); the block-causal fp32 softmax; the top-p set by a threshold
   search (below); the union of the bands, the forced sink / partial (diagonal) blocks, the causal
   clip; and the two block lists written straight into the BlockMask tensors (one prefix scan
   gives the positions in both lists).
   *Causal tiers*: the register row width is a compile-time constant, so a tile whose rows see
   at most a quarter (half) of ``BLOCK_N = next_pow2(NKB)`` KV blocks runs a copy of the body
   compiled for that narrower width (one launch, three code paths): 0.69 of the full-width work.

Nothing of size ``[B, Hq, NQB, NKB]`` other than the returned lists is ever allocated: the
probabilities live in registers only. Temporaries: ``qbar`` + ``kbarT`` (fp32, 20 MB at 128K with
Hq=32, Hkv=8, D=128) and 3 floats per block.

Top-p without a sort (exactly the rule of ``prism.masks.top_p``: keep a block iff the mass
strictly before it in descending order is ``< p``). Let ``F(t)`` = mass of the row's blocks with
probability ``> t``. A block of probability ``v`` is kept iff ``F(v) < p``. ``F`` is
non-increasing, so the kept set is ``{prob >= t*}`` with ``t* = min{t : F(t) < p}``. Probabilities
are non-negative floats, whose bit patterns (int32) order like the values, so ``t*`` is found by
bisection on the integer bit pattern: the invariant is ``F(lo) >= p`` and ``F(hi) < p`` (``hi``
starts one bit above the row max, where ``F = 0``; ``lo`` starts at -1, below every value, or for
top-p at ``(1 - p) / (2 nvis)``, which is provably invalid too since ``F(t) >= 1 - nvis t``). The
search stops when ``hi = lo + 1`` or when at most one probability lies in ``(lo, hi]`` (that value
``v`` has ``F(v) = F(hi) < p``: it is kept); the kept set is then ``{prob > lo}``. Each round is one
fused (count, mass) row reduction; 5-20 rounds per row instead of a sort + cumsum.

Ties: blocks with *equal* probability are kept or dropped together (a tie at the boundary keeps
every tied block, a superset of the sort-based set by the tied blocks only; the sort's order among
equal values is unspecified anyway). ``rule="top_k"`` uses the same search on counts (``count(prob
> t) < k``; ties at the k-th value are all kept), ``rule="min_prob"`` is a plain comparison.
Rounding: sums are taken in a different order than ``torch.cumsum`` over the sorted row (and
``tf32x3`` products round differently from fp32 FMAs), so a block whose "mass before" is within
rounding of ``p`` may be decided differently. On the H200: 0 of 5,824 (b, head, query-block) rows
differed in the fp32 and bf16 checks up to 16K tokens; 3 of 16,384 rows at 64K and 3 of 32,768 at
128K (bf16; the same counts with exact ``ieee`` dots, so these are summation-order effects).

List format (as ``prism.masks.bool_to_block_lists``): per (b, h, query block) ``num`` int32 and an
int32 row of NKB entries, the selected KV block indices first in ascending order, then the
unselected ones ascending (every entry written, every entry a valid index). ``kv_*`` hold the
selected partial (causal-frontier) blocks, ``full_kv_*`` the other selected blocks.

Runs on CUDA and, under ``TRITON_INTERPRET=1`` (set before Triton is first imported), on CPU
tensors. Written for the Triton 3.2-3.9 language surface (checked on 3.6 on the GPU, 3.9 in the
interpreter). ``select_from_pooled(..., debug=1|2|3)`` are timing-only variants (no threshold
search / no list writing / logits only) used by ``benchmarks/bench_estimator.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = [
    "MAX_BLOCK_N",
    "SelectConfig",
    "block_lists_to_block_mask",
    "block_lists_to_selection",
    "pick_select_config",
    "pool_blocks_fused",
    "prism_select_block_lists",
    "select_from_pooled",
    "supports",
]

MAX_BLOCK_N = 4096  # NKB up to 4096 (512K tokens at BS=128) in one register row
_RULES = {"top_p": 0, "top_k": 1, "min_prob": 2}


# ------------------------------------------------------------------------------------------------
# kernel 1: block means (+ per-block sums of squares for the calibration)
# ------------------------------------------------------------------------------------------------
@triton.jit
def _pool_one(
    x_ptr,
    sxb,
    sxh,
    sxs,
    sxd,
    out_ptr,
    so_head,
    so_blk,
    so_d,
    st_ptr,
    b,
    h,
    blk,
    H,
    S,
    NB,
    D,
    HALF_D,
    HI_PAIRS,
    LO_PAIR0,
    INTERLEAVED: tl.constexpr,
    BS: tl.constexpr,
    D_P: tl.constexpr,
    ROWS: tl.constexpr,
):
    offs_r = tl.arange(0, ROWS)
    offs_d = tl.arange(0, D_P)
    d_ok = offs_d < D
    base = x_ptr + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh
    acc = tl.zeros([ROWS, D_P], dtype=tl.float32)
    s0 = blk * BS
    for r0 in tl.static_range(0, BS, ROWS):
        rows = s0 + r0 + offs_r
        m = (rows < S)[:, None] & d_ok[None, :]
        ptrs = base + rows.to(tl.int64)[:, None] * sxs + offs_d[None, :] * sxd
        acc += tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(acc, 0) / BS  # [D_P]; zero padding of the last block included
    bh = b * H + h
    out = out_ptr + bh.to(tl.int64) * so_head + blk * so_blk + offs_d * so_d
    tl.store(out, mean, mask=d_ok)
    if INTERLEAVED:
        pair = offs_d // 2
    else:
        pair = offs_d % HALF_D
    sq = mean * mean
    s_all = tl.sum(sq, 0)
    s_hi = tl.sum(tl.where(pair < HI_PAIRS, sq, 0.0), 0)
    s_lo = tl.sum(tl.where(pair >= LO_PAIR0, sq, 0.0), 0)
    st = st_ptr + (bh * 3).to(tl.int64) * NB + blk
    tl.store(st, s_all)
    tl.store(st + NB, s_hi)
    tl.store(st + 2 * NB, s_lo)


@triton.jit
def _pool_kernel(
    q_ptr,
    sqb,
    sqh,
    sqs,
    sqd,
    k_ptr,
    skb,
    skh,
    sks,
    skd,
    qbar_ptr,
    kbarT_ptr,
    qst_ptr,
    kst_ptr,
    HQ,
    HKV,
    SQ,
    SK,
    NQB,
    NKB,
    NKB_P,
    D,
    HALF_D,
    HI_PAIRS,
    LO_PAIR0,
    N_QPROG,
    INTERLEAVED: tl.constexpr,
    BS: tl.constexpr,
    D_P: tl.constexpr,
    ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < N_QPROG:
        blk = pid % NQB
        bh = pid // NQB
        _pool_one(
            q_ptr,
            sqb,
            sqh,
            sqs,
            sqd,
            qbar_ptr,
            NQB * D,
            D,
            1,
            qst_ptr,
            bh // HQ,
            bh % HQ,
            blk,
            HQ,
            SQ,
            NQB,
            D,
            HALF_D,
            HI_PAIRS,
            LO_PAIR0,
            INTERLEAVED,
            BS,
            D_P,
            ROWS,
        )
    else:
        p2 = pid - N_QPROG
        blk = p2 % NKB
        bh = p2 // NKB
        _pool_one(
            k_ptr,
            skb,
            skh,
            sks,
            skd,
            kbarT_ptr,
            D * NKB_P,
            1,
            NKB_P,
            kst_ptr,
            bh // HKV,
            bh % HKV,
            blk,
            HKV,
            SK,
            NKB,
            D,
            HALF_D,
            HI_PAIRS,
            LO_PAIR0,
            INTERLEAVED,
            BS,
            D_P,
            ROWS,
        )


# ------------------------------------------------------------------------------------------------
# kernel 2: scores, softmax, threshold search, union, forced blocks, block lists
# ------------------------------------------------------------------------------------------------
@triton.jit
def _band_sums(st_ptr, NB, CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr):
    """Sums over the NB blocks of the 3 per-block statistics of one head -> 3 scalars."""
    offs = tl.arange(0, CHUNK)
    a0 = tl.zeros([CHUNK], dtype=tl.float32)
    a1 = tl.zeros([CHUNK], dtype=tl.float32)
    a2 = tl.zeros([CHUNK], dtype=tl.float32)
    for c in tl.static_range(N_CHUNKS):
        o = c * CHUNK + offs
        m = o < NB
        a0 += tl.load(st_ptr + o, mask=m, other=0.0)
        a1 += tl.load(st_ptr + NB + o, mask=m, other=0.0)
        a2 += tl.load(st_ptr + 2 * NB + o, mask=m, other=0.0)
    return tl.sum(a0, 0), tl.sum(a1, 0), tl.sum(a2, 0)


@triton.jit
def _rms(s, n):
    return tl.maximum(tl.sqrt(s / n), 1e-6)


@triton.jit
def _band_logits(
    qrow_ptr,
    row_ok,
    kT_ptr,
    NKB_P,
    seg0,
    seg1,
    SEG_LEN,
    N_SEGS: tl.constexpr,
    R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """acc[R, BLOCK_N] = q̄_band · k̄_band over the band's dims (one or two contiguous segments).

    ``kbarT`` rows are padded to ``NKB_P >= BLOCK_N`` columns, so the K̄ loads need no column
    mask: the padding holds garbage that only reaches invisible columns (masked to -inf later)."""
    offs_c = tl.arange(0, KC)
    offs_n = tl.arange(0, BLOCK_N)
    acc = tl.zeros([R, BLOCK_N], dtype=tl.float32)
    for s in tl.static_range(N_SEGS):
        if s == 0:
            start = seg0
        else:
            start = seg1
        for c0 in range(0, SEG_LEN, KC):
            c_ok = (c0 + offs_c) < SEG_LEN
            dims = start + c0 + offs_c
            a = tl.load(
                qrow_ptr[:, None] + dims[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0
            )
            b_ptrs = kT_ptr + dims[:, None] * NKB_P + offs_n[None, :]
            if EVEN_K:
                bt = tl.load(b_ptrs)
            else:
                bt = tl.load(b_ptrs, mask=c_ok[:, None], other=0.0)
            acc = tl.dot(a, bt, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _band_keep(
    acc,
    scale,
    vis,
    nvis,
    target,
    RULE: tl.constexpr,
    KEEP_ALL: tl.constexpr,
    DEBUG: tl.constexpr,
    TUPLE_REDUCE: tl.constexpr,
):
    """Block-causal fp32 softmax of ``acc * scale`` per row, then the rule's kept set (bool)."""
    if KEEP_ALL:
        keep = vis
    elif DEBUG == 3:  # timing variant: logits only
        keep = vis & (acc > 0.0)
    else:
        z = tl.where(vis, acc * scale[:, None], float("-inf"))
        m = tl.max(z, 1)
        m = tl.where(m == float("-inf"), 0.0, m)
        e = tl.exp(z - m[:, None])  # exactly 0 where not visible
        den = tl.sum(e, 1)
        den = tl.where(den > 0.0, den, 1.0)
        prob = e / den[:, None]
        if RULE == 2:
            keep = vis & (prob >= target)
        elif DEBUG == 1:  # timing variant: no threshold search
            keep = vis & (prob * nvis[:, None].to(tl.float32) >= 1.0)
        else:
            # Bisection on the int32 bit pattern of the threshold (see the module docstring).
            # Invisible entries hold +0.0 (bits 0) and every probe ``mid`` is >= 0, so they are
            # never counted; the final set is clipped to ``vis``.
            hi = tl.max(prob.to(tl.int32, bitcast=True), 1) + 1  # F(hi) = 0 < target: valid
            lo = hi * 0 - 1  # below every value: F(lo) = total mass >= target
            if RULE == 0:
                # F(t) >= total - nvis * t, so t0 = (1 - p) / (2 nvis) is invalid too whenever
                # (1 - p) / 2 dwarfs the fp32 rounding of the row sums: start there (saves the
                # exponent-finding rounds). n_lo stays nvis, an overestimate: it can only delay
                # the stop test, never fake it.
                t0 = (1.0 - target) * 0.5 / tl.maximum(nvis, 1).to(tl.float32)
                use_t0 = (nvis > 0) & ((1.0 - target) >= 2e-4)
                lo = tl.where(use_t0, t0.to(tl.int32, bitcast=True), lo)
            n_hi = hi * 0  # count(prob > hi)
            n_lo = nvis  # count(prob > lo) among the visible blocks
            active = ((n_lo - n_hi) > 1) & ((hi - lo) > 1)
            go = tl.max(active.to(tl.int32), 0) > 0
            while go:
                mid = lo + (hi - lo) // 2
                above = prob.to(tl.int32, bitcast=True) > mid[:, None]
                if TUPLE_REDUCE:  # one shuffle tree for both sums
                    n_mid, mass = tl.reduce(
                        (above.to(tl.int32), tl.where(above, prob, 0.0)), 1, _add2
                    )
                else:  # (the interpreter runs a tuple reduce element by element in Python)
                    n_mid = tl.sum(above.to(tl.int32), 1)
                    mass = tl.sum(tl.where(above, prob, 0.0), 1)
                if RULE == 1:
                    val = n_mid.to(tl.float32)
                else:
                    val = mass
                up_hi = active & (val < target)
                up_lo = active & (val >= target)
                hi = tl.where(up_hi, mid, hi)
                n_hi = tl.where(up_hi, n_mid, n_hi)
                lo = tl.where(up_lo, mid, lo)
                n_lo = tl.where(up_lo, n_mid, n_lo)
                active = ((n_lo - n_hi) > 1) & ((hi - lo) > 1)
                go = tl.max(active.to(tl.int32), 0) > 0
            keep = vis & (prob.to(tl.int32, bitcast=True) > lo[:, None])
    return keep


@triton.jit
def _select_tile(
    qbar_ptr,
    kbarT_ptr,
    kv_num_ptr,
    kv_idx_ptr,
    full_num_ptr,
    full_idx_ptr,
    b,
    bkv,
    qt,
    gt,
    kvh,
    scale_hi,
    scale_lo,
    HQ,
    G,
    SQ,
    NQB,
    NKB,
    NKB_P,
    D,
    PREFIX,
    HI_SEG0,
    HI_SEG1,
    HI_SEG_LEN,
    LO_SEG0,
    LO_SEG1,
    LO_SEG_LEN,
    tgt_hi,
    tgt_lo,
    N_SEGS: tl.constexpr,
    RULE: tl.constexpr,
    ALL_HI: tl.constexpr,
    ALL_LO: tl.constexpr,
    FORCE_SINK: tl.constexpr,
    FORCE_DIAG: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    DEBUG: tl.constexpr,
    TUPLE_REDUCE: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """One tile of R = BLOCK_G * BLOCK_Q rows, each with BLOCK_N >= its visible KV blocks."""
    R: tl.constexpr = BLOCK_G * BLOCK_Q
    r = tl.arange(0, R)
    g = gt * BLOCK_G + r // BLOCK_Q
    qi = qt * BLOCK_Q + r % BLOCK_Q
    row_ok = (g < G) & (qi < NQB)
    bh = b * HQ + kvh * G + g  # [R]

    # ---- block-causal geometry of every row ------------------------------------------------
    j = tl.arange(0, BLOCK_N)
    last_q = PREFIX + tl.minimum((qi + 1) * BS, SQ) - 1  # absolute position of the last query
    nvis = tl.where(row_ok, tl.minimum(last_q // BS + 1, NKB), 0)
    vis = j[None, :] < nvis[:, None]

    # ---- per band: logits -> softmax -> kept set; union --------------------------------------
    qrow_ptr = qbar_ptr + (bh.to(tl.int64) * NQB + qi) * D
    kT_ptr = kbarT_ptr + bkv.to(tl.int64) * D * NKB_P
    acc = _band_logits(
        qrow_ptr,
        row_ok,
        kT_ptr,
        NKB_P,
        HI_SEG0,
        HI_SEG1,
        HI_SEG_LEN,
        N_SEGS,
        R,
        BLOCK_N,
        KC,
        DOT_PREC,
        EVEN_K,
    )
    sel = _band_keep(acc, scale_hi, vis, nvis, tgt_hi, RULE, ALL_HI, DEBUG, TUPLE_REDUCE)
    acc = _band_logits(
        qrow_ptr,
        row_ok,
        kT_ptr,
        NKB_P,
        LO_SEG0,
        LO_SEG1,
        LO_SEG_LEN,
        N_SEGS,
        R,
        BLOCK_N,
        KC,
        DOT_PREC,
        EVEN_K,
    )
    sel = sel | _band_keep(acc, scale_lo, vis, nvis, tgt_lo, RULE, ALL_LO, DEBUG, TUPLE_REDUCE)

    # ---- forced blocks, causal clip ------------------------------------------------------------
    part = vis & ((j[None, :] * BS + BS - 1) > (PREFIX + qi * BS)[:, None])
    if FORCE_SINK:
        sel = sel | (j == 0)[None, :]
    if FORCE_DIAG:
        sel = sel | part
    sel = sel & vis

    # ---- block lists (ascending selected, then ascending unselected) --------------------------
    psel = sel & part
    fsel = sel & (~part)
    num_off = bh * NQB + qi
    if DEBUG == 2:  # timing variant: counts only
        tl.store(full_num_ptr + num_off, tl.sum(fsel.to(tl.int32), 1), mask=row_ok)
        tl.store(kv_num_ptr + num_off, tl.sum(psel.to(tl.int32), 1), mask=row_ok)
    else:
        code = fsel.to(tl.int32) + psel.to(tl.int32) * 65536
        c = tl.cumsum(code, 1)  # inclusive prefix counts of both lists at once
        cf = c & 65535
        cp = c >> 16
        n_f = tl.sum(fsel.to(tl.int32), 1)
        n_p = tl.sum(psel.to(tl.int32), 1)
        jj = j[None, :] + r[:, None] * 0
        pos_f = tl.where(fsel, cf - 1, n_f[:, None] + jj - cf)
        pos_p = tl.where(psel, cp - 1, n_p[:, None] + jj - cp)
        row_off = (bh.to(tl.int64) * NQB + qi) * NKB
        st_ok = row_ok[:, None] & (j < NKB)[None, :]
        tl.store(full_idx_ptr + row_off[:, None] + pos_f, jj, mask=st_ok)
        tl.store(kv_idx_ptr + row_off[:, None] + pos_p, jj, mask=st_ok)
        tl.store(full_num_ptr + num_off, n_f, mask=row_ok)
        tl.store(kv_num_ptr + num_off, n_p, mask=row_ok)
        # a narrow causal tier: entries [BLOCK_N, NKB) hold KV blocks invisible to every row of the
        # tile (unselected, after all selected ones), i.e. the identity: idx[j] = j
        for j0 in range(BLOCK_N, NKB, BLOCK_N):
            jt = j0 + j
            tail_ok = row_ok[:, None] & (jt < NKB)[None, :]
            jt2 = jt[None, :] + r[:, None] * 0
            tl.store(full_idx_ptr + row_off[:, None] + jt2, jt2, mask=tail_ok)
            tl.store(kv_idx_ptr + row_off[:, None] + jt2, jt2, mask=tail_ok)


@triton.jit
def _select_kernel(
    qbar_ptr,
    kbarT_ptr,
    qst_ptr,
    kst_ptr,
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
    NKB_P,
    D,
    PREFIX,
    HI_SEG0,
    HI_SEG1,
    HI_SEG_LEN,
    LO_SEG0,
    LO_SEG1,
    LO_SEG_LEN,
    W_HI,
    W_LO,
    scale_hi0,
    scale_lo0,
    frac_hi,
    frac_lo,
    tgt_hi,
    tgt_lo,
    n_q_tiles,
    n_g_tiles,
    N_SEGS: tl.constexpr,
    CALIBRATE: tl.constexpr,
    RULE: tl.constexpr,
    ALL_HI: tl.constexpr,
    ALL_LO: tl.constexpr,
    FORCE_SINK: tl.constexpr,
    FORCE_DIAG: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KC: tl.constexpr,
    ST_CHUNK: tl.constexpr,
    NQ_CHUNKS: tl.constexpr,
    NK_CHUNKS: tl.constexpr,
    DOT_PREC: tl.constexpr,
    TIERS: tl.constexpr,
    DEBUG: tl.constexpr,
    TUPLE_REDUCE: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    R: tl.constexpr = BLOCK_G * BLOCK_Q
    pid = tl.program_id(0)
    # largest query tiles (most KV blocks) first; the G heads of a KV head are adjacent
    qt = n_q_tiles - 1 - pid % n_q_tiles
    rest = pid // n_q_tiles
    gt = rest % n_g_tiles
    bkv = rest // n_g_tiles  # b * HKV + kv head
    b = bkv // HKV
    kvh = bkv % HKV
    r = tl.arange(0, R)

    # ---- band temperatures (energy calibration, DESIGN §4.3) ------------------------------------
    if CALIBRATE:
        k_all, k_hi, k_lo = _band_sums(
            kst_ptr + bkv.to(tl.int64) * 3 * NKB, NKB, ST_CHUNK, NK_CHUNKS
        )
        rk = _rms(k_all, NKB * D)
        rk_hi = _rms(k_hi, NKB * W_HI) / rk
        rk_lo = _rms(k_lo, NKB * W_LO) / rk
        scale_hi = tl.zeros([R], dtype=tl.float32)
        scale_lo = tl.zeros([R], dtype=tl.float32)
        for gg in tl.static_range(BLOCK_G):
            hh = kvh * G + gt * BLOCK_G + gg
            h_ok = (gt * BLOCK_G + gg) < G
            hh = tl.where(h_ok, hh, kvh * G)
            q_all, q_hi, q_lo = _band_sums(
                qst_ptr + (b * HQ + hh).to(tl.int64) * 3 * NQB, NQB, ST_CHUNK, NQ_CHUNKS
            )
            rq = _rms(q_all, NQB * D)
            tau_hi = frac_hi * (_rms(q_hi, NQB * W_HI) / rq) * rk_hi
            tau_lo = frac_lo * (_rms(q_lo, NQB * W_LO) / rq) * rk_lo
            mine = (r // BLOCK_Q) == gg
            scale_hi = tl.where(mine, scale_hi0 / tau_hi, scale_hi)
            scale_lo = tl.where(mine, scale_lo0 / tau_lo, scale_lo)
    else:
        scale_hi = tl.zeros([R], dtype=tl.float32) + scale_hi0
        scale_lo = tl.zeros([R], dtype=tl.float32) + scale_lo0

    # ---- causal tiers: a tile whose rows see few KV blocks runs with a narrower register row ----
    qi_last = tl.minimum(qt * BLOCK_Q + BLOCK_Q - 1, NQB - 1)
    tile_nvis = tl.minimum((PREFIX + tl.minimum((qi_last + 1) * BS, SQ) - 1) // BS + 1, NKB)
    N4: tl.constexpr = BLOCK_N // 4
    N2: tl.constexpr = BLOCK_N // 2
    if TIERS >= 3 and N4 >= 16:
        if tile_nvis <= N4:
            _select_tile(
                qbar_ptr, kbarT_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr,
                b, bkv, qt, gt, kvh, scale_hi, scale_lo,
                HQ, G, SQ, NQB, NKB, NKB_P, D, PREFIX,
                HI_SEG0, HI_SEG1, HI_SEG_LEN, LO_SEG0, LO_SEG1, LO_SEG_LEN, tgt_hi, tgt_lo,
                N_SEGS, RULE, ALL_HI, ALL_LO, FORCE_SINK, FORCE_DIAG,
                BS, BLOCK_G, BLOCK_Q, N4, KC, DOT_PREC, DEBUG, TUPLE_REDUCE, EVEN_K,
            )  # fmt: skip
        elif tile_nvis <= N2:
            _select_tile(
                qbar_ptr, kbarT_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr,
                b, bkv, qt, gt, kvh, scale_hi, scale_lo,
                HQ, G, SQ, NQB, NKB, NKB_P, D, PREFIX,
                HI_SEG0, HI_SEG1, HI_SEG_LEN, LO_SEG0, LO_SEG1, LO_SEG_LEN, tgt_hi, tgt_lo,
                N_SEGS, RULE, ALL_HI, ALL_LO, FORCE_SINK, FORCE_DIAG,
                BS, BLOCK_G, BLOCK_Q, N2, KC, DOT_PREC, DEBUG, TUPLE_REDUCE, EVEN_K,
            )  # fmt: skip
        else:
            _select_tile(
                qbar_ptr, kbarT_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr,
                b, bkv, qt, gt, kvh, scale_hi, scale_lo,
                HQ, G, SQ, NQB, NKB, NKB_P, D, PREFIX,
                HI_SEG0, HI_SEG1, HI_SEG_LEN, LO_SEG0, LO_SEG1, LO_SEG_LEN, tgt_hi, tgt_lo,
                N_SEGS, RULE, ALL_HI, ALL_LO, FORCE_SINK, FORCE_DIAG,
                BS, BLOCK_G, BLOCK_Q, BLOCK_N, KC, DOT_PREC, DEBUG, TUPLE_REDUCE, EVEN_K,
            )  # fmt: skip
    elif TIERS >= 2 and N2 >= 16:
        if tile_nvis <= N2:
            _select_tile(
                qbar_ptr, kbarT_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr,
                b, bkv, qt, gt, kvh, scale_hi, scale_lo,
                HQ, G, SQ, NQB, NKB, NKB_P, D, PREFIX,
                HI_SEG0, HI_SEG1, HI_SEG_LEN, LO_SEG0, LO_SEG1, LO_SEG_LEN, tgt_hi, tgt_lo,
                N_SEGS, RULE, ALL_HI, ALL_LO, FORCE_SINK, FORCE_DIAG,
                BS, BLOCK_G, BLOCK_Q, N2, KC, DOT_PREC, DEBUG, TUPLE_REDUCE, EVEN_K,
            )  # fmt: skip
        else:
            _select_tile(
                qbar_ptr, kbarT_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr,
                b, bkv, qt, gt, kvh, scale_hi, scale_lo,
                HQ, G, SQ, NQB, NKB, NKB_P, D, PREFIX,
                HI_SEG0, HI_SEG1, HI_SEG_LEN, LO_SEG0, LO_SEG1, LO_SEG_LEN, tgt_hi, tgt_lo,
                N_SEGS, RULE, ALL_HI, ALL_LO, FORCE_SINK, FORCE_DIAG,
                BS, BLOCK_G, BLOCK_Q, BLOCK_N, KC, DOT_PREC, DEBUG, TUPLE_REDUCE, EVEN_K,
            )  # fmt: skip
    else:
        _select_tile(
            qbar_ptr, kbarT_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr,
            b, bkv, qt, gt, kvh, scale_hi, scale_lo,
            HQ, G, SQ, NQB, NKB, NKB_P, D, PREFIX,
            HI_SEG0, HI_SEG1, HI_SEG_LEN, LO_SEG0, LO_SEG1, LO_SEG_LEN, tgt_hi, tgt_lo,
            N_SEGS, RULE, ALL_HI, ALL_LO, FORCE_SINK, FORCE_DIAG,
            BS, BLOCK_G, BLOCK_Q, BLOCK_N, KC, DOT_PREC, DEBUG, TUPLE_REDUCE, EVEN_K,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# host side
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SelectConfig:
    """Launch shape of the select kernel: rows per program ``BLOCK_G * BLOCK_Q`` (>= 16 for
    ``tl.dot``), ``num_warps``, dot K-chunk ``kc`` and dot precision (``"ieee"`` = exact fp32)."""

    block_g: int
    block_q: int
    num_warps: int
    kc: int = 16
    dot_prec: str = "ieee"
    num_stages: int = 1
    tiers: int = 1


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"  # CPU tensors only run under TRITON_INTERPRET=1


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def pick_select_config(
    g: int, nkb: int, device_type: str = "cuda", rows: int = 16, elems_per_thread: int = 16
) -> SelectConfig:
    """Default launch shape (tuned on an H200, see benchmarks/results/estimator_h200*.md): 16 rows
    (the GQA group first) and about ``elems_per_thread`` fp32 of one [rows, BLOCK_N] register tile
    per thread (2 to 16 warps). For BLOCK_N >= 128 (>= 16K tokens at BS=128) the causal tiers are
    on and, on CUDA, the pooled dot products run as ``tf32x3`` (three TF32 tensor-core products,
    fp32-level accuracy; plain ``ieee`` fp32 runs as FMA loops that spill at BLOCK_N = 1024 and cost
    0.8 ms more at 128K). Short rows keep exact ``ieee`` fp32 and one tier (faster there)."""
    block_n = max(16, _next_pow2(nkb))
    block_g = min(_next_pow2(g), rows)
    block_q = max(1, rows // block_g)
    warps = rows * block_n // (32 * elems_per_thread)
    warps = max(2, min(16, _next_pow2(max(1, warps))))
    if block_n >= 128:
        prec = "tf32x3" if device_type == "cuda" else "ieee"
        return SelectConfig(block_g, block_q, warps, dot_prec=prec, tiers=3)
    return SelectConfig(block_g, block_q, warps, dot_prec="ieee", tiers=1)


def _band_widths(config, d: int) -> tuple[int, int]:
    high = config.high_dims if config.high_dims is not None else d // 2
    low = config.low_dims if config.low_dims is not None else (3 * d) // 4
    for name, w in (("high_dims", high), ("low_dims", low)):
        if w > d or w % 2 or w <= 0:
            raise ValueError(f"{name}={w} must be a positive even number <= the head dim D={d}")
    return high, low


def supports(q: torch.Tensor, k: torch.Tensor, config) -> bool:
    """Whether the fused path handles these inputs / this config (else use the PyTorch path)."""
    nkb = math.ceil(k.shape[2] / config.block_size)
    return (
        q.dim() == 4
        and k.dim() == 4
        and q.shape[-1] % 2 == 0
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and getattr(config, "rule", "top_p") in _RULES
        and _next_pow2(nkb) <= MAX_BLOCK_N
    )


class _Plan:
    """Shapes and kernel arguments shared by the two launches."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, config) -> None:
        if q.dim() != 4 or k.dim() != 4:
            raise ValueError("q and k must be [B, H, S, D]")
        b, hq, sq, d = q.shape
        hkv, sk = k.shape[1], k.shape[2]
        if k.shape[0] != b or k.shape[3] != d or hq % hkv or sq > sk or sq < 1:
            raise ValueError(f"incompatible q {tuple(q.shape)} / k {tuple(k.shape)}")
        if q.dtype != k.dtype or q.device != k.device:
            raise ValueError("q and k must share dtype and device")
        if not supports(q, k, config):
            raise ValueError("the fused Prism estimator does not support these inputs / config")
        self.b, self.hq, self.sq, self.d, self.hkv, self.sk = b, hq, sq, d, hkv, sk
        self.bs = int(config.block_size)
        self.g = hq // hkv
        self.nqb, self.nkb = math.ceil(sq / self.bs), math.ceil(sk / self.bs)
        self.nkb_p = max(16, _next_pow2(self.nkb))  # = BLOCK_N of the select kernel
        self.half = d // 2
        self.w_hi, self.w_lo = _band_widths(config, d)
        self.interleaved = config.rope_layout == "interleaved"
        self.config = config


def pool_blocks_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    config,
    plan: _Plan | None = None,
    rows: int | None = None,
    num_warps: int = 4,
):
    """Launch 1: ``(qbar [B,Hq,NQB,D], kbarT [B,Hkv,D,NKB_P], qstats [B,Hq,3,NQB],
    kstats [B,Hkv,3,NKB])``, fp32; stats = per-block sums of squares (all, high band, low band).
    ``kbarT``'s rows are padded to ``NKB_P = max(16, next_pow2(NKB))`` (the padding is not written).
    ``rows``: tokens per load (default 8192 // D: 64 at D=128, 3.4 TB/s on an H200)."""
    pl = plan or _Plan(q, k, config)
    dev = q.device
    qbar = torch.empty(pl.b, pl.hq, pl.nqb, pl.d, device=dev, dtype=torch.float32)
    kbarT = torch.empty(pl.b, pl.hkv, pl.d, pl.nkb_p, device=dev, dtype=torch.float32)
    if pl.nkb_p > pl.nkb:  # padding only reaches invisible columns; keep it finite anyway
        kbarT[..., pl.nkb :].zero_()
    qst = torch.empty(pl.b, pl.hq, 3, pl.nqb, device=dev, dtype=torch.float32)
    kst = torch.empty(pl.b, pl.hkv, 3, pl.nkb, device=dev, dtype=torch.float32)
    d_p = max(16, _next_pow2(pl.d))
    rows = max(1, min(pl.bs, rows or 8192 // d_p))
    n_qprog = pl.b * pl.hq * pl.nqb
    _pool_kernel[(n_qprog + pl.b * pl.hkv * pl.nkb,)](
        q,
        *q.stride(),
        k,
        *k.stride(),
        qbar,
        kbarT,
        qst,
        kst,
        pl.hq,
        pl.hkv,
        pl.sq,
        pl.sk,
        pl.nqb,
        pl.nkb,
        pl.nkb_p,
        pl.d,
        pl.half,
        pl.w_hi // 2,
        pl.half - pl.w_lo // 2,
        n_qprog,
        INTERLEAVED=pl.interleaved,
        BS=pl.bs,
        D_P=d_p,
        ROWS=rows,
        num_warps=num_warps,
    )
    return qbar, kbarT, qst, kst


def select_from_pooled(
    pooled,
    q: torch.Tensor,
    k: torch.Tensor,
    config,
    launch: SelectConfig | None = None,
    plan: _Plan | None = None,
    return_kernel: bool = False,
    debug: int = 0,
):
    """Launch 2: the four block lists from :func:`pool_blocks_fused`'s output.

    ``return_kernel=True`` also returns Triton's compiled-kernel handle (``n_regs``, ``n_spills``)."""
    pl = plan or _Plan(q, k, config)
    qbar, kbarT, qst, kst = pooled
    dev = q.device
    launch = launch or pick_select_config(pl.g, pl.nkb, q.device.type)
    block_n = pl.nkb_p
    if launch.block_g * launch.block_q < 16:
        raise ValueError("a select tile needs >= 16 rows (tl.dot)")
    n_q_tiles = math.ceil(pl.nqb / launch.block_q)
    n_g_tiles = math.ceil(pl.g / launch.block_g)
    half, d = pl.half, pl.d
    if pl.interleaved:  # pair j = dims 2j, 2j+1: each band is one contiguous range
        hi_seg = (0, 0, pl.w_hi)
        lo_seg = (2 * (half - pl.w_lo // 2), 0, pl.w_lo)
        n_segs = 1
    else:  # rotate_half: pair j = dims j, j + D/2
        hi_seg = (0, half, pl.w_hi // 2)
        lo_seg = (half - pl.w_lo // 2, d - pl.w_lo // 2, pl.w_lo // 2)
        n_segs = 2
    c = config
    p_hi = c.threshold if c.threshold_high is None else c.threshold_high
    p_lo = c.threshold if c.threshold_low is None else c.threshold_low
    rule = _RULES[c.rule]
    if rule == 0:
        tgt_hi, tgt_lo = float(p_hi), float(p_lo)
        all_hi, all_lo = p_hi >= 1.0, p_lo >= 1.0
    elif rule == 1:
        tgt_hi = tgt_lo = float(int(c.top_k))
        all_hi = all_lo = False
    else:
        tgt_hi = tgt_lo = float(c.min_prob)
        all_hi = all_lo = False
    st_chunk = min(1024, max(16, _next_pow2(max(pl.nqb, pl.nkb))))

    b, hq, nqb, nkb = pl.b, pl.hq, pl.nqb, pl.nkb
    kv_num = torch.empty(b, hq, nqb, device=dev, dtype=torch.int32)
    full_num = torch.empty(b, hq, nqb, device=dev, dtype=torch.int32)
    kv_idx = torch.empty(b, hq, nqb, nkb, device=dev, dtype=torch.int32)
    full_idx = torch.empty(b, hq, nqb, nkb, device=dev, dtype=torch.int32)
    grid = (n_q_tiles * n_g_tiles * b * pl.hkv,)
    kernel = _select_kernel[grid](
        qbar,
        kbarT,
        qst,
        kst,
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        hq,
        pl.hkv,
        pl.g,
        pl.sq,
        nqb,
        nkb,
        pl.nkb_p,
        d,
        pl.sk - pl.sq,
        *hi_seg,
        *lo_seg,
        pl.w_hi,
        pl.w_lo,
        1.0 / math.sqrt(pl.w_hi),
        1.0 / math.sqrt(pl.w_lo),
        math.sqrt(pl.w_hi / d),
        math.sqrt(pl.w_lo / d),
        tgt_hi,
        tgt_lo,
        n_q_tiles,
        n_g_tiles,
        N_SEGS=n_segs,
        CALIBRATE=bool(c.calibrate),
        RULE=rule,
        ALL_HI=bool(all_hi),
        ALL_LO=bool(all_lo),
        FORCE_SINK=bool(c.force_sink),
        FORCE_DIAG=bool(c.force_diagonal),
        BS=pl.bs,
        BLOCK_G=launch.block_g,
        BLOCK_Q=launch.block_q,
        BLOCK_N=block_n,
        KC=launch.kc,
        ST_CHUNK=st_chunk,
        NQ_CHUNKS=math.ceil(nqb / st_chunk),
        NK_CHUNKS=math.ceil(nkb / st_chunk),
        DOT_PREC=launch.dot_prec,
        TIERS=launch.tiers,
        DEBUG=debug,
        TUPLE_REDUCE=not _interpreting(q),
        EVEN_K=(hi_seg[2] % launch.kc == 0) and (lo_seg[2] % launch.kc == 0),
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )
    lists = (kv_num, kv_idx, full_num, full_idx)
    return (lists, kernel) if return_kernel else lists


def prism_select_block_lists(
    q: torch.Tensor,
    k: torch.Tensor,
    config,
    launch: SelectConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prism selection of ``q [B, Hq, Sq, D]``, ``k [B, Hkv, Sk, D]`` as BlockMask block lists.

    ``config``: a ``prism.scorers.prism.PrismConfig`` (block_size, threshold(_high/_low), rule,
    top_k, min_prob, high_dims, low_dims, calibrate, rope_layout, force_sink, force_diagonal).
    Returns ``(kv_num, kv_idx, full_num, full_idx)``: int32 ``[B, Hq, NQB]`` and
    ``[B, Hq, NQB, NKB]`` — partial (causal-frontier) blocks and full blocks, selected indices first
    in ascending order (the layout of ``prism.masks.bool_to_block_lists``). Two launches.
    """
    plan = _Plan(q, k, config)
    pooled = pool_blocks_fused(q, k, config, plan)
    return select_from_pooled(pooled, q, k, config, launch, plan)


def block_lists_to_block_mask(
    kv_num, kv_idx, full_num, full_idx, sq: int, sk: int, block_size: int
):
    """FlexAttention ``BlockMask`` (partial blocks with the causal ``mask_mod``, full blocks
    without) from the four lists, exactly as ``prism.masks.selection_to_block_mask`` builds it."""
    from prism.masks.blockmask import lists_to_block_mask

    return lists_to_block_mask(kv_num, kv_idx, full_num, full_idx, sq, sk, block_size)


def block_lists_to_selection(lists, sq: int, sk: int, block_size: int, **info):
    """A :class:`prism.scorers.prism_fused.ListBlockSelection` carrying the lists (its
    ``block_mask()`` reuses them; its ``mask`` is expanded from them lazily)."""
    from ...scorers.prism_fused import ListBlockSelection

    return ListBlockSelection(lists, sq, sk, block_size, info=dict(info))
