"""Naive float32 (or float64) block-sparse attention that reads the BlockMask block lists.

This is the *test oracle* for the Triton kernel (and a slow CPU fallback of the op). It is
deliberately written differently from the kernel: it expands the block lists into a dense boolean
block map with ``scatter``, turns that into a token-level mask, and runs a plain masked softmax,
chunked over query blocks so the memory stays ``O(B * Hq * BS * Sk)``.

It never calls FlexAttention (eager ``flex_attention`` ignores the block lists).

Semantics (the contract the kernel implements as well):

* ``kv_num_blocks`` / ``kv_indices`` list *partial* KV blocks per (batch, query head, query block):
  inside them the causal rule ``q_idx + (Sk - Sq) >= kv_idx`` applies (on every partial block,
  not only diagonal ones).
* ``full_kv_num_blocks`` / ``full_kv_indices`` list *full* KV blocks: computed without a mask.
* Keys ``>= Sk`` are always masked (sequence tail). Query block ``i`` covers the query-local rows
  ``i*BS_Q .. min((i+1)*BS_Q, Sq) - 1``.
* A row with no allowed key returns 0 and ``lse = -inf``.
* The mask's batch / head dimensions may be 1 (broadcast) or equal to B / Hq.
* GQA: query head ``h`` reads KV head ``h // (Hq // Hkv)``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "dense_block_maps",
    "naive_block_sparse_attention",
    "causal_block_maps",
    "block_mask_from_maps",
    "random_causal_block_mask",
]


def _lists_to_dense(num: torch.Tensor, idx: torch.Tensor, nkb: int) -> torch.Tensor:
    """[Bm, Hm, NQB] counts + [Bm, Hm, NQB, W] indices -> bool [Bm, Hm, NQB, nkb]."""
    num = num.to(torch.long)
    idx = idx.to(torch.long)
    w = idx.shape[-1]
    valid = torch.arange(w, device=idx.device) < num.unsqueeze(-1)  # [Bm, Hm, NQB, W]
    # send invalid slots to an extra dump column, dropped afterwards
    tgt = torch.where(valid, idx.clamp(0, nkb - 1), torch.full_like(idx, nkb))
    dense = torch.zeros(*idx.shape[:-1], nkb + 1, dtype=torch.bool, device=idx.device)
    dense.scatter_(-1, tgt, True)
    return dense[..., :nkb]


def dense_block_maps(block_mask, nkb: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense boolean maps (partial, full), each [Bm, Hm, NQB, NKB], from a BlockMask."""
    bs_q, bs_kv = block_mask.BLOCK_SIZE
    sq, sk = block_mask.seq_lengths
    if nkb is None:
        nkb = -(-sk // bs_kv)
    partial = _lists_to_dense(block_mask.kv_num_blocks, block_mask.kv_indices, nkb)
    if block_mask.full_kv_num_blocks is not None:
        full = _lists_to_dense(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, nkb)
    else:
        full = torch.zeros_like(partial)
    return partial, full


def naive_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask,
    scale: float | None = None,
    return_lse: bool = False,
    compute_dtype: torch.dtype = torch.float32,
):
    """Reference block-sparse attention.

    Returns ``out`` in ``compute_dtype`` (float32 by default) — and ``lse`` [B, Hq, Sq] (natural
    log, ``compute_dtype``) when ``return_lse``. Inputs as for ``block_sparse_attention``.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    P = Sk - Sq
    bs_q, bs_kv = (int(x) for x in block_mask.BLOCK_SIZE)
    nqb = -(-Sq // bs_q)
    nkb = -(-Sk // bs_kv)
    if scale is None:
        scale = 1.0 / math.sqrt(D)

    partial, full = dense_block_maps(block_mask, nkb)
    partial = partial[:, :, :nqb].to(q.device).expand(B, Hq, nqb, nkb)
    full = full[:, :, :nqb].to(q.device).expand(B, Hq, nqb, nkb)

    qf = q.to(compute_dtype)
    kf = k.to(compute_dtype).repeat_interleave(G, dim=1)  # reference only: repeat is fine here
    vf = v.to(compute_dtype).repeat_interleave(G, dim=1)

    out = torch.empty(B, Hq, Sq, D, dtype=compute_dtype, device=q.device)
    lse = torch.empty(B, Hq, Sq, dtype=compute_dtype, device=q.device)
    kv_pos = torch.arange(Sk, device=q.device)
    kv_blk = kv_pos // bs_kv
    for i in range(nqb):
        r0, r1 = i * bs_q, min((i + 1) * bs_q, Sq)
        q_pos = torch.arange(r0, r1, device=q.device) + P  # absolute positions
        causal = q_pos[:, None] >= kv_pos[None, :]  # [R, Sk]
        part_tok = partial[:, :, i][:, :, kv_blk]  # [B, Hq, Sk]
        full_tok = full[:, :, i][:, :, kv_blk]
        allowed = full_tok[:, :, None, :] | (part_tok[:, :, None, :] & causal[None, None])
        s = torch.einsum("bhrd,bhkd->bhrk", qf[:, :, r0:r1], kf) * scale
        s = s.masked_fill(~allowed, float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m_safe)
        denom = p.sum(dim=-1, keepdim=True)
        o = torch.einsum("bhrk,bhkd->bhrd", p, vf)
        out[:, :, r0:r1] = torch.where(denom > 0, o / denom.clamp_min(1e-30), torch.zeros_like(o))
        lse[:, :, r0:r1] = (m_safe + torch.log(denom)).squeeze(-1)  # log(0) = -inf for empty rows
    if return_lse:
        return out, lse
    return out


# ----------------------------------------------------------------------------------------------
# Block-mask builders for tests and benchmarks (independent of prism.masks on purpose).
# ----------------------------------------------------------------------------------------------


def causal_block_maps(Sq: int, Sk: int, bs_q: int, bs_kv: int | None = None, device=None):
    """(visible, partial) bool [NQB, NKB]: the block-causal map of DESIGN §3 with a cached prefix
    ``P = Sk - Sq``; ``partial`` marks the blocks the causal frontier cuts (the diagonal ones)."""
    bs_kv = bs_q if bs_kv is None else bs_kv
    P = Sk - Sq
    nqb, nkb = -(-Sq // bs_q), -(-Sk // bs_kv)
    i = torch.arange(nqb, device=device)[:, None]
    j = torch.arange(nkb, device=device)[None, :]
    last_q = P + torch.clamp((i + 1) * bs_q, max=Sq) - 1
    visible = j * bs_kv <= last_q
    partial = visible & (j * bs_kv + bs_kv - 1 > P + i * bs_q)
    return visible, partial


def block_mask_from_maps(
    partial: torch.Tensor,
    full: torch.Tensor | None,
    Sq: int,
    Sk: int,
    block_size,
    with_full_lists: bool = True,
):
    """BlockMask from dense bool maps [B, H, NQB, NKB] (partial = causal mask_mod applies).
    ``block_size`` may be an int or a (BS_Q, BS_KV) tuple."""
    from ...masks.blockmask import bool_to_block_lists, lists_to_block_mask

    pn, pi = bool_to_block_lists(partial)
    if full is not None and with_full_lists:
        fn, fi = bool_to_block_lists(full)
    else:
        fn = fi = None
    return lists_to_block_mask(pn, pi, fn, fi, Sq, Sk, block_size)


def random_causal_block_mask(
    B: int,
    H: int,
    Sq: int,
    Sk: int,
    block_size: int,
    density: float,
    generator: torch.Generator | None = None,
    device=None,
):
    """Random block-causal mask: every partial (diagonal) block, plus each other visible block with
    the probability that makes the expected share of selected / causal blocks ``density``.
    Returns ``(block_mask, achieved_density)``."""
    visible, partial = causal_block_maps(Sq, Sk, block_size, device=device)
    n_vis, n_part = int(visible.sum()), int(partial.sum())
    rate = (density * n_vis - n_part) / max(n_vis - n_part, 1)
    rate = min(max(rate, 0.0), 1.0)
    shape = (B, H) + tuple(visible.shape)
    r = torch.rand(shape, generator=generator, device=device)  # generator must live on `device`
    full = (visible & ~partial) & (r < rate)
    part = partial.expand(shape).clone()
    bm = block_mask_from_maps(part, full, Sq, Sk, block_size)
    achieved = (full.sum().item() + part.sum().item()) / (n_vis * B * H)
    return bm, achieved
