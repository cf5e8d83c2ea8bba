"""Exact attention statistics computed blockwise (never an Sq x Sk matrix at once)."""

from __future__ import annotations

import torch

from .masks import BlockSelection, block_dims, grid_shape


def block_attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int | tuple[int, int] = 128,
    scale: float | None = None,
    chunk: int = 512,
) -> torch.Tensor:
    """True causal softmax mass summed into blocks.

    q [B, Hq, Sq, D], k [B, Hkv, Sk, D] (Sk >= Sq, cached prefix P = Sk - Sq) -> float32
    [B, Hq, NQB, NKB] where entry (i, j) is the sum over the queries of block i of the attention
    probability they put on the keys of block j (each query's row sums to 1). ``block_size``: BS
    or ``(BSQ, BSK)``. Memory is O(B · Hq · chunk · Sk) per step.
    """
    bq, bk = block_dims(block_size)
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    nqb, nkb = grid_shape(sq, sk, block_size)
    prefix = sk - sq
    out = torch.zeros(b, hq, nqb, nkb, dtype=torch.float32, device=q.device)
    kf = k.float()
    kv_pos = torch.arange(sk, device=q.device)
    pad = nkb * bk - sk
    chunk = max(bq, (chunk // bq) * bq)
    for start in range(0, sq, chunk):
        stop = min(start + chunk, sq)
        qc = q[:, :, start:stop].float().view(b, hkv, g, stop - start, d)
        s = torch.einsum("bhgqd,bhkd->bhgqk", qc, kf).reshape(b, hq, stop - start, sk) * scale
        q_pos = torch.arange(start, stop, device=q.device)
        s = s.masked_fill((q_pos[:, None] + prefix) < kv_pos[None, :], float("-inf"))
        p = s.softmax(dim=-1)
        p = torch.nn.functional.pad(p, (0, pad)).view(b, hq, stop - start, nkb, bk).sum(-1)
        q_blk = q_pos // bq
        out.index_add_(2, q_blk, p)
    return out


def attention_recall(mass: torch.Tensor, selection: BlockSelection | torch.Tensor) -> torch.Tensor:
    """Share of the true attention mass inside the selected blocks, per (b, h): float32 [B, Hq].

    ``mass`` from :func:`block_attention_mass` for the same q/k; every query weighs the same.
    """
    mask = selection.mask if isinstance(selection, BlockSelection) else selection
    if tuple(mask.shape[-2:]) != tuple(mass.shape[-2:]):
        raise ValueError(
            f"the selection's block grid {tuple(mask.shape[-2:])} is not the mass's "
            f"{tuple(mass.shape[-2:])}: compute the mass with the selection's block size "
            "(block_attention_mass(q, k, selection.block_size))"
        )
    total = mass.sum(dim=(-2, -1))
    return (mass * mask).sum(dim=(-2, -1)) / total
