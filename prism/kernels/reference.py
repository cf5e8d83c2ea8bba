"""The oracle backend: dense attention in float32 with -inf outside the BlockMask's blocks.

It reads the BlockMask block lists itself (partial blocks get the causal predicate with the
cached-prefix offset, full blocks none, keys >= Sk never), so it checks what a kernel does with
the same mask. Memory is O(chunk x Sk) per step: meant for tests and small inputs.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

from ..masks import block_mask_to_bool


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scale: float | None = None,
    chunk: int = 1024,
    return_lse: bool = False,
):
    """q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] -> out [B, Hq, Sq, Dv] in q's dtype (fp32 math).

    Rows with no allowed key give 0 (and lse = -inf), as FlexAttention does.
    """
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    bs_q, bs_k = block_mask.BLOCK_SIZE
    partial, full = block_mask_to_bool(block_mask)  # [Bm, Hm, NQB, NKB]
    partial = partial.expand(b, hq, *partial.shape[2:])
    full = full.expand(b, hq, *full.shape[2:])
    kf = k.float().repeat_interleave(g, dim=1)
    vf = v.float().repeat_interleave(g, dim=1)
    prefix = sk - sq
    kv_pos = torch.arange(sk, device=q.device)
    kv_blk = kv_pos // bs_k
    out = torch.empty(b, hq, sq, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
    for start in range(0, sq, chunk):
        stop = min(start + chunk, sq)
        q_pos = torch.arange(start, stop, device=q.device)
        q_blk = q_pos // bs_q
        p_tok = partial[:, :, q_blk][..., kv_blk]  # [B, Hq, rows, Sk]
        f_tok = full[:, :, q_blk][..., kv_blk]
        causal = (q_pos[:, None] + prefix) >= kv_pos[None, :]
        allowed = f_tok | (p_tok & causal)
        s = torch.einsum("bhqd,bhkd->bhqk", q[:, :, start:stop].float(), kf) * scale
        s = s.masked_fill(~allowed, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)
        safe = torch.where(torch.isfinite(row_lse), row_lse, torch.zeros_like(row_lse))
        p = torch.exp(s - safe[..., None])
        out[:, :, start:stop] = torch.einsum("bhqk,bhkd->bhqd", p, vf)
        lse[:, :, start:stop] = row_lse
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out
