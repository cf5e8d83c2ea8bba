"""The probe scorer's pooled-key estimate on the GPU (Triton): key-block means, then per query
block the softmax of every ``stride``-th query row over the mean keys, averaged per head.

Definition (``prism.scorers.probe.pooled_key_block_probs`` is the PyTorch path, the float64 loop
reference is ``tests/naive_probe.py::naive_pooled_key_probs``): query block i's pooled rows are
the offsets ``s//2, s//2 + s, ...`` of its ``L_i`` rows (its last row when ``L_i <= s//2``);
row r (absolute position ``a = P + i·BS + r``, P = Sk − Sq) scores KV block j <= a // BS by
``q_r · k̄_j / sqrt(D) + log n_j`` (``k̄_j`` the mean of the block's ``n_j`` real keys), the row's
softmax over those blocks is taken, and the rows of the block are averaged: float32
``[B, Hq, NQB, NKB]``, rows summing to 1, exactly 0 past each row's own block.

Two launches:

* ``_key_means_kernel`` — one program per (KV block, b · KV head): the fp32 mean of the block's
  real keys, stored ``[B·Hkv, NKB, BLOCK_D]`` (D padded with zeros). For bf16 / fp16 queries it
  is stored as two halves in the query dtype, ``hi = mean`` rounded and ``lo = mean − hi``
  rounded, so that the logits are two tensor-core products ``q·hi + q·lo`` with the mean's error
  down to ~2^-16 relative (the queries are exact in their own dtype); float32 queries take one
  ``ieee`` product.
* ``_pooled_probs_kernel`` — one program per (query block, b · KV head, head group): its
  ``M = GH · RPB`` rows (GH query heads of the GQA group x the block's pooled rows, padded to a
  power of two, K never repeated) walk the visible mean keys in tiles of ``BLOCK_N`` blocks twice
  — the row max and sum (online, base 2), then the normalised probabilities — and sum each
  head's rows into the output row. Memory: the means (``NKB · D`` per KV head) and the output;
  nothing of size ``[Sq, Sk]`` or ``[rows, NKB]`` is stored.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .op import _next_pow2

LOG2E = 1.4426950408889634
# pooled rows per program (heads x rows of a block); more heads -> more programs. One head's rows
# are never split, so BS 256 at stride 1 runs 256 rows (bf16: ~160 KB of shared memory on sm_90)
MAX_ROWS = 128


@triton.jit
def _key_means_kernel(
    k_ptr, skb, skh, sks, skd, hi_ptr, lo_ptr, HKV, SK, NKB, D,
    BS: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    blk = tl.program_id(0)
    bkv = tl.program_id(1)
    b = bkv // HKV
    h = bkv % HKV
    offs_r = tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    base = k_ptr + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    end = tl.minimum(blk * BS + BS, SK)
    for r0 in tl.static_range(0, BS, ROWS):
        rows = blk * BS + r0 + offs_r
        m = (rows < end)[:, None] & d_ok[None, :]
        ptrs = base + rows.to(tl.int64)[:, None] * sks + offs_d[None, :] * skd
        acc += tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(acc, 0) / (end - blk * BS).to(tl.float32)
    out = (bkv.to(tl.int64) * NKB + blk) * BLOCK_D + offs_d
    if SPLIT:
        hi = mean.to(hi_ptr.dtype.element_ty)
        tl.store(hi_ptr + out, hi)
        tl.store(lo_ptr + out, (mean - hi.to(tl.float32)).to(lo_ptr.dtype.element_ty))
    else:
        tl.store(hi_ptr + out, mean)


@triton.jit
def _pooled_logits(qt, hi_ptr, lo_ptr, km_base, j, j_ok, row_blk, offs_d, qk_scale, SK,
                   BS: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr):  # fmt: skip
    """Base-2 logits [M, BLOCK_N] of the tile's rows against KV blocks ``j`` (``-inf`` past
    each row's own block ``row_blk``): ``log2(e)·q·k̄_j/sqrt(D) + log2 n_j``."""
    ptrs = km_base + j[None, :].to(tl.int64) * BLOCK_D + offs_d[:, None]
    kt = tl.load(hi_ptr + ptrs, mask=j_ok[None, :], other=0.0)  # [BLOCK_D, BLOCK_N]
    if SPLIT:
        acc = tl.dot(qt, kt)
        acc += tl.dot(qt, tl.load(lo_ptr + ptrs, mask=j_ok[None, :], other=0.0))
    else:
        acc = tl.dot(qt, kt, input_precision="ieee")
    n = tl.minimum(SK - j * BS, BS).to(tl.float32)
    z = acc * qk_scale + tl.log2(tl.maximum(n, 1.0))[None, :]
    return tl.where(j_ok[None, :] & (j[None, :] <= row_blk[:, None]), z, float("-inf"))


