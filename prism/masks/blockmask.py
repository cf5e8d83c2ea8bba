"""Block-level selection <-> block lists <-> FlexAttention ``BlockMask`` (never Sq x Sk).

The one conversion between the two storages of a block selection:

* a bool block map ``[..., NQB, NKB]``;
* block lists ``(num int32 [..., NQB], idx int32 [..., NQB, W])``: the first ``num`` entries of a
  row are its selected KV block indices (ascending where this module writes them), the rest are
  unused. A selection is two such pairs: partial (causal-frontier) blocks and full blocks, the
  ``kv_*`` / ``full_kv_*`` tensors of a ``BlockMask``.

:func:`bool_to_block_lists` / :func:`lists_to_bool` convert one pair, :func:`selection_to_lists`
splits a selection into its two pairs, :func:`lists_to_block_mask` / :func:`block_mask_to_bool`
wrap / unwrap a ``BlockMask``.
"""

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


def _causal_no_prefix(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


_causal_no_prefix.prism_causal = True


def causal_mask_mod(prefix: int):
    """Token-level causal predicate for partial blocks with a cached prefix of ``prefix`` tokens.

    ``prefix == 0`` (a plain pre-fill) gives a module-level function that captures nothing.
    Every returned function carries ``prism_causal = True``: the ``flex`` backend then rebuilds
    the predicate inside its compiled region with the offset taken from the tensor shapes
    (``Sk - Sq``), because FlexAttention's FLASH (FA4) backend rejects a ``mask_mod`` that
    captures a Python int once Dynamo makes it dynamic.
    """
    if prefix == 0:  # also a SymInt known to be 0 under torch.compile
        return _causal_no_prefix

    def mask_mod(b, h, q_idx, kv_idx):
        return q_idx + prefix >= kv_idx

    mask_mod.prism_causal = True
    return mask_mod


def is_causal_mask_mod(fn) -> bool:
    """True for the predicates :func:`causal_mask_mod` makes."""
    return bool(getattr(fn, "prism_causal", False))


def lists_to_bool(num: torch.Tensor, idx: torch.Tensor, nkb: int) -> torch.Tensor:
    """Block lists -> bool block map: ``num`` int [..., NQB], ``idx`` int [..., NQB, W] ->
    bool [..., NQB, NKB] (``nkb`` = NKB), True at the first ``num`` indices of each row.

    ``W`` may be narrower than NKB (only the first ``num`` entries are read); an index may repeat
    among the unused entries. One scatter per chunk of leading rows (e.g. heads), so that the
    int64 copy of the indices stays small (about 4M entries at a time).
    """
    if idx.shape[:-1] != num.shape:
        raise ValueError(f"num {tuple(num.shape)} and idx {tuple(idx.shape)} do not match")
    lead, nqb, w = num.shape[:-1], num.shape[-1], idx.shape[-1]
    out = torch.zeros(*lead, nqb, nkb, dtype=torch.bool, device=idx.device)
    if out.numel() == 0:
        return out
    rows = out.view(-1, nqb, nkb)
    n_flat, i_flat = num.reshape(-1, nqb), idx.reshape(-1, nqb, w)
    pos = torch.arange(w, device=idx.device)
    step = max(1, (1 << 22) // max(1, nqb * max(w, nkb + 1)))
    for s in range(0, rows.shape[0], step):
        valid = pos < n_flat[s : s + step, :, None]
        # unused entries go to a dump column NKB, dropped below (scatter order is then free)
        tgt = torch.where(valid, i_flat[s : s + step].long(), nkb)
        tmp = torch.zeros(*tgt.shape[:-1], nkb + 1, dtype=torch.bool, device=idx.device)
        tmp.scatter_(-1, tgt, True)
        rows[s : s + step] = tmp[..., :nkb]
    return out


def selection_to_lists(
    mask: torch.Tensor, sq: int, sk: int, block_size: int | tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a block selection ``mask`` bool [B, H, NQB, NKB] into the four BlockMask lists
    ``(kv_num, kv_idx, full_num, full_idx)``, int32 [B, H, NQB] / [B, H, NQB, NKB]: the selected
    blocks cut by the causal frontier (partial) and the other selected visible blocks (full).
    Selected blocks outside the causal pattern are dropped."""
    visible, partial = block_causal(sq, sk, block_size, mask.device)
    sel = mask & visible
    kv_num, kv_idx = bool_to_block_lists(sel & partial)
    full_num, full_idx = bool_to_block_lists(sel & ~partial)
    return kv_num, kv_idx, full_num, full_idx


def selection_to_block_mask(mask: torch.Tensor, sq: int, sk: int, block_size) -> BlockMask:
    """Build a FlexAttention BlockMask from a block selection ``mask`` bool [B, H, NQB, NKB].

    Selected blocks cut by the causal frontier become *partial* blocks (with the causal
    ``mask_mod``); all other selected (visible) blocks become *full* blocks.
    """
    return lists_to_block_mask(*selection_to_lists(mask, sq, sk, block_size), sq, sk, block_size)


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
    cached-prefix offset) and full blocks (``full_kv_*``); int32 [B, H, NQB] / [B, H, NQB, W].
    ``full_*`` None: no full blocks (see :func:`block_mask_from_lists`)."""
    return block_mask_from_lists(
        kv_num, kv_idx, full_num, full_idx, causal_mask_mod(sk - sq), sq, sk, block_size
    )


def block_mask_to_bool(bm: BlockMask, nkb: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`selection_to_block_mask`: (partial, full) bool [B, H, NQB, NKB].

    ``nkb`` defaults to the width of the index lists (lists narrower than ``nkb`` are fine).
    Anything with the four list attributes works (no ``mask_mod`` is read)."""
    if nkb is None:
        nkb = bm.kv_indices.shape[-1]
    partial = lists_to_bool(bm.kv_num_blocks, bm.kv_indices, nkb)
    if bm.full_kv_num_blocks is None:
        return partial, torch.zeros_like(partial)
    return partial, lists_to_bool(bm.full_kv_num_blocks, bm.full_kv_indices, nkb)


def block_mask_from_lists(
    kv_num: torch.Tensor,
    kv_idx: torch.Tensor,
    full_num: torch.Tensor | None,
    full_idx: torch.Tensor | None,
    mask_mod,
    sq: int,
    sk: int,
    block_size: int | tuple[int, int],
) -> BlockMask:
    """The one BlockMask constructor of Prism's kernels: the four block lists (int32
    [B, H, NQB] / [B, H, NQB, W]; ``full_*`` None = no full blocks) and a ``mask_mod`` for the
    partial blocks; no q-block lists (forward only).

    On CUDA, missing full lists are passed as empty ones (counts 0, indices 0): FlexAttention's
    FLASH (FA4) backend refuses a BlockMask without them ("Flash attention with block mask but
    without full blocks is not supported yet", H200, flash-attn-4 4.0.0b36). Not on CPU:
    Inductor's CPU flex template (torch 2.13) fails to compile a span ``mask_mod`` with them."""
    if full_num is None and kv_num.is_cuda:
        full_num, full_idx = torch.zeros_like(kv_num), torch.zeros_like(kv_idx)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(sq, sk),
        compute_q_blocks=False,
    )


def is_flash_safe_mask_mod(fn) -> bool:
    """False for the predicates FA4 cannot lower (tagged ``prism_flash_unsafe``): the ``flex``
    backend then runs them on FlexAttention's Triton backend."""
    return not getattr(fn, "prism_flash_unsafe", False)


def span_block_mask(
    kv_num: torch.Tensor,
    kv_idx: torch.Tensor,
    start: torch.Tensor,
    count: torch.Tensor,
    sq: int,
    sk: int,
    block_size: int | tuple[int, int],
) -> BlockMask:
    """BlockMask over the listed blocks, each masked token by token to one key span per query.

    ``kv_num`` int32 [B, H, NQB] / ``kv_idx`` int32 [B, H, NQB, W]: the blocks to visit, all of
    them partial (no full blocks). ``start`` / ``count`` int [B, Sq]: query row q of batch row b
    may see the keys ``start[b, q] <= kv < start[b, q] + count[b, q]`` (``count`` 0: none). The
    span is the only token-level rule (no causal predicate is added): the caller keeps every span
    inside the causal frontier. The ``mask_mod`` reads ``start`` / ``count`` as captured tensors,
    so only backends that honour ``mask_mod`` (FlexAttention) apply it; it is tagged
    ``prism_flash_unsafe``: FA4 cannot lower those captured [B, Sq] reads ("CuteDSL template
    failed: convert FlexibleLayout to FixedLayout first", H200), so ``flex`` runs it on
    FlexAttention's Triton backend.
    """

    def span_mask_mod(b, h, q_idx, kv_pos):
        first = start[b, q_idx]
        return (kv_pos >= first) & (kv_pos < first + count[b, q_idx])

    span_mask_mod.prism_flash_unsafe = True
    return block_mask_from_lists(kv_num, kv_idx, None, None, span_mask_mod, sq, sk, block_size)
