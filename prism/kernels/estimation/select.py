"""Fused Prism estimator, launch 2: scores -> softmax -> top-p -> union -> BlockMask lists (Triton).

``_select_kernel`` — one program per tile of ``R = BLOCK_G x BLOCK_Q`` rows (16): ``BLOCK_G``
query heads of one KV group (GQA: K̄ is read once for the group) times ``BLOCK_Q`` query blocks,
each row holding ALL its KV blocks in registers. Per program: the calibration temperatures from
:mod:`.pool`'s per-block sums (no extra launch); per band the pooled logits with ``tl.dot``
(``ieee`` fp32, or ``tf32x3`` = three TF32 tensor-core products, fp32-level accuracy, the CUDA
default from 16K tokens); the block-causal fp32 softmax; the rule's kept set (top-p by the
threshold search below); the union of the bands, the forced sink / partial (diagonal) blocks, the
causal clip; and the two block lists written straight into the BlockMask tensors (one prefix
scan gives the positions in both lists).

*Causal tiers*: the register row width is a compile-time constant, so a tile whose rows see at
most a quarter (half) of ``BLOCK_N = next_pow2(NKB)`` KV blocks runs a copy of the tile body
compiled for that narrower width (one launch, three code paths): 0.69 of the full-width work.
The tile body is the constexpr ``TILE`` argument (default :func:`_select_tile`, the production
body); ``benchmarks/_estimator_variants.py`` passes timing-only bodies built from the same pieces.

Nothing of size ``[B, Hq, NQB, NKB]`` other than the returned lists is ever allocated: the
probabilities live in registers only.

**Top-p without a sort: which rule, and ties.** This is the rule of
:func:`prism.masks.select.top_p` (the PyTorch path's rule; a third implementation, kept because it
is a kernel): keep a block iff the probability mass strictly before it in descending order is
``< p``. Let ``F(t)`` = mass of the row's blocks with probability ``> t``. Where the values are
distinct, a block of probability ``v`` is kept iff ``F(v) < p``; ``F`` is non-increasing, so the
kept set is ``{prob >= t*}`` with ``t* = min{t : F(t) < p}``. Probabilities are non-negative
floats, whose bit patterns (int32) order like the values, so ``t*`` is found by bisection on the
integer bit pattern: the invariant is ``F(lo) >= p`` and ``F(hi) < p`` (``hi`` starts one bit above
the row max, where ``F = 0``; ``lo`` starts at -1, below every value, or for top-p at
``(1 - p) / (2 nvis)``, which is provably invalid too since ``F(t) >= 1 - nvis t``). The search
stops when ``hi = lo + 1`` or when at most one probability lies in ``(lo, hi]`` (that value ``v``
has ``F(v) = F(hi) < p``: it is kept); the kept set is then ``{prob > lo}``. Each round is one
fused (count, mass) row reduction (top-k: the count only, and a row stops as soon as exactly
k values lie above ``lo``); 5-20 rounds per row instead of a sort + cumsum. ``search="quad"``
(:func:`_threshold_keep_quad`) tests three thresholds per round (one tuple reduction, two counts
packed per int32): half the rounds for more registers per row, hence the same kept set; the
``"auto"`` default (:func:`pick_search`) takes it for top-k and for short rows.

*Ties*: blocks with exactly equal probability are kept or dropped together. ``masks.select.top_p``
orders equal values by ascending KV block index (a stable sort) and may keep only the first of a
tie straddling the target; the kernel then keeps every block of that tie, i.e. a superset of
``top_p``'s set that differs by tied blocks at the boundary only (``F(v) < p`` holds for the whole
tie exactly when ``top_p`` keeps its first member). ``rule="top_k"`` uses the same search on counts
(``count(prob > t) < k``; every block tied with the k-th value is kept, where ``torch.topk`` picks
some); ``rule="min_prob"`` is a plain comparison (identical to ``masks.select.min_prob``).

*Rounding*: sums are taken in a different order than ``torch.cumsum`` over the sorted row (and
``tf32x3`` products round differently from fp32 FMAs), so a block whose "mass before" is within
rounding of ``p`` may be decided differently. On the H200: 0 of 5,824 (b, head, query-block) rows
differed in the fp32 and bf16 checks up to 16K tokens; 3 of 16,384 rows at 64K and 3 of 32,768 at
128K (bf16; the same counts with exact ``ieee`` dots, so these are summation-order effects).

List format (as ``prism.masks.bool_to_block_lists``): per (b, h, query block) ``num`` int32 and an
int32 row of NKB entries, the selected KV block indices first in ascending order, then the
unselected ones ascending (every entry written, every entry a valid index). ``kv_*`` hold the
selected partial (causal-frontier) blocks, ``full_kv_*`` the other selected blocks.

Written for the Triton 3.2-3.9 language surface (checked on 3.6 on the GPU, 3.9 in the
interpreter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .op import Plan, _next_pow2

__all__ = ["SelectConfig", "pick_select_config", "select_from_pooled"]


# ------------------------------------------------------------------------------------------------
# pieces of a tile body (jit helpers, also used by the benchmark's timing-only variants)
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
def _tile_rows(
    b,
    qt,
    gt,
    kvh,
    HQ,
    G,
    SQ,
    NQB,
    NKB,
    PREFIX,
    BS: tl.constexpr,
    BSQ: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Block-causal geometry of the tile's R = BLOCK_G * BLOCK_Q rows (row r: query head
    ``kvh * G + gt * BLOCK_G + r // BLOCK_Q``, query block ``qt * BLOCK_Q + r % BLOCK_Q``).

    Returns ``(r, qi, row_ok, bh, j, nvis, vis, part)``: row ids [R], query blocks [R], valid rows
    [R], flat (b, h) [R], KV block ids [BLOCK_N], visible counts [R], visible / partial [R, BLOCK_N].
    """
    R: tl.constexpr = BLOCK_G * BLOCK_Q
    r = tl.arange(0, R)
    g = gt * BLOCK_G + r // BLOCK_Q
    qi = qt * BLOCK_Q + r % BLOCK_Q
    row_ok = (g < G) & (qi < NQB)
    bh = b * HQ + kvh * G + g
    j = tl.arange(0, BLOCK_N)
    last_q = PREFIX + tl.minimum((qi + 1) * BSQ, SQ) - 1  # absolute position of the last query
    nvis = tl.where(row_ok, tl.minimum(last_q // BS + 1, NKB), 0)
    vis = j[None, :] < nvis[:, None]
    part = vis & ((j[None, :] * BS + BS - 1) > (PREFIX + qi * BSQ)[:, None])
    return r, qi, row_ok, bh, j, nvis, vis, part


@triton.jit
def _program_tile(n_q_tiles, n_g_tiles, HKV):
    """This program's tile ``(qt, gt, bkv, b, kvh)``: query tile, head tile, flat b * HKV + KV
    head and its parts. Largest query tiles (most KV blocks) first; the G heads of a KV head are
    adjacent."""
    pid = tl.program_id(0)
    qt = n_q_tiles - 1 - pid % n_q_tiles
    rest = pid // n_q_tiles
    gt = rest % n_g_tiles
    bkv = rest // n_g_tiles  # b * HKV + kv head
    return qt, gt, bkv, bkv // HKV, bkv % HKV


@triton.jit
def _tile_nvis(
    qt, NQB, NKB, SQ, PREFIX, BS: tl.constexpr, BSQ: tl.constexpr, BLOCK_Q: tl.constexpr
):
    """KV blocks visible to the last query row of query tile ``qt`` (decides the causal tier)."""
    qi_last = tl.minimum(qt * BLOCK_Q + BLOCK_Q - 1, NQB - 1)
    return tl.minimum((PREFIX + tl.minimum((qi_last + 1) * BSQ, SQ) - 1) // BS + 1, NKB)


@triton.jit
def _band_probs(acc, scale, vis):
    """Block-causal fp32 softmax of ``acc * scale`` per row (exactly 0 where not visible)."""
    z = tl.where(vis, acc * scale[:, None], float("-inf"))
    m = tl.max(z, 1)
    m = tl.where(m == float("-inf"), 0.0, m)
    e = tl.exp(z - m[:, None])
    den = tl.sum(e, 1)
    den = tl.where(den > 0.0, den, 1.0)
    return e / den[:, None]


@triton.jit
def _search_active(lo, hi, n_lo, n_hi, target, RULE: tl.constexpr):
    """Rows whose kept set ``{prob > lo}`` is not settled yet: more than one value in
    ``(lo, hi]`` and room to bisect; for top-k also ``count(prob > lo) != k`` (exactly k values
    above ``lo`` are the k largest, every smaller one has ``F >= k``: the set is final)."""
    active = ((n_lo - n_hi) > 1) & ((hi - lo) > 1)
    if RULE == 1:
        active = active & (n_lo.to(tl.float32) != target)
    return active


@triton.jit
def _search_start(prob, nvis, target, RULE: tl.constexpr):
    """The search's first bracket per row: ``(lo, hi, n_lo, n_hi, active, go)``."""
    # Invisible entries hold +0.0 (bits 0) and every probe threshold is >= 0, so they are never
    # counted; the final set is clipped to ``vis``.
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
    active = _search_active(lo, hi, n_lo, n_hi, target, RULE)
    go = tl.max(active.to(tl.int32), 0) > 0
    return lo, hi, n_lo, n_hi, active, go


@triton.jit
def _threshold_keep(prob, vis, nvis, target, RULE: tl.constexpr, TUPLE_REDUCE: tl.constexpr):
    """The top-p (``RULE`` 0: mass) / top-k (1: count) set of each row by bisection on the int32
    bit pattern of the threshold (see the module docstring: rule and ties)."""
    lo, hi, n_lo, n_hi, active, go = _search_start(prob, nvis, target, RULE)
    while go:
        mid = lo + (hi - lo) // 2
        above = prob.to(tl.int32, bitcast=True) > mid[:, None]
        if RULE == 1:  # top-k needs the count only
            n_mid = tl.sum(above.to(tl.int32), 1)
            val = n_mid.to(tl.float32)
        elif TUPLE_REDUCE:  # one shuffle tree for both sums
            n_mid, val = tl.reduce((above.to(tl.int32), tl.where(above, prob, 0.0)), 1, _add2)
        else:  # (the interpreter runs a tuple reduce element by element in Python)
            n_mid = tl.sum(above.to(tl.int32), 1)
            val = tl.sum(tl.where(above, prob, 0.0), 1)
        up_hi = active & (val < target)
        up_lo = active & (val >= target)
        hi = tl.where(up_hi, mid, hi)
        n_hi = tl.where(up_hi, n_mid, n_hi)
        lo = tl.where(up_lo, mid, lo)
        n_lo = tl.where(up_lo, n_mid, n_lo)
        active = _search_active(lo, hi, n_lo, n_hi, target, RULE)
        go = tl.max(active.to(tl.int32), 0) > 0
    return vis & (prob.to(tl.int32, bitcast=True) > lo[:, None])


@triton.jit
def _add5(a0, a1, a2, a3, a4, b0, b1, b2, b3, b4):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3, a4 + b4


@triton.jit
def _quarter_sums(bits, prob, m1, m2, m3, RULE: tl.constexpr, TUPLE_REDUCE: tl.constexpr):
    """count(prob > m_i) and the rule's value F(m_i) (mass; top-k: the count) at three probe
    thresholds per row. Two counts share an int32 (16 bits each, the upper one read back sign-extended: BLOCK_N < 32768; MAX_BLOCK_N is 4096)."""
    a1 = bits > m1[:, None]
    a2 = bits > m2[:, None]
    a3 = bits > m3[:, None]
    c12 = a1.to(tl.int32) + (a2.to(tl.int32) << 16)
    c3 = a3.to(tl.int32)
    if RULE == 1:
        if TUPLE_REDUCE:
            s12, n3 = tl.reduce((c12, c3), 1, _add2)
        else:
            s12, n3 = tl.sum(c12, 1), tl.sum(c3, 1)
        n1, n2 = s12 & 65535, s12 >> 16
        v1, v2, v3 = n1.to(tl.float32), n2.to(tl.float32), n3.to(tl.float32)
    else:
        w1 = tl.where(a1, prob, 0.0)
        w2 = tl.where(a2, prob, 0.0)
        w3 = tl.where(a3, prob, 0.0)
        if TUPLE_REDUCE:
            s12, n3, v1, v2, v3 = tl.reduce((c12, c3, w1, w2, w3), 1, _add5)
        else:
            s12, n3 = tl.sum(c12, 1), tl.sum(c3, 1)
            v1, v2, v3 = tl.sum(w1, 1), tl.sum(w2, 1), tl.sum(w3, 1)
        n1, n2 = s12 & 65535, s12 >> 16
    return n1, n2, n3, v1, v2, v3


@triton.jit
def _threshold_keep_quad(prob, vis, nvis, target, RULE: tl.constexpr,
                         TUPLE_REDUCE: tl.constexpr):  # fmt: skip
    """:func:`_threshold_keep` with three thresholds per round (the bracket quartered: two bits
    per row reduction instead of one). Same invariant, same stop rules, hence the same kept set
    (F is monotone in the threshold for any fixed summation order)."""
    bits = prob.to(tl.int32, bitcast=True)
    lo, hi, n_lo, n_hi, active, go = _search_start(prob, nvis, target, RULE)
    while go:
        m2 = lo + (hi - lo) // 2  # lo < m1 <= m2 <= m3 < hi while hi - lo >= 2
        m1 = lo + tl.maximum((m2 - lo) // 2, 1)
        m3 = m2 + (hi - m2) // 2
        n1, n2, n3, v1, v2, v3 = _quarter_sums(bits, prob, m1, m2, m3, RULE, TUPLE_REDUCE)
        ok1 = v1 >= target  # F is non-increasing: ok1 >= ok2 >= ok3
        ok2 = v2 >= target
        ok3 = v3 >= target
        new_lo = tl.where(ok3, m3, tl.where(ok2, m2, tl.where(ok1, m1, lo)))
        new_nlo = tl.where(ok3, n3, tl.where(ok2, n2, tl.where(ok1, n1, n_lo)))
        new_hi = tl.where(ok3, hi, tl.where(ok2, m3, tl.where(ok1, m2, m1)))
        new_nhi = tl.where(ok3, n_hi, tl.where(ok2, n3, tl.where(ok1, n2, n1)))
        lo = tl.where(active, new_lo, lo)
        n_lo = tl.where(active, new_nlo, n_lo)
        hi = tl.where(active, new_hi, hi)
        n_hi = tl.where(active, new_nhi, n_hi)
        active = _search_active(lo, hi, n_lo, n_hi, target, RULE)
        go = tl.max(active.to(tl.int32), 0) > 0
    return vis & (bits > lo[:, None])


@triton.jit
def _band_keep(
    acc,
    scale,
    vis,
    nvis,
    target,
    RULE: tl.constexpr,
    KEEP_ALL: tl.constexpr,
    TUPLE_REDUCE: tl.constexpr,
    QUAD: tl.constexpr = False,
):
    """Softmax of ``acc * scale`` per row, then the rule's kept set (bool [R, BLOCK_N]);
    ``QUAD``: by :func:`_threshold_keep_quad` (the same set)."""
    if KEEP_ALL:
        keep = vis
    else:
        prob = _band_probs(acc, scale, vis)
        if RULE == 2:
            keep = vis & (prob >= target)
        elif QUAD:
            keep = _threshold_keep_quad(prob, vis, nvis, target, RULE, TUPLE_REDUCE)
        else:
            keep = _threshold_keep(prob, vis, nvis, target, RULE, TUPLE_REDUCE)
    return keep


@triton.jit
def _forced_clip(sel, j, vis, part, FORCE_SINK: tl.constexpr, FORCE_DIAG: tl.constexpr):
    """Add the forced sink / partial (diagonal) blocks and clip to the visible blocks."""
    if FORCE_SINK:
        sel = sel | (j == 0)[None, :]
    if FORCE_DIAG:
        sel = sel | part
    return sel & vis


@triton.jit
def _write_lists(
    sel,
    part,
    r,
    j,
    bh,
    qi,
    row_ok,
    kv_num_ptr,
    kv_idx_ptr,
    full_num_ptr,
    full_idx_ptr,
    NQB,
    NKB,
    BLOCK_N: tl.constexpr,
):
    """Both block lists of each row: the selected partial / full KV blocks ascending, then the
    unselected ones ascending (NKB entries per row, every entry written)."""
    psel = sel & part
    fsel = sel & (~part)
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
    num_off = bh * NQB + qi
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
    BSQ: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    TUPLE_REDUCE: tl.constexpr,
    EVEN_K: tl.constexpr,
    ONE_BAND: tl.constexpr,
    QUAD: tl.constexpr = False,
):
    """The production tile body: R = BLOCK_G * BLOCK_Q rows, BLOCK_N >= their visible KV blocks.

    Per band logits -> softmax -> kept set; union; forced blocks; causal clip; both lists."""
    R: tl.constexpr = BLOCK_G * BLOCK_Q
    r, qi, row_ok, bh, j, nvis, vis, part = _tile_rows(
        b, qt, gt, kvh, HQ, G, SQ, NQB, NKB, PREFIX, BS, BSQ, BLOCK_G, BLOCK_Q, BLOCK_N
    )
    qrow_ptr = qbar_ptr + (bh.to(tl.int64) * NQB + qi) * D
    kT_ptr = kbarT_ptr + bkv.to(tl.int64) * D * NKB_P
    acc = _band_logits(
        qrow_ptr, row_ok, kT_ptr, NKB_P, HI_SEG0, HI_SEG1, HI_SEG_LEN,
        N_SEGS, R, BLOCK_N, KC, DOT_PREC, EVEN_K,
    )  # fmt: skip
    sel = _band_keep(acc, scale_hi, vis, nvis, tgt_hi, RULE, ALL_HI, TUPLE_REDUCE, QUAD)
    if not ONE_BAND:  # ONE_BAND: the low band is the high band (same dims, target, scale)
        acc = _band_logits(
            qrow_ptr, row_ok, kT_ptr, NKB_P, LO_SEG0, LO_SEG1, LO_SEG_LEN,
            N_SEGS, R, BLOCK_N, KC, DOT_PREC, EVEN_K,
        )  # fmt: skip
        sel = sel | _band_keep(acc, scale_lo, vis, nvis, tgt_lo, RULE, ALL_LO, TUPLE_REDUCE, QUAD)
    sel = _forced_clip(sel, j, vis, part, FORCE_SINK, FORCE_DIAG)
    _write_lists(
        sel, part, r, j, bh, qi, row_ok, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr,
        NQB, NKB, BLOCK_N,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# the kernel
# ------------------------------------------------------------------------------------------------
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
    BSQ: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KC: tl.constexpr,
    ST_CHUNK: tl.constexpr,
    NQ_CHUNKS: tl.constexpr,
    NK_CHUNKS: tl.constexpr,
    DOT_PREC: tl.constexpr,
    TIERS: tl.constexpr,
    TUPLE_REDUCE: tl.constexpr,
    EVEN_K: tl.constexpr,
    ONE_BAND: tl.constexpr,
    TILE: tl.constexpr,
    QUAD: tl.constexpr,
):
    R: tl.constexpr = BLOCK_G * BLOCK_Q
    qt, gt, bkv, b, kvh = _program_tile(n_q_tiles, n_g_tiles, HKV)
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
    tile_nvis = _tile_nvis(qt, NQB, NKB, SQ, PREFIX, BS, BSQ, BLOCK_Q)
    N4: tl.constexpr = BLOCK_N // 4
    N2: tl.constexpr = BLOCK_N // 2
    if TIERS >= 3 and N4 >= 16:
        if tile_nvis <= N4:
            TILE(
                qbar_ptr, kbarT_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr,
                b, bkv, qt, gt, kvh, scale_hi, scale_lo,
                HQ, G, SQ, NQB, NKB, NKB_P, D, PREFIX,
                HI_SEG0, HI_SEG1, HI_SEG_LEN, LO_SEG0, LO_SEG1, LO_SEG_LEN, tgt_hi, tgt_lo,
                N_SEGS, RULE, ALL_HI, ALL_LO, FORCE_SINK, FORCE_DIAG,
                BS, BSQ, BLOCK_G, BLOCK_Q, N4, KC, DOT_PREC, TUPLE_REDUCE, EVEN_K, ONE_BAND, QUAD,
            )  # fmt: skip
        elif tile_nvis <= N2:
            TILE(
                qbar_ptr, kbarT_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr,
                b, bkv, qt, gt, kvh, scale_hi, scale_lo,
                HQ, G, SQ, NQB, NKB, NKB_P, D, PREFIX,
                HI_SEG0, HI_SEG1, HI_SEG_LEN, LO_SEG0, LO_SEG1, LO_SEG_LEN, tgt_hi, tgt_lo,
                N_SEGS, RULE, ALL_HI, ALL_LO, FORCE_SINK, FORCE_DIAG,
                BS, BSQ, BLOCK_G, BLOCK_Q, N2, KC, DOT_PREC, TUPLE_REDUCE, EVEN_K, ONE_BAND, QUAD,
            )  # fmt: skip
        else:
            TILE(
                qbar_ptr, kbarT_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr,
                b, bkv, qt, gt, kvh, scale_hi, scale_lo,
                HQ, G, SQ, NQB, NKB, NKB_P, D, PREFIX,
                HI_SEG0, HI_SEG1, HI_SEG_LEN, LO_SEG0, LO_SEG1, LO_SEG_LEN, tgt_hi, tgt_lo,
                N_SEGS, RULE, ALL_HI, ALL_LO, FORCE_SINK, FORCE_DIAG,
                BS, BSQ, BLOCK_G, BLOCK_Q, BLOCK_N, KC, DOT_PREC, TUPLE_REDUCE, EVEN_K, ONE_BAND, QUAD,
            )  # fmt: skip
    elif TIERS >= 2 and N2 >= 16:
        if tile_nvis <= N2:
            TILE(
                qbar_ptr, kbarT_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr,
                b, bkv, qt, gt, kvh, scale_hi, scale_lo,
                HQ, G, SQ, NQB, NKB, NKB_P, D, PREFIX,
                HI_SEG0, HI_SEG1, HI_SEG_LEN, LO_SEG0, LO_SEG1, LO_SEG_LEN, tgt_hi, tgt_lo,
                N_SEGS, RULE, ALL_HI, ALL_LO, FORCE_SINK, FORCE_DIAG,
                BS, BSQ, BLOCK_G, BLOCK_Q, N2, KC, DOT_PREC, TUPLE_REDUCE, EVEN_K, ONE_BAND, QUAD,
            )  # fmt: skip
        else:
            TILE(
                qbar_ptr, kbarT_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr,
                b, bkv, qt, gt, kvh, scale_hi, scale_lo,
                HQ, G, SQ, NQB, NKB, NKB_P, D, PREFIX,
                HI_SEG0, HI_SEG1, HI_SEG_LEN, LO_SEG0, LO_SEG1, LO_SEG_LEN, tgt_hi, tgt_lo,
                N_SEGS, RULE, ALL_HI, ALL_LO, FORCE_SINK, FORCE_DIAG,
                BS, BSQ, BLOCK_G, BLOCK_Q, BLOCK_N, KC, DOT_PREC, TUPLE_REDUCE, EVEN_K, ONE_BAND, QUAD,
            )  # fmt: skip
    else:
        TILE(
            qbar_ptr, kbarT_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr,
            b, bkv, qt, gt, kvh, scale_hi, scale_lo,
            HQ, G, SQ, NQB, NKB, NKB_P, D, PREFIX,
            HI_SEG0, HI_SEG1, HI_SEG_LEN, LO_SEG0, LO_SEG1, LO_SEG_LEN, tgt_hi, tgt_lo,
            N_SEGS, RULE, ALL_HI, ALL_LO, FORCE_SINK, FORCE_DIAG,
            BS, BSQ, BLOCK_G, BLOCK_Q, BLOCK_N, KC, DOT_PREC, TUPLE_REDUCE, EVEN_K, ONE_BAND, QUAD,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# host side
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SelectConfig:
    """Launch shape of the select kernel: rows per program ``BLOCK_G * BLOCK_Q`` (>= 16 for
    ``tl.dot``), ``num_warps``, dot K-chunk ``kc``, dot precision (``"ieee"`` = exact fp32,
    ``"tf32x3"``), ``num_stages``, the number of causal tiers (1-3) and the threshold ``search``:
    ``"bisect"`` (one threshold per row reduction), ``"quad"`` (three, :func:`_threshold_keep_quad`;
    the same set) or ``"auto"`` (:func:`pick_search`)."""

    block_g: int
    block_q: int
    num_warps: int
    kc: int = 16
    dot_prec: str = "ieee"
    num_stages: int = 1
    tiers: int = 1
    search: str = "auto"


SEARCHES = ("auto", "bisect", "quad")


def pick_search(search: str, rule: int, block_n: int) -> str:
    """The threshold search a select launch runs: ``"auto"`` takes ``"quad"`` for top-k (rule 1)
    and for rows of at most 128 KV blocks (<= 16K tokens at BS = 128), ``"bisect"`` otherwise —
    the faster of the two in ``benchmarks/results/select_search_s8a_h200.log`` (H200, Hq = 32,
    Hkv = 8): quad is 2.7-3.1x faster for the Prism / mean-pool select at 8K (one wave of
    latency-bound programs: half the rounds), 4 % faster for mean-pool top-k at 128K, and 4-6 %
    slower for top-p at 32K-128K (more registers per row, fewer programs per SM)."""
    if search not in SEARCHES:
        raise ValueError(f"unknown search {search!r}; valid: {list(SEARCHES)}")
    if search != "auto":
        return search
    return "quad" if rule == 1 or block_n <= 128 else "bisect"


def pick_select_config(
    g: int, nkb: int, device_type: str = "cuda", rows: int = 16, elems_per_thread: int = 16
) -> SelectConfig:
    """Default launch shape (tuned on an H200, see benchmarks/results/estimator_h200*.md): 16 rows
    (the GQA group first when G is a power of two, else one head per row group) and about ``elems_per_thread`` fp32 of one [rows, BLOCK_N] register tile
    per thread (2 to 16 warps). For BLOCK_N >= 128 (>= 16K tokens at BS=128) the causal tiers are
    on and, on CUDA, the pooled dot products run as ``tf32x3`` (three TF32 tensor-core products,
    fp32-level accuracy; plain ``ieee`` fp32 runs as FMA loops that spill at BLOCK_N = 1024 and cost
    0.8 ms more at 128K). Short rows keep exact ``ieee`` fp32 and one tier (faster there)."""
    block_n = max(16, _next_pow2(nkb))
    # a group that is not a power of two would leave row slots idle in every tile (G = 3: one
    # of 4): take its heads one at a time instead (K̄ is then read once per head, from L2);
    # the same lists, 9 % / 15 % faster at 32K / 128K for SmolLM2's G = 3 on the H200
    # (benchmarks/results/estimator_share_h200.log)
    block_g = min(_next_pow2(g), rows) if _next_pow2(g) == g else 1
    block_q = max(1, rows // block_g)
    warps = rows * block_n // (32 * elems_per_thread)
    warps = max(2, min(16, _next_pow2(max(1, warps))))
    if block_n >= 128:
        prec = "tf32x3" if device_type == "cuda" else "ieee"
        return SelectConfig(block_g, block_q, warps, dot_prec=prec, tiers=3)
    return SelectConfig(block_g, block_q, warps, dot_prec="ieee", tiers=1)


def select_from_pooled(
    pooled,
    plan: Plan,
    launch: SelectConfig | None = None,
    *,
    tile=None,
    return_kernel: bool = False,
):
    """Launch 2: the four block lists ``(kv_num, kv_idx, full_num, full_idx)`` from
    :func:`~prism.kernels.estimation.pool.pool_blocks_fused`'s output.

    ``tile``: the tile body (a ``@triton.jit`` function with :func:`_select_tile`'s signature;
    default :func:`_select_tile`). ``return_kernel=True`` also returns Triton's compiled-kernel
    handle (``n_regs``, ``n_spills``)."""
    pl = plan
    qbar, kbarT, qst, kst = pooled
    dev = qbar.device
    launch = launch or pick_select_config(pl.g, pl.nkb, pl.device_type)
    if launch.block_g * launch.block_q < 16:
        raise ValueError("a select tile needs >= 16 rows (tl.dot)")
    n_q_tiles = math.ceil(pl.nqb / launch.block_q)
    n_g_tiles = math.ceil(pl.g / launch.block_g)
    st_chunk = min(1024, max(16, _next_pow2(max(pl.nqb, pl.nkb))))

    b, hq, nqb, nkb, d = pl.b, pl.hq, pl.nqb, pl.nkb, pl.d
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
        *pl.hi_seg,
        *pl.lo_seg,
        pl.w_hi,
        pl.w_lo,
        1.0 / math.sqrt(pl.w_hi),
        1.0 / math.sqrt(pl.w_lo),
        math.sqrt(pl.w_hi / d),
        math.sqrt(pl.w_lo / d),
        pl.tgt_hi,
        pl.tgt_lo,
        n_q_tiles,
        n_g_tiles,
        N_SEGS=pl.n_segs,
        CALIBRATE=bool(pl.params.calibrate),
        RULE=pl.rule,
        ALL_HI=bool(pl.all_hi),
        ALL_LO=bool(pl.all_lo),
        FORCE_SINK=bool(pl.params.force_sink),
        FORCE_DIAG=bool(pl.params.force_diagonal),
        BS=pl.bs,
        BSQ=pl.bq,
        BLOCK_G=launch.block_g,
        BLOCK_Q=launch.block_q,
        BLOCK_N=pl.nkb_p,
        KC=launch.kc,
        ST_CHUNK=st_chunk,
        NQ_CHUNKS=math.ceil(nqb / st_chunk),
        NK_CHUNKS=math.ceil(nkb / st_chunk),
        DOT_PREC=launch.dot_prec,
        TIERS=launch.tiers,
        TUPLE_REDUCE=pl.device_type != "cpu",  # CPU tensors run under the interpreter
        EVEN_K=(pl.hi_seg[2] % launch.kc == 0) and (pl.lo_seg[2] % launch.kc == 0),
        ONE_BAND=bool(pl.one_band),
        TILE=_select_tile if tile is None else tile,
        QUAD=pick_search(launch.search, pl.rule, pl.nkb_p) == "quad",
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )
    lists = (kv_num, kv_idx, full_num, full_idx)
    return (lists, kernel) if return_kernel else lists
