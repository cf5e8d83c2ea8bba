"""Triton block-sparse attention forward that reads FlexAttention BlockMask block lists directly.

One program computes one ``BLOCK_M`` tile of query rows of one (batch, query head). It walks

1. the *full* KV blocks of its query block (``full_kv_num_blocks`` / ``full_kv_indices``) with no
   mask at all (only a sequence-tail mask when ``Sk`` is not a multiple of the KV block size), then
2. the *partial* KV blocks (``kv_num_blocks`` / ``kv_indices``) with the causal predicate
   ``q_idx + (Sk - Sq) >= kv_idx`` applied on every one of them (plus the tail mask),

visiting only listed blocks (the loop bound is the list length; each iteration loads the next block
index). A mask block wider than the compute tile is walked in ``BS_KV // BLOCK_N`` sub-tiles, a mask
block taller than ``BLOCK_M`` simply maps several query tiles to the same block row.

Numerics: online softmax (FlashAttention-2 style) in the base-2 domain with ``scale * log2(e)``
folded into one multiply, fp32 accumulation, ``P`` cast to the input dtype for the ``P @ V``
product. Rows that see no key write 0 and ``lse = -inf``.

GQA: query head ``h`` reads KV head ``h // G`` in place (K/V are never repeated). Program order:
the ``G`` query heads of one KV head and one query tile are adjacent, query tiles run from the last
(the most blocks under a causal mask) to the first, so concurrently running programs share K/V in L2.

Runs on CUDA (compiled) and on CPU tensors when Triton's interpreter is active (``TRITON_INTERPRET=1``
set before Triton is first imported: Triton's own library functions are built at import time).
Written against the Triton 3.2–3.9 language surface (plain pointer arithmetic, no descriptors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["KernelConfig", "pick_config", "block_sparse_attention_triton"]

_LN2 = math.log(2.0)
_LOG2E = 1.0 / _LN2


@triton.jit
def _load_kv(
    k_base,
    v_base,
    Kd,
    Vd,
    kv_row0,
    start_n,
    offs_n,
    offs_d,
    skn,
    svn,
    Sk,
    USE_TMA: tl.constexpr,
    MASK_TAIL: tl.constexpr,
):
    """K and V tiles [BLOCK_N, HEAD_DIM] starting at key ``start_n``."""
    if USE_TMA:
        # 2-D descriptors over [B * Hkv * Sk, D]; rows past Sk belong to the next head (or are
        # zero-filled at the end of the tensor) and are masked out of the scores by the caller.
        k = Kd.load([kv_row0 + start_n, 0])
        v = Vd.load([kv_row0 + start_n, 0])
    else:
        kn = start_n + offs_n
        if MASK_TAIL:
            k_ok = (kn < Sk)[:, None]
            k = tl.load(k_base + kn[:, None] * skn + offs_d[None, :], mask=k_ok, other=0.0)
            v = tl.load(v_base + kn[:, None] * svn + offs_d[None, :], mask=k_ok, other=0.0)
        else:
            k = tl.load(k_base + kn[:, None] * skn + offs_d[None, :])
            v = tl.load(v_base + kn[:, None] * svn + offs_d[None, :])
    return k, v


@triton.jit
def _update(acc, m_i, l_i, q, k, v, qk_scale, ok, MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    """One online-softmax step (base 2). ``ok`` [BLOCK_M, BLOCK_N] is used only when MASKED."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if MASKED:
        qk = tl.where(ok, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # a row with no allowed key so far keeps m = -inf; exponentiate against 0 instead
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, m_new, l_i


def _bsa_fwd_kernel_py(
    Q, K, V, Kd, Vd, O, LSE,
    PNUM, PIDX, FNUM, FIDX,
    sqb, sqh, sqm,
    skb, skh, skn,
    svb, svh, svn,
    sob, soh, som,
    slb, slh,
    spn_b, spn_h, spn_m,
    spi_b, spi_h, spi_m,
    sfn_b, sfn_h, sfn_m,
    sfi_b, sfi_h, sfi_m,
    Sq, Sk, P, Hkv, G, n_m_tiles,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BS_Q: tl.constexpr,
    BS_KV: tl.constexpr,
    HAS_FULL: tl.constexpr,
    EVEN_K: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    USE_TMA: tl.constexpr,
    MERGED: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: skip
    SUB_N: tl.constexpr = BS_KV // BLOCK_N
    pid = tl.program_id(0)
    # program order: g (query head within the GQA group) fastest, then query tile (last first),
    # then KV head, then batch.
    g = pid % G
    t = pid // G
    m_tile = n_m_tiles - 1 - (t % n_m_tiles)
    t = t // n_m_tiles
    kh = t % Hkv
    b = t // Hkv
    h = kh * G + g
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    kh64 = kh.to(tl.int64)

    start_m = m_tile * BLOCK_M
    qb = start_m // BS_Q
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Sq

    q_ptrs = Q + b64 * sqb + h64 * sqh + offs_m[:, None] * sqm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    k_base = K + b64 * skb + kh64 * skh
    v_base = V + b64 * svb + kh64 * svh
    kv_row0 = (b * Hkv + kh) * Sk

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    n_part = tl.load(PNUM + b64 * spn_b + h64 * spn_h + qb * spn_m)
    p_idx = PIDX + b64 * spi_b + h64 * spi_h + qb * spi_m
    q_abs = offs_m + P
    if HAS_FULL:
        n_full = tl.load(FNUM + b64 * sfn_b + h64 * sfn_h + qb * sfn_m)
        f_idx = FIDX + b64 * sfi_b + h64 * sfi_h + qb * sfi_m
    else:
        n_full = 0
        f_idx = p_idx

    if MERGED:
        # ONE loop over the full blocks then the partial ones: one software pipeline per program
        # (no second pipeline fill for the diagonal block). The mask is applied under a uniform
        # branch only on partial blocks and on tiles crossing the sequence tail.
        for it in range(0, (n_full + n_part) * SUB_N):
            j = it // SUB_N
            is_full = j < n_full
            blk_f = tl.load(f_idx + j, mask=is_full, other=0)
            blk_p = tl.load(p_idx + (j - n_full), mask=j >= n_full, other=0)
            blk = tl.where(is_full, blk_f, blk_p)
            start_n = blk * BS_KV + (it % SUB_N) * BLOCK_N
            k, v = _load_kv(
                k_base,
                v_base,
                Kd,
                Vd,
                kv_row0,
                start_n,
                offs_n,
                offs_d,
                skn,
                svn,
                Sk,
                USE_TMA,
                not EVEN_K,
            )
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
            if EVEN_K:
                need_mask = j >= n_full
            else:
                need_mask = (j >= n_full) | (start_n + BLOCK_N > Sk)
            if need_mask:
                kn = start_n + offs_n
                ok = ((q_abs[:, None] >= kn[None, :]) | is_full) & (kn < Sk)[None, :]
                qk = tl.where(ok, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            # a row with no allowed key so far keeps m = -inf; exponentiate against 0 instead
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk * qk_scale - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
            m_i = m_new
    else:
        # ---- full blocks: no causal mask (tail mask only if Sk is ragged) ----
        for it in range(0, n_full * SUB_N):
            blk = tl.load(f_idx + it // SUB_N)
            start_n = blk * BS_KV + (it % SUB_N) * BLOCK_N
            k, v = _load_kv(
                k_base,
                v_base,
                Kd,
                Vd,
                kv_row0,
                start_n,
                offs_n,
                offs_d,
                skn,
                svn,
                Sk,
                USE_TMA,
                not EVEN_K,
            )
            if EVEN_K:
                acc, m_i, l_i = _update(acc, m_i, l_i, q, k, v, qk_scale, 0, False, DOT_PREC)
            else:
                ok = ((start_n + offs_n) < Sk)[None, :]
                acc, m_i, l_i = _update(acc, m_i, l_i, q, k, v, qk_scale, ok, True, DOT_PREC)
        # ---- partial blocks: causal predicate on every one ----
        for it in range(0, n_part * SUB_N):
            blk = tl.load(p_idx + it // SUB_N)
            start_n = blk * BS_KV + (it % SUB_N) * BLOCK_N
            k, v = _load_kv(
                k_base,
                v_base,
                Kd,
                Vd,
                kv_row0,
                start_n,
                offs_n,
                offs_d,
                skn,
                svn,
                Sk,
                USE_TMA,
                not EVEN_K,
            )
            kn = start_n + offs_n
            ok = q_abs[:, None] >= kn[None, :]
            if not EVEN_K:
                ok = ok & (kn < Sk)[None, :]
            acc, m_i, l_i = _update(acc, m_i, l_i, q, k, v, qk_scale, ok, True, DOT_PREC)

    # ---------------- epilogue ----------------
    empty = l_i == 0.0
    inv_l = 1.0 / tl.where(empty, 1.0, l_i)
    out = acc * inv_l[:, None]
    o_ptrs = O + b64 * sob + h64 * soh + offs_m[:, None] * som + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    if WRITE_LSE:
        log2_l = tl.math.log2(tl.where(empty, 1.0, l_i))
        lse = tl.where(empty, float("-inf"), (m_i + log2_l) * 0.6931471805599453)
        tl.store(LSE + b64 * slb + h64 * slh + offs_m, lse, mask=row_ok)


_bsa_fwd_kernel = triton.jit(_bsa_fwd_kernel_py)


try:
    from triton.runtime.errors import OutOfResources
except Exception:  # pragma: no cover
    OutOfResources = RuntimeError

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception:  # older Triton: pointer path only
    TensorDescriptor = None


def _tma_default(q: torch.Tensor) -> bool:
    if TensorDescriptor is None or q.device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(q.device)[0] >= 9


def interpreter_active() -> bool:
    """True when this module's kernel was built by Triton's interpreter (``TRITON_INTERPRET=1``
    was set before Triton was first imported). Only then can it run on CPU tensors."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # pragma: no cover - very old / stripped Triton
        return False
    return isinstance(_bsa_fwd_kernel, InterpretedFunction)


@dataclass(frozen=True)
class KernelConfig:
    BLOCK_M: int = 128
    BLOCK_N: int = 64
    num_warps: int = 8
    num_stages: int = 3
    merged: bool = False  # one loop over full + partial blocks (see the kernel)


# Fixed table measured on the H200 (benchmarks/results/kernels_h200.*; bf16, Hq=32, Hkv=8):
# D=128: 128x128 tiles, 8 warps, 3 stages, merged loop, TMA K/V: 28.97 ms at 128K / 10 %
#        (separate loops 30.70, 2 stages 30.92, pointer loads 30.79; 128x64 tiles 34.8-36.7).
# D=64:  128x128 tiles, 4 warps, 3 stages: 1.125 ms at 32K / 10 % (128x64/8w 1.177, 128x64/4w 1.206).
# The same tiles serve fp16. fp32 inputs (tests, interpreter) use smaller tiles. Where a config
# does not fit (e.g. the shared memory of pre-Hopper GPUs), the launcher falls back to smaller ones.
_TABLE = {
    128: KernelConfig(128, 128, 8, 3, merged=True),
    64: KernelConfig(128, 128, 4, 3),
    32: KernelConfig(128, 64, 4, 3),
}
_FALLBACKS = (KernelConfig(128, 64, 8, 2, merged=True), KernelConfig(64, 64, 4, 2, merged=True))
_working: dict = {}  # (head_dim, dtype, device index, bs_q, bs_kv) -> config that compiled


def _pow2_divisor(x: int) -> int:
    return x & (-x)


def pick_config(
    head_dim: int, dtype: torch.dtype, bs_q: int, bs_kv: int, override: KernelConfig | None = None
) -> KernelConfig:
    """Tile config for a head dim / dtype, shrunk so the tiles divide the mask blocks."""
    cfg = override or _TABLE.get(head_dim, KernelConfig(64, 64, 4, 2))
    if dtype == torch.float32 and override is None:
        cfg = KernelConfig(min(cfg.BLOCK_M, 64), min(cfg.BLOCK_N, 32), 4, 2)
    bm = min(cfg.BLOCK_M, _pow2_divisor(bs_q))
    bn = min(cfg.BLOCK_N, _pow2_divisor(bs_kv))
    if bm < 16 or bn < 16:
        raise ValueError(
            f"BLOCK_SIZE {(bs_q, bs_kv)} cannot be tiled: each block size must be a multiple of 16 "
            f"(got compute tiles {bm}x{bn})"
        )
    return KernelConfig(bm, bn, cfg.num_warps, cfg.num_stages, cfg.merged)


def _mask_strides(t: torch.Tensor, B: int, Hq: int):
    """Strides (b, h, m) of a [Bm, Hm, NQB, ...] mask tensor, 0 on broadcast dims."""
    sb = t.stride(0) if t.shape[0] != 1 else 0
    sh = t.stride(1) if t.shape[1] != 1 else 0
    return sb, sh, t.stride(2)


def _as_index(t: torch.Tensor) -> torch.Tensor:
    if t.dtype != torch.int32:
        t = t.to(torch.int32)
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t


def block_sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    full_kv_num_blocks: torch.Tensor | None,
    full_kv_indices: torch.Tensor | None,
    bs_q: int,
    bs_kv: int,
    scale: float,
    return_lse: bool = False,
    config: KernelConfig | None = None,
    use_tma: bool | None = None,
    merged: bool | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
):
    """Launch the kernel on already validated inputs (see ``prism.kernels.block_sparse.op``).

    ``config`` overrides the tile table (tests use it to exercise sub-tiling). ``use_tma``: load
    K/V through TMA tensor descriptors (default: on Hopper and newer when Triton has
    ``TensorDescriptor``; K/V are then made contiguous). ``out`` / ``lse`` may be given (tests
    poison them with NaN to prove every element is written).
    Returns ``(out, lse)``; ``lse`` is ``None`` unless ``return_lse``.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    if q.device.type != "cuda" and not interpreter_active():
        raise RuntimeError(
            "the Triton block-sparse kernel needs CUDA tensors, or CPU tensors with Triton's "
            "interpreter (set TRITON_INTERPRET=1 before triton is first imported)"
        )
    cfg = pick_config(D, q.dtype, bs_q, bs_kv, config)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if out is None:
        out = torch.empty((B, Hq, Sq, D), dtype=q.dtype, device=q.device)
    if return_lse and lse is None:
        lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    lse_arg = lse if return_lse else out  # dummy pointer when unused
    slb, slh = (lse.stride(0), lse.stride(1)) if return_lse else (0, 0)

    pnum, pidx = _as_index(kv_num_blocks), _as_index(kv_indices)
    has_full = full_kv_num_blocks is not None
    if has_full:
        fnum, fidx = _as_index(full_kv_num_blocks), _as_index(full_kv_indices)
    else:
        fnum, fidx = pnum, pidx  # dummies, never read
    spn = _mask_strides(pnum, B, Hq)
    spi = _mask_strides(pidx, B, Hq)
    sfn = _mask_strides(fnum, B, Hq)
    sfi = _mask_strides(fidx, B, Hq)

    n_m_tiles = triton.cdiv(Sq, cfg.BLOCK_M)
    grid = (B * Hq * n_m_tiles,)
    if Sq == 0 or B * Hq == 0:
        return out, lse
    if use_tma is None:
        use_tma = _tma_default(q)
    kd = vd = None
    if use_tma:
        if TensorDescriptor is None:
            raise RuntimeError("use_tma=True needs triton.tools.tensor_descriptor (Triton >= 3.3)")
        k = k.contiguous()
        v = v.contiguous()
        if B * Hkv * Sk >= 2**31 or k.data_ptr() % 16 or v.data_ptr() % 16:
            use_tma = False
        else:
            kd = TensorDescriptor(k, [B * Hkv * Sk, D], [D, 1], [cfg.BLOCK_N, D])
            vd = TensorDescriptor(v, [B * Hkv * Sk, D], [D, 1], [cfg.BLOCK_N, D])
    kernel = _bsa_fwd_kernel
    args = (
        q,
        k,
        v,
        kd,
        vd,
        out,
        lse_arg,
        pnum,
        pidx,
        fnum,
        fidx,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        slb,
        slh,
        *spn,
        *spi,
        *sfn,
        *sfi,
        Sq,
        Sk,
        Sk - Sq,
        Hkv,
        G,
        n_m_tiles,
        float(scale) * _LOG2E,
    )
    meta = dict(
        HEAD_DIM=D,
        BLOCK_M=cfg.BLOCK_M,
        BLOCK_N=cfg.BLOCK_N,
        BS_Q=bs_q,
        BS_KV=bs_kv,
        HAS_FULL=has_full,
        EVEN_K=(Sk % bs_kv == 0),
        WRITE_LSE=bool(return_lse),
        USE_TMA=bool(use_tma),
        MERGED=bool(cfg.merged if merged is None else merged),
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    global last_compiled
    if q.device.type != "cuda":
        kernel[grid](*args, **meta)
        return out, (lse if return_lse else None)
    key = (D, q.dtype, q.device.index, bs_q, bs_kv)
    tried = [cfg] if config is not None else [_working.get(key, cfg)]
    if config is None:
        tried += [pick_config(D, q.dtype, bs_q, bs_kv, fb) for fb in _FALLBACKS]
    with torch.cuda.device(q.device):
        for i, c in enumerate(tried):
            meta.update(
                BLOCK_M=c.BLOCK_M,
                BLOCK_N=c.BLOCK_N,
                num_warps=c.num_warps,
                num_stages=c.num_stages,
                MERGED=bool(c.merged if merged is None else merged),
            )
            g = (B * Hq * triton.cdiv(Sq, c.BLOCK_M),)
            a = list(args)
            a[-2] = triton.cdiv(Sq, c.BLOCK_M)  # n_m_tiles
            if kd is not None:
                kd.block_shape = [c.BLOCK_N, D]
                vd.block_shape = [c.BLOCK_N, D]
            try:
                last_compiled = kernel[g](*a, **meta)
            except OutOfResources:
                if i + 1 == len(tried):
                    raise
                continue
            _working[key] = c
            break
    return out, (lse if return_lse else None)


last_compiled = None  # the CompiledKernel of the last CUDA launch (n_regs / n_spills for reports)
