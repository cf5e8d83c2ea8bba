"""Block-level selection <-> FlexAttention ``BlockMask`` (never an Sq x Sk mask)."""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

from .geometry import block_causal


def bool_to_block_lists(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``m`` bool [B, H, NQB, NKB] -> (num int32 [B, H, NQB], indices int32 [B, H, NQB, NKB]).

    Selected KV block indices come first in ascending order; the remaining entries are valid but
    unused indices (BlockMask consumers read only the first ``num`` of each row).
    """
    nkb = m.shape[-1]
    num = m.sum(dim=-1, dtype=torch.int32)
    j = torch.arange(nkb, device=m.device, dtype=torch.int32)
    key = torch.where(m, j, j + nkb)
    key = key.sort(dim=-1).values
    idx = torch.where(key >= nkb, key - nkb, key)
    return num, idx.to(torch.int32)


def causal_mask_mod(prefix: int):
    """Token-level causal predicate for partial blocks with a cached prefix of ``prefix`` tokens."""

    def mask_mod(b, h, q_idx, kv_idx):
        return q_idx + prefix >= kv_idx

    return mask_mod


def selection_to_block_mask(mask: torch.Tensor, sq: int, sk: int, block_size: int) -> BlockMask:
    """Build a FlexAttention BlockMask from a block selection ``mask`` bool [B, H, NQB, NKB].

    Selected blocks cut by the causal frontier become *partial* blocks (with the causal
    ``mask_mod``); all other selected (visible) blocks become *full* blocks.
    """
    visible, partial = block_causal(sq, sk, block_size, mask.device)
    sel = mask & visible
    kv_num, kv_idx = bool_to_block_lists(sel & partial)
    full_num, full_idx = bool_to_block_lists(sel & ~partial)
    return lists_to_block_mask(kv_num, kv_idx, full_num, full_idx, sq, sk, block_size)


def lists_to_block_mask(
    kv_num: torch.Tensor,
    kv_idx: torch.Tensor,
    full_num: torch.Tensor | None,
    full_idx: torch.Tensor | None,
    sq: int,
    sk: int,
    block_size: int | tuple[int, int],
) -> BlockMask:
    """BlockMask from block lists: partial blocks (``kv_*``, causal ``mask_mod`` with the
    cached-prefix offset) and full blocks (``full_kv_*``); int32 [B, H, NQB] / [B, H, NQB, W]."""
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block_size,
        mask_mod=causal_mask_mod(sk - sq),
        seq_lengths=(sq, sk),
        compute_q_blocks=False,
    )


def block_mask_to_bool(bm: BlockMask) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`selection_to_block_mask`: (partial, full) bool [B, H, NQB, NKB]."""

    def dense(num: torch.Tensor | None, idx: torch.Tensor | None) -> torch.Tensor | None:
        if num is None:
            return None
        nkb = idx.shape[-1]
        pos = torch.arange(nkb, device=idx.device)
        valid = pos < num.unsqueeze(-1)
        # scatter_add is order-free (an index may repeat among the unused slots)
        out = torch.zeros(idx.shape, dtype=torch.int32, device=idx.device)
        out.scatter_add_(-1, idx.long(), valid.to(torch.int32))
        return out > 0

    partial = dense(bm.kv_num_blocks, bm.kv_indices)
    full = dense(bm.full_kv_num_blocks, bm.full_kv_indices)
    if full is None:
        full = torch.zeros_like(partial)
    return partial, full
