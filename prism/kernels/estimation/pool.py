"""Fused Prism estimator, launch 1: block means and the calibration statistics (Triton).

``_pool_kernel`` — one program per block of Q (BSQ rows) *and* of K (BSK rows; one grid for
both): the fp32 block mean
(zero padding of the last block included, as ``prism.scorers.pooling.pool_blocks``), written as
``qbar [B, Hq, NQB, D]`` and transposed ``kbarT [B, Hkv, D, NKB_P]`` (rows padded to a power of
two for the select kernel's unmasked loads), plus three per-block sums of squares of the mean (all
dims, high band, low band) from which :mod:`.select` derives the energy-calibration temperatures.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .op import Plan, _next_pow2

__all__ = ["pool_blocks_fused"]


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
    BSQ: tl.constexpr,
    BSK: tl.constexpr,
    D_P: tl.constexpr,
    ROWS_Q: tl.constexpr,
    ROWS_K: tl.constexpr,
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
            BSQ,
            D_P,
            ROWS_Q,
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
            BSK,
            D_P,
            ROWS_K,
        )


def pool_blocks_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    plan: Plan,
    rows: int | None = None,
    num_warps: int = 4,
):
    """Launch 1: ``(qbar [B,Hq,NQB,D], kbarT [B,Hkv,D,NKB_P], qstats [B,Hq,3,NQB],
    kstats [B,Hkv,3,NKB])``, fp32; stats = per-block sums of squares (all, high band, low band).
    ``kbarT``'s rows are padded to ``NKB_P = max(16, next_pow2(NKB))`` (the padding is zeroed).
    ``rows``: tokens per load (default 8192 // D: 64 at D=128, 3.4 TB/s on an H200)."""
    pl = plan
    dev = q.device
    qbar = torch.empty(pl.b, pl.hq, pl.nqb, pl.d, device=dev, dtype=torch.float32)
    kbarT = torch.empty(pl.b, pl.hkv, pl.d, pl.nkb_p, device=dev, dtype=torch.float32)
    if pl.nkb_p > pl.nkb:  # padding only reaches invisible columns; keep it finite anyway
        kbarT[..., pl.nkb :].zero_()
    qst = torch.empty(pl.b, pl.hq, 3, pl.nqb, device=dev, dtype=torch.float32)
    kst = torch.empty(pl.b, pl.hkv, 3, pl.nkb, device=dev, dtype=torch.float32)
    d_p = max(16, _next_pow2(pl.d))
    rows = rows or 8192 // d_p
    # a load of ROWS tokens must not cross a block: per grid, the largest power of two <= rows
    # dividing the block (BSQ = 192 rows: 64)
    rows_q, rows_k = (max(1, min(rows, b & -b)) for b in (pl.bq, pl.bs))
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
        BSQ=pl.bq,
        BSK=pl.bs,
        D_P=d_p,
        ROWS_Q=rows_q,
        ROWS_K=rows_k,
        num_warps=num_warps,
    )
    return qbar, kbarT, qst, kst
