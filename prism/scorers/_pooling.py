"""Block pooling and pooled scores, shared by the meanpool, prism and flexprefill scorers."""

from __future__ import annotations

import math

import torch


def pool_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of every block of ``block_size`` positions: [B, H, S, D] -> float32 [B, H, NB, D].

    The sequence is zero-padded to a multiple of BS, so the last block's mean includes the zeros
    (as in the published method). Accumulates in float32 without copying x.
    """
    b, h, s, d = x.shape
    n_full = s // block_size
    parts = []
    if n_full:
        parts.append(
            x[:, :, : n_full * block_size]
            .unflatten(2, (n_full, block_size))
            .sum(3, dtype=torch.float32)
        )
    if s % block_size:
        parts.append(x[:, :, n_full * block_size :].sum(2, keepdim=True, dtype=torch.float32))
    pooled = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return pooled / block_size


def gqa_scores(qp: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
    """Pooled dot products per query head without repeating K.

    qp float32 [B, Hq, NQB, d], kp float32 [B, Hkv, NKB, d] -> float32 [B, Hq, NQB, NKB]
    (query head h uses KV head h // G).
    """
    b, hq, nqb, d = qp.shape
    hkv, nkb = kp.shape[1], kp.shape[2]
    g = hq // hkv
    s = torch.einsum("bhgqd,bhkd->bhgqk", qp.view(b, hkv, g, nqb, d), kp)
    return s.reshape(b, hq, nqb, nkb)


def inv_sqrt(d: int) -> float:
    return 1.0 / math.sqrt(d)
