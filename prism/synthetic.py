"""Synthetic long inputs with RoPE structure, for demos and tests that need no model."""

from __future__ import annotations

import torch


def rope(x: torch.Tensor, base: float = 10000.0, offset: int = 0) -> torch.Tensor:
    """Apply rotate-half RoPE to x [B, H, S, D] (pair j = dims j, j + D/2, θ_j = base^(-2j/D))."""
    d = x.shape[-1]
    half = d // 2
    theta = base ** (-torch.arange(half, dtype=torch.float64, device=x.device) * 2 / d)
    pos = torch.arange(offset, offset + x.shape[2], dtype=torch.float64, device=x.device)
    ang = pos[:, None] * theta[None, :]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def synthetic_qkv(
    batch: int = 1,
    q_heads: int = 8,
    kv_heads: int = 2,
    length: int = 8192,
    head_dim: int = 64,
    segment: int = 300,
    strength: float = 2.0,
    q_len: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
):
    """q [B, Hq, Sq, D], k, v [B, Hkv, Sk, D] after RoPE: text-like "topics" (segments sharing a
    direction, so attention is sparse and semantic) plus noise. ``q_len`` < ``length`` makes the
    first ``length - q_len`` keys a cached prefix."""
    g = torch.Generator(device=device).manual_seed(seed)
    kw = dict(generator=g, device=device)
    sk = length
    sq = sk if q_len is None else q_len
    n_seg = -(-sk // segment)
    topics = torch.randn(batch, kv_heads, n_seg, head_dim, **kw)
    seg_of = torch.arange(sk, device=device) // segment
    base = topics[:, :, seg_of]
    k = strength * base + torch.randn(batch, kv_heads, sk, head_dim, **kw)
    rep = q_heads // kv_heads
    qb = base.repeat_interleave(rep, dim=1)[:, :, sk - sq :]
    # each query head looks back at a random earlier topic half the time
    recall_seg = (torch.rand(batch, q_heads, sq, **kw) * (seg_of[sk - sq :] + 1)).long()
    mix = torch.rand(batch, q_heads, sq, 1, **kw) < 0.5
    far = torch.gather(
        topics.repeat_interleave(rep, dim=1), 2, recall_seg[..., None].expand(-1, -1, -1, head_dim)
    )
    q = strength * torch.where(mix, far, qb) + torch.randn(batch, q_heads, sq, head_dim, **kw)
    v = torch.randn(batch, kv_heads, sk, head_dim, **kw)
    q = rope(q, offset=sk - sq)
    k = rope(k)
    return q.to(dtype), k.to(dtype), v.to(dtype)