@triton.jit
def _pooled_probs_kernel(
    q_ptr, sqb, sqh, sqs, sqd, hi_ptr, lo_ptr, out_ptr,
    HQ, HKV, G, SQ, SK, NQB, NKB, PREFIX, D, N_GT, qk_scale,
    STRIDE: tl.constexpr, RPB: tl.constexpr, GH: tl.constexpr, BS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    qi = NQB - 1 - tl.program_id(0)  # the longest rows first
    pid = tl.program_id(1)
    gt = pid % N_GT
    bkv = pid // N_GT
    b = bkv // HKV
    kvh = bkv % HKV
    M: tl.constexpr = GH * RPB
    m = tl.arange(0, M)
    g = gt * GH + m // RPB
    t = m % RPB
    length = tl.minimum(SQ - qi * BS, BS)  # rows of this query block
    FIRST: tl.constexpr = STRIDE // 2
    n_rows = tl.where(FIRST < length, (length - FIRST + STRIDE - 1) // STRIDE, 1)
    off = tl.where(FIRST < length, FIRST + t * STRIDE, length - 1)
    row_ok = (t < n_rows) & (g < G)
    off = tl.where(row_ok, off, length - 1)  # padding rows: a real position, weight 0
    qrow = qi * BS + off
    row_blk = (PREFIX + qrow) // BS  # the row's own (last visible) KV block
    offs_d = tl.arange(0, BLOCK_D)
    h = kvh * G + tl.where(g < G, g, 0)
    qp = q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + qrow.to(tl.int64) * sqs
    qmask = row_ok[:, None] & (offs_d < D)[None, :]
    qt = tl.load(qp[:, None] + offs_d[None, :] * sqd, mask=qmask, other=0.0)
    if not SPLIT:
        qt = qt.to(tl.float32)
    nvis = tl.minimum((PREFIX + qi * BS + length - 1) // BS + 1, NKB)
    km_base = bkv.to(tl.int64) * NKB * BLOCK_D
    jn = tl.arange(0, BLOCK_N)
    mx = tl.full([M], float("-inf"), dtype=tl.float32)
    den = tl.zeros([M], dtype=tl.float32)
    for j0 in range(0, nvis, BLOCK_N):
        j = j0 + jn
        z = _pooled_logits(qt, hi_ptr, lo_ptr, km_base, j, j < nvis, row_blk, offs_d, qk_scale,
                           SK, BS, BLOCK_D, SPLIT)  # fmt: skip
        m_new = tl.maximum(mx, tl.max(z, 1))  # finite: block 0 is visible to every row
        den = den * tl.exp2(mx - m_new) + tl.sum(tl.exp2(z - m_new[:, None]), 1)
        mx = m_new
    w = tl.where(row_ok, 1.0 / n_rows.to(tl.float32), 0.0) / den
    out_row = ((b * HQ + kvh * G + gt * GH + tl.arange(0, GH)).to(tl.int64) * NQB + qi) * NKB
    head_ok = (gt * GH + tl.arange(0, GH)) < G
    for j0 in range(0, nvis, BLOCK_N):
        j = j0 + jn
        j_ok = j < nvis
        z = _pooled_logits(qt, hi_ptr, lo_ptr, km_base, j, j_ok, row_blk, offs_d, qk_scale,
                           SK, BS, BLOCK_D, SPLIT)  # fmt: skip
        p = tl.exp2(z - mx[:, None]) * w[:, None]
        ph = tl.sum(tl.reshape(p, (GH, RPB, BLOCK_N)), 1)  # [GH, BLOCK_N]: a head's rows summed
        tl.store(out_ptr + out_row[:, None] + j[None, :], ph, mask=head_ok[:, None] & j_ok[None, :])


def pooled_rows_per_block(sq: int, block_size: int, stride: int) -> int:
    """The most pooled rows of any query block (that of a full block, or of the only one)."""
    length = min(int(sq), int(block_size))
    first = stride // 2
    return -(-(length - first) // stride) if first < length else 1


def launch_pooled_probs(q, k, block_size: int, stride: int, out=None, block_n: int = 64):
    """The two launches (shapes already checked by :mod:`.probe_op`): float32
    ``[B, Hq, NQB, NKB]``. ``out``: where to write (entries past the query block's visible KV
    blocks are left as they are); by default a zero tensor."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    bs, stride = int(block_size), int(stride)
    nqb, nkb = math.ceil(sq / bs), math.ceil(sk / bs)
    block_d = max(16, _next_pow2(d))
    split = q.dtype in (torch.bfloat16, torch.float16)
    kdt = q.dtype if split else torch.float32
    hi = torch.empty(b * hkv, nkb, block_d, device=q.device, dtype=kdt)
    lo = torch.empty_like(hi) if split else hi
    rows = min(32, _next_pow2(bs))
    _key_means_kernel[(nkb, b * hkv)](
        k, *k.stride(), hi, lo, hkv, sk, nkb, d, BS=bs, BLOCK_D=block_d, ROWS=rows, SPLIT=split,
        num_warps=4,
    )  # fmt: skip
    rpb = _next_pow2(pooled_rows_per_block(sq, bs, stride))
    max_rows = MAX_ROWS
    if not split and block_d > 128:  # float32 ieee tiles of D > 128: keep them in shared memory
        max_rows, block_n = 64, min(block_n, 32)
    gh = max(1, min(_next_pow2(g), max_rows // rpb))
    rpb = max(rpb, _next_pow2(math.ceil(16 / gh)))  # tl.dot needs M >= 16
    n_gt = math.ceil(g / gh)
    if out is None:
        out = torch.zeros(b, hq, nqb, nkb, device=q.device, dtype=torch.float32)
    m = gh * rpb
    _pooled_probs_kernel[(nqb, b * hkv * n_gt)](
        q, *q.stride(), hi, lo, out, hq, hkv, g, sq, sk, nqb, nkb, sk - sq, d, n_gt,
        LOG2E / math.sqrt(d), STRIDE=stride, RPB=rpb, GH=gh, BS=bs, BLOCK_N=block_n,
        BLOCK_D=block_d, SPLIT=split, num_warps=4 if m <= 64 else 8,
    )  # fmt: skip
    return out
