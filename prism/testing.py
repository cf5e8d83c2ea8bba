"""Helpers for tests and benchmarks: block-causal maps, random selections and BlockMasks of a
given density, dense causal attention with a cached prefix, relative errors.

Importable with torch only (no Triton, no omegaconf, no transformers). The block-causal map here
is written independently of :mod:`prism.masks.geometry` on purpose, so tests built on it check
that module too; BlockMasks are assembled with :mod:`prism.masks.blockmask`.

Shapes: B batch, H mask heads (1 or Hq), NQB = ceil(Sq / BS_Q), NKB = ceil(Sk / BS_KV),
P = Sk - Sq the cached prefix (query ``t`` sits at absolute position ``P + t``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "block_mask_from_maps",
    "causal_block_maps",
    "dense_causal_attention",
    "random_causal_block_maps",
    "random_causal_block_mask",
    "random_causal_selection",
    "relative_error",
]


def causal_block_maps(Sq: int, Sk: int, bs_q: int, bs_kv: int | None = None, device=None):
    """(visible, partial) bool [NQB, NKB]: the block-causal map (DESIGN §3) with a cached prefix
    ``P = Sk - Sq``; ``partial`` marks the visible blocks the causal frontier cuts."""
    bs_kv = bs_q if bs_kv is None else bs_kv
    P = Sk - Sq
    nqb, nkb = -(-Sq // bs_q), -(-Sk // bs_kv)
    i = torch.arange(nqb, device=device)[:, None]
    j = torch.arange(nkb, device=device)[None, :]
    last_q = P + torch.clamp((i + 1) * bs_q, max=Sq) - 1  # absolute position of the last row
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
    mask_mod=None,
):
    """BlockMask from dense bool maps [B, H, NQB, NKB]: ``partial`` blocks get ``mask_mod``
    (default: the causal rule with the prefix offset), ``full`` blocks none. ``block_size``: an
    int or a (BS_Q, BS_KV) tuple. ``with_full_lists=False`` leaves the full lists out (None)."""
    from torch.nn.attention.flex_attention import BlockMask

    from .masks.blockmask import bool_to_block_lists, lists_to_block_mask

    pn, pi = bool_to_block_lists(partial)
    if full is not None and with_full_lists:
        fn, fi = bool_to_block_lists(full)
    else:
        fn = fi = None
    if mask_mod is None:
        return lists_to_block_mask(pn, pi, fn, fi, Sq, Sk, block_size)
    return BlockMask.from_kv_blocks(
        pn,
        pi,
        fn,
        fi,
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(Sq, Sk),
        compute_q_blocks=False,
    )


def random_causal_block_maps(
    B: int,
    H: int,
    Sq: int,
    Sk: int,
    block_size: int,
    density: float,
    generator: torch.Generator | None = None,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) bool [B, H, NQB, NKB]: every partial (diagonal) block, plus each other
    visible block as a full block with the probability that makes the expected share of
    selected / visible blocks ``density`` (at least the diagonal). ``generator`` must live on
    ``device``."""
    visible, partial = causal_block_maps(Sq, Sk, block_size, device=device)
    n_vis, n_part = int(visible.sum()), int(partial.sum())
    rate = (density * n_vis - n_part) / max(n_vis - n_part, 1)
    rate = min(max(rate, 0.0), 1.0)
    shape = (B, H) + tuple(visible.shape)
    r = torch.rand(shape, generator=generator, device=device)
    full = (visible & ~partial) & (r < rate)
    return partial.expand(shape).clone(), full


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
    """Random block-causal BlockMask (see :func:`random_causal_block_maps`).
    Returns ``(block_mask, achieved_density)``."""
    part, full = random_causal_block_maps(B, H, Sq, Sk, block_size, density, generator, device)
    bm = block_mask_from_maps(part, full, Sq, Sk, block_size)
    n_vis = int(causal_block_maps(Sq, Sk, block_size)[0].sum())
    achieved = (full.sum().item() + part.sum().item()) / (n_vis * B * H)
    return bm, achieved


def random_causal_selection(
    B: int,
    H: int,
    Sq: int,
    Sk: int,
    block_size: int,
    density: float,
    generator: torch.Generator | None = None,
    device=None,
):
    """Random block-causal :class:`prism.BlockSelection` (mask = partial | full blocks of
    :func:`random_causal_block_maps`)."""
    from .masks.selection import BlockSelection

    part, full = random_causal_block_maps(B, H, Sq, Sk, block_size, density, generator, device)
    return BlockSelection(part | full, Sq, Sk, block_size)


def dense_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Dense causal attention with the cached prefix (query ``t`` sees keys ``<= P + t``) through
    ``scaled_dot_product_attention``; q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] (K/V repeated for
    GQA) -> [B, Hq, Sq, D] in q's dtype."""
    sq, sk = q.shape[2], k.shape[2]
    g = q.shape[1] // k.shape[1]
    allowed = (torch.arange(sq, device=q.device)[:, None] + (sk - sq)) >= torch.arange(
        sk, device=q.device
    )[None, :]
    return F.scaled_dot_product_attention(
        q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=allowed, scale=scale
    )


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float32 (float64 when either is float64)."""
    dt = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    a, b = a.to(dt), b.to(dt)
    return float((a - b).norm() / b.norm())
