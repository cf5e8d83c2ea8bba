"""The oracle: dense attention with -inf outside the BlockMask's blocks (backend ``"reference"``).

This is the one reference every backend is tested against (``naive_block_sparse_attention`` in
``prism.kernels.block_sparse`` is the same function with float32 output) and the CPU fallback
of the ``triton`` op. It is written differently from the kernels on purpose: the block lists are
expanded into dense boolean block maps, those into a token-level mask, and a plain masked softmax
runs over it. It never calls FlexAttention (eager ``flex_attention`` ignores the block lists).

Semantics (the contract of every backend that does not honour ``mask_mod``):

* ``kv_num_blocks`` / ``kv_indices`` list *partial* KV blocks per (batch, query head, query
  block): inside them the causal rule ``q_idx + (Sk - Sq) >= kv_idx`` applies (on every partial
  block, not only diagonal ones); the BlockMask's ``mask_mod`` is not evaluated.
* ``full_kv_num_blocks`` / ``full_kv_indices`` list *full* KV blocks: no mask at all.
* Keys ``>= Sk`` never exist. Query block ``i`` covers the query-local rows
  ``i*BS_Q .. min((i+1)*BS_Q, Sq) - 1`` (query ``t`` sits at absolute position ``P + t``).
* A row with no allowed key gives 0 and ``lse = -inf`` (as FlexAttention does).
* The mask's batch / head dims may be 1 (broadcast) or equal to B / Hq.
* GQA: query head ``h`` reads KV head ``h // G`` (``G = Hq // Hkv``).

Math runs in float32 (float64 for float64 inputs, or any ``compute_dtype``), chunked over
queries so a step holds ``O(B * Hq * chunk * Sk)`` scores: meant for tests and small inputs.
"""

from __future__ import annotations

import math

import torch

from ..masks.blockmask import block_mask_to_bool

__all__ = ["dense_block_maps", "reference_attention"]

#: scores held per chunk step when ``chunk`` is not given (B * Hq * rows * Sk elements)
_CHUNK_ELEMENTS = 1 << 26


def _block_sizes(block_mask) -> tuple[int, int]:
    bs = block_mask.BLOCK_SIZE
    return (int(bs), int(bs)) if isinstance(bs, int) else (int(bs[0]), int(bs[1]))


def dense_block_maps(block_mask, nkb: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) bool [Bm, Hm, NQB, NKB] from a BlockMask's block lists.

    ``NKB`` defaults to ``ceil(Sk / BS_KV)``; index lists narrower than ``NKB`` are accepted.
    Anything with the four list attributes and ``seq_lengths`` works (no ``mask_mod`` is read).
    """
    if nkb is None:
        nkb = -(-int(block_mask.seq_lengths[1]) // _block_sizes(block_mask)[1])
    return block_mask_to_bool(block_mask, nkb)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask,
    scale: float | None = None,
    chunk: int | None = None,
    return_lse: bool = False,
    *,
    compute_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
):
    """q [B, Hq, Sq, D], k [B, Hkv, Sk, D], v [B, Hkv, Sk, Dv] -> out [B, Hq, Sq, Dv].

    Args:
        block_mask: a FlexAttention ``BlockMask`` (or anything with its block-list attributes,
            ``BLOCK_SIZE`` and ``seq_lengths``); see the module docstring for the semantics.
        scale: softmax scale, default ``D ** -0.5``.
        chunk: query rows per step (default: as many as keep a step near 2**26 scores).
        return_lse: also return the natural-log log-sum-exp [B, Hq, Sq] (``compute_dtype``;
            ``-inf`` on rows that see no key).
        compute_dtype: dtype of the math; default float64 for float64 inputs, else float32.
        out_dtype: dtype of ``out``; default q's dtype.

    Returns ``out`` or ``(out, lse)``.
    """
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"GQA needs Hq % Hkv == 0, got Hq={hq}, Hkv={hkv}")
    g = hq // hkv
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out_dtype = q.dtype if out_dtype is None else out_dtype
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    bs_q, bs_kv = _block_sizes(block_mask)
    nqb = -(-sq // bs_q)
    partial, full = dense_block_maps(block_mask, -(-sk // bs_kv))  # [Bm, Hm, NQB', NKB]
    if partial.shape[2] < nqb:
        raise ValueError(f"block_mask has {partial.shape[2]} query blocks, need {nqb}")
    partial = partial[:, :, :nqb].to(q.device).expand(b, hq, nqb, -1)
    full = full[:, :, :nqb].to(q.device).expand(b, hq, nqb, -1)

    kc = k.to(compute_dtype)  # [B, Hkv, Sk, D]: query heads are grouped, K/V never repeated
    vc = v.to(compute_dtype)
    prefix = sk - sq
    kv_pos = torch.arange(sk, device=q.device)
    kv_blk = kv_pos // bs_kv
    if chunk is None:
        chunk = max(16, _CHUNK_ELEMENTS // max(1, b * hq * sk))
    out = torch.empty(b, hq, sq, v.shape[-1], dtype=compute_dtype, device=q.device)
    lse = torch.empty(b, hq, sq, dtype=compute_dtype, device=q.device)
    for start in range(0, sq, chunk):
        stop = min(start + chunk, sq)
        rows = stop - start
        q_pos = torch.arange(start, stop, device=q.device)
        q_blk = q_pos // bs_q
        part_tok = partial[:, :, q_blk][..., kv_blk]  # [B, Hq, rows, Sk]
        full_tok = full[:, :, q_blk][..., kv_blk]
        causal = (q_pos[:, None] + prefix) >= kv_pos[None, :]  # [rows, Sk]
        allowed = (full_tok | (part_tok & causal)).reshape(b, hkv, g, rows, sk)
        qc = q[:, :, start:stop].to(compute_dtype).reshape(b, hkv, g, rows, d)
        s = torch.einsum("bhgrd,bhkd->bhgrk", qc, kc) * scale
        s = s.masked_fill(~allowed, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)  # -inf where the row sees nothing
        finite = torch.where(torch.isfinite(row_lse), row_lse, torch.zeros_like(row_lse))
        p = torch.exp(s - finite.unsqueeze(-1))  # exp(-inf) = 0 on empty rows
        o = torch.einsum("bhgrk,bhkd->bhgrd", p, vc)
        out[:, :, start:stop] = o.reshape(b, hq, rows, -1)
        lse[:, :, start:stop] = row_lse.reshape(b, hq, rows)
    out = out.to(out_dtype)
    return (out, lse) if return_lse else out
