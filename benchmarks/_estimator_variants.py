"""Timing-only variants of the fused Prism select kernel (for ``bench_estimator.py`` only).

Each is a tile body for :func:`prism.kernels.estimation.select.select_from_pooled`'s ``tile``
argument, built from the production kernel's pieces with one stage cut out, so that the
difference to the production time attributes the select time to that stage:

* ``1`` — :func:`no_search_tile`: no threshold search (keep ``prob >= 1 / nvis`` instead);
* ``2`` — :func:`counts_only_tile`: no list writing (the two list lengths only);
* ``3`` — :func:`logits_only_tile`: logits only (no softmax, no search: keep ``logit > 0``).

Their selections are meaningless; only their times are of interest. They always score both
bands (``ONE_BAND`` is ignored): they time Prism's select kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl

from prism.kernels.estimation.select import (
    _band_keep,
    _band_logits,
    _band_probs,
    _forced_clip,
    _tile_rows,
    _write_lists,
)


@triton.jit
def _write_counts(sel, part, bh, qi, row_ok, kv_num_ptr, full_num_ptr, NQB):
    """Store the two list lengths of each row (partial, full)."""
    num_off = bh * NQB + qi
    tl.store(full_num_ptr + num_off, tl.sum((sel & (~part)).to(tl.int32), 1), mask=row_ok)
    tl.store(kv_num_ptr + num_off, tl.sum((sel & part).to(tl.int32), 1), mask=row_ok)


@triton.jit
def _variant_keep(acc, scale, vis, nvis, target, RULE: tl.constexpr, KEEP_ALL: tl.constexpr,
                  TUPLE_REDUCE: tl.constexpr, VARIANT: tl.constexpr):  # fmt: skip
    if VARIANT == 3:  # logits only
        keep = vis & (acc > 0.0)
    elif VARIANT == 1:  # softmax, no threshold search
        prob = _band_probs(acc, scale, vis)
        keep = vis & (prob * nvis[:, None].to(tl.float32) >= 1.0)
    else:
        keep = _band_keep(acc, scale, vis, nvis, target, RULE, KEEP_ALL, TUPLE_REDUCE)
    return keep


# fmt: off
@triton.jit
def _variant_tile(
    qbar_ptr, kbarT_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr,
    b, bkv, qt, gt, kvh, scale_hi, scale_lo,
    HQ, G, SQ, NQB, NKB, NKB_P, D, PREFIX,
    HI_SEG0, HI_SEG1, HI_SEG_LEN, LO_SEG0, LO_SEG1, LO_SEG_LEN, tgt_hi, tgt_lo,
    N_SEGS: tl.constexpr, RULE: tl.constexpr, ALL_HI: tl.constexpr, ALL_LO: tl.constexpr,
    FORCE_SINK: tl.constexpr, FORCE_DIAG: tl.constexpr, BS: tl.constexpr, BSQ: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, KC: tl.constexpr,
    DOT_PREC: tl.constexpr, TUPLE_REDUCE: tl.constexpr, EVEN_K: tl.constexpr,
    VARIANT: tl.constexpr,
):
    """The production tile body (``select._select_tile``) with stage ``VARIANT`` cut out."""
    R: tl.constexpr = BLOCK_G * BLOCK_Q
    r, qi, row_ok, bh, j, nvis, vis, part = _tile_rows(
        b, qt, gt, kvh, HQ, G, SQ, NQB, NKB, PREFIX, BS, BSQ, BLOCK_G, BLOCK_Q, BLOCK_N
    )
    qrow_ptr = qbar_ptr + (bh.to(tl.int64) * NQB + qi) * D
    kT_ptr = kbarT_ptr + bkv.to(tl.int64) * D * NKB_P
    acc = _band_logits(qrow_ptr, row_ok, kT_ptr, NKB_P, HI_SEG0, HI_SEG1, HI_SEG_LEN,
                       N_SEGS, R, BLOCK_N, KC, DOT_PREC, EVEN_K)
    sel = _variant_keep(acc, scale_hi, vis, nvis, tgt_hi, RULE, ALL_HI, TUPLE_REDUCE, VARIANT)
    acc = _band_logits(qrow_ptr, row_ok, kT_ptr, NKB_P, LO_SEG0, LO_SEG1, LO_SEG_LEN,
                       N_SEGS, R, BLOCK_N, KC, DOT_PREC, EVEN_K)
    sel = sel | _variant_keep(acc, scale_lo, vis, nvis, tgt_lo, RULE, ALL_LO, TUPLE_REDUCE,
                              VARIANT)
    sel = _forced_clip(sel, j, vis, part, FORCE_SINK, FORCE_DIAG)
    if VARIANT == 2:
        _write_counts(sel, part, bh, qi, row_ok, kv_num_ptr, full_num_ptr, NQB)
    else:
        _write_lists(sel, part, r, j, bh, qi, row_ok, kv_num_ptr, kv_idx_ptr, full_num_ptr,
                     full_idx_ptr, NQB, NKB, BLOCK_N)


@triton.jit
def no_search_tile(
    qbar_ptr, kbarT_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr,
    b, bkv, qt, gt, kvh, scale_hi, scale_lo,
    HQ, G, SQ, NQB, NKB, NKB_P, D, PREFIX,
    HI_SEG0, HI_SEG1, HI_SEG_LEN, LO_SEG0, LO_SEG1, LO_SEG_LEN, tgt_hi, tgt_lo,
    N_SEGS: tl.constexpr, RULE: tl.constexpr, ALL_HI: tl.constexpr, ALL_LO: tl.constexpr,
    FORCE_SINK: tl.constexpr, FORCE_DIAG: tl.constexpr, BS: tl.constexpr, BSQ: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, KC: tl.constexpr,
    DOT_PREC: tl.constexpr, TUPLE_REDUCE: tl.constexpr, EVEN_K: tl.constexpr,
    ONE_BAND: tl.constexpr,  # ignored: the variants always score both bands
    QUAD: tl.constexpr = False,  # ignored: the bisection
):
    _variant_tile(
        qbar_ptr, kbarT_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr,
        b, bkv, qt, gt, kvh, scale_hi, scale_lo, HQ, G, SQ, NQB, NKB, NKB_P, D, PREFIX,
        HI_SEG0, HI_SEG1, HI_SEG_LEN, LO_SEG0, LO_SEG1, LO_SEG_LEN, tgt_hi, tgt_lo,
        N_SEGS, RULE, ALL_HI, ALL_LO, FORCE_SINK, FORCE_DIAG, BS, BSQ,
        BLOCK_G, BLOCK_Q, BLOCK_N, KC, DOT_PREC, TUPLE_REDUCE, EVEN_K, 1,
    )


@triton.jit
def counts_only_tile(
    qbar_ptr, kbarT_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr,
    b, bkv, qt, gt, kvh, scale_hi, scale_lo,
    HQ, G, SQ, NQB, NKB, NKB_P, D, PREFIX,
    HI_SEG0, HI_SEG1, HI_SEG_LEN, LO_SEG0, LO_SEG1, LO_SEG_LEN, tgt_hi, tgt_lo,
    N_SEGS: tl.constexpr, RULE: tl.constexpr, ALL_HI: tl.constexpr, ALL_LO: tl.constexpr,
    FORCE_SINK: tl.constexpr, FORCE_DIAG: tl.constexpr, BS: tl.constexpr, BSQ: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, KC: tl.constexpr,
    DOT_PREC: tl.constexpr, TUPLE_REDUCE: tl.constexpr, EVEN_K: tl.constexpr,
    ONE_BAND: tl.constexpr,  # ignored: the variants always score both bands
    QUAD: tl.constexpr = False,  # ignored: the bisection
):
    _variant_tile(
        qbar_ptr, kbarT_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr,
        b, bkv, qt, gt, kvh, scale_hi, scale_lo, HQ, G, SQ, NQB, NKB, NKB_P, D, PREFIX,
        HI_SEG0, HI_SEG1, HI_SEG_LEN, LO_SEG0, LO_SEG1, LO_SEG_LEN, tgt_hi, tgt_lo,
        N_SEGS, RULE, ALL_HI, ALL_LO, FORCE_SINK, FORCE_DIAG, BS, BSQ,
        BLOCK_G, BLOCK_Q, BLOCK_N, KC, DOT_PREC, TUPLE_REDUCE, EVEN_K, 2,
    )


@triton.jit
def logits_only_tile(
    qbar_ptr, kbarT_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr,
    b, bkv, qt, gt, kvh, scale_hi, scale_lo,
    HQ, G, SQ, NQB, NKB, NKB_P, D, PREFIX,
    HI_SEG0, HI_SEG1, HI_SEG_LEN, LO_SEG0, LO_SEG1, LO_SEG_LEN, tgt_hi, tgt_lo,
    N_SEGS: tl.constexpr, RULE: tl.constexpr, ALL_HI: tl.constexpr, ALL_LO: tl.constexpr,
    FORCE_SINK: tl.constexpr, FORCE_DIAG: tl.constexpr, BS: tl.constexpr, BSQ: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, KC: tl.constexpr,
    DOT_PREC: tl.constexpr, TUPLE_REDUCE: tl.constexpr, EVEN_K: tl.constexpr,
    ONE_BAND: tl.constexpr,  # ignored: the variants always score both bands
    QUAD: tl.constexpr = False,  # ignored: the bisection
):
    _variant_tile(
        qbar_ptr, kbarT_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr,
        b, bkv, qt, gt, kvh, scale_hi, scale_lo, HQ, G, SQ, NQB, NKB, NKB_P, D, PREFIX,
        HI_SEG0, HI_SEG1, HI_SEG_LEN, LO_SEG0, LO_SEG1, LO_SEG_LEN, tgt_hi, tgt_lo,
        N_SEGS, RULE, ALL_HI, ALL_LO, FORCE_SINK, FORCE_DIAG, BS, BSQ,
        BLOCK_G, BLOCK_Q, BLOCK_N, KC, DOT_PREC, TUPLE_REDUCE, EVEN_K, 3,
    )
# fmt: on

#: benchmark label -> tile body (0 = the production body)
VARIANTS = {1: no_search_tile, 2: counts_only_tile, 3: logits_only_tile}
