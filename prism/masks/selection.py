"""``BlockSelection``: the scorer's output, the one thing every backend consumes."""

from __future__ import annotations

from typing import Any

import torch

from .blockmask import lists_to_block_mask, lists_to_bool, selection_to_lists
from .geometry import block_causal, grid_shape

#: ``(kv_num, kv_idx, full_num, full_idx)``: int32 [B, Hq, NQB] / [B, Hq, NQB, W]
BlockLists = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class BlockSelection:
    """Which KV blocks each query block attends to, per query head.

    A selection is stored in one of two forms; the other is built from it on first use and cached:

    * ``mask``: bool [B, Hq, NQB, NKB], block-causal (forced sink / diagonal included by scorers);
    * ``lists``: ``(kv_num, kv_idx, full_num, full_idx)``, int32 [B, Hq, NQB] / [B, Hq, NQB, W]
      (``W`` <= NKB, the first ``num`` entries of a row are its selected KV block indices):
      the selected partial (causal-frontier) blocks in ``kv_*``, the other selected blocks in
      ``full_*`` — exactly the tensors of the FlexAttention ``BlockMask``.

    ``BlockSelection(mask, q_len, kv_len, block_size, info=...)`` stores a mask,
    :meth:`from_lists` stores lists (the fused Prism estimator writes them directly).
    :meth:`block_mask` is built once and cached. :attr:`density`, :meth:`density_per_head` and
    :meth:`num_selected` use the lists when they exist (cheap: one number per row) and the mask
    otherwise; they never expand lists into a mask. Expanding costs ``B*Hq*NQB*NKB`` bytes (32 MB
    at 128K tokens, 32 heads), so code on the fast path should avoid :attr:`mask` on a
    list-stored selection.

    The stored tensors are not copied: mutating ``mask`` in place is seen by everything derived
    from it afterwards, but not by ``lists`` / ``block_mask()`` already built.

    Attributes:
        q_len: Sq.  kv_len: Sk (>= Sq; P = Sk - Sq is the cached prefix).  block_size: BS, or
        the pair ``(BSQ, BSK)`` of a rectangular grid (``prism.masks.geometry``).
        info: optional per-scorer diagnostics (e.g. FlexPrefill's per-head pattern choice).
    """

    def __init__(
        self,
        mask: torch.Tensor,
        q_len: int,
        kv_len: int,
        block_size: int | tuple[int, int],
        info: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 4:
            raise ValueError("BlockSelection.mask must be a bool tensor [B, Hq, NQB, NKB]")
        self._setup(mask, None, q_len, kv_len, block_size, info)
        self._check_grid(mask.shape[-2], mask.shape[-1], "mask")

    @classmethod
    def from_lists(
        cls,
        lists: BlockLists,
        q_len: int,
        kv_len: int,
        block_size: int | tuple[int, int],
        info: dict[str, Any] | None = None,
    ) -> BlockSelection:
        """A selection stored as the four BlockMask block lists (see the class docstring)."""
        sel = cls.__new__(cls)
        sel._init_lists(lists, q_len, kv_len, block_size, info)
        return sel

    def _init_lists(self, lists, q_len, kv_len, block_size, info) -> None:
        lists = tuple(lists)
        if len(lists) != 4:
            raise ValueError("lists must be (kv_num, kv_idx, full_num, full_idx)")
        kv_num, kv_idx, full_num, full_idx = lists
        if (
            kv_num.dim() != 3
            or full_num.shape != kv_num.shape
            or kv_idx.dim() != 4
            or full_idx.dim() != 4
            or kv_idx.shape[:3] != kv_num.shape
            or full_idx.shape[:3] != kv_num.shape
        ):
            raise ValueError(
                "lists must be (kv_num [B,Hq,NQB], kv_idx [B,Hq,NQB,W], full_num, full_idx)"
            )
        if any(t.dtype.is_floating_point or t.dtype == torch.bool for t in lists):
            raise ValueError("block lists must be integer tensors (int32)")
        self._setup(None, lists, q_len, kv_len, block_size, info)
        self._check_grid(kv_num.shape[-1], None, "lists")

    def _setup(self, mask, lists, q_len, kv_len, block_size, info) -> None:
        self._mask: torch.Tensor | None = mask
        self._lists: BlockLists | None = lists
        self._block_mask = None
        self._stored = "mask" if mask is not None else "lists"
        # kept as given (not int()): under torch.compile they may be symbolic sizes
        self.q_len, self.kv_len, self.block_size = q_len, kv_len, block_size
        self.info: dict[str, Any] = dict(info or {})

    def _check_grid(self, nqb: int, nkb: int | None, what: str) -> None:
        want = grid_shape(self.q_len, self.kv_len, self.block_size)
        got = (nqb, want[1] if nkb is None else nkb)
        if got != want:
            raise ValueError(
                f"selection {what} has a {got[0]} x {got[1]} block grid; (Sq, Sk, BS) = "
                f"({self.q_len}, {self.kv_len}, {self.block_size}) needs {want[0]} x {want[1]}"
            )

    # -- the two storages ---------------------------------------------------------------------
    @property
    def mask(self) -> torch.Tensor:
        """bool [B, Hq, NQB, NKB] (expanded from the lists on first access when list-stored)."""
        if self._mask is None:
            kv_num, kv_idx, full_num, full_idx = self._lists
            nkb = self.num_kv_blocks
            mask = lists_to_bool(kv_num, kv_idx, nkb)
            mask |= lists_to_bool(full_num, full_idx, nkb)
            self._mask = mask
        return self._mask

    @property
    def lists(self) -> BlockLists:
        """``(kv_num, kv_idx, full_num, full_idx)`` (split from the mask on first access when
        mask-stored; then ``W = NKB`` and blocks outside the causal pattern are dropped)."""
        if self._lists is None:
            self._lists = selection_to_lists(self._mask, self.q_len, self.kv_len, self.block_size)
        return self._lists

    @property
    def stored_as(self) -> str:
        """``"mask"`` or ``"lists"``: the form this selection was made from."""
        return self._stored

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, Hq, NQB, NKB)."""
        if self._mask is not None:
            return tuple(self._mask.shape)
        b, h, nqb = self._lists[0].shape
        return (b, h, nqb, self.num_kv_blocks)

    @property
    def device(self) -> torch.device:
        return (self._mask if self._mask is not None else self._lists[0]).device

    @property
    def num_kv_blocks(self) -> int:
        """NKB = ceil(Sk / BS)."""
        return grid_shape(self.q_len, self.kv_len, self.block_size)[1]

    # -- geometry -----------------------------------------------------------------------------
    def causal(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(visible, partial) bool [NQB, NKB] for this selection's lengths."""
        return block_causal(self.q_len, self.kv_len, self.block_size, self.device)

    # -- statistics ---------------------------------------------------------------------------
    def num_selected(self) -> torch.Tensor:
        """int32 [B, Hq, NQB]: selected visible KV blocks per query block (partial + full)."""
        if self._lists is not None:
            return self._lists[0].to(torch.int32) + self._lists[2].to(torch.int32)
        visible, _ = self.causal()
        return (self._mask & visible).sum(dim=-1, dtype=torch.int32)

    def density_per_head(self) -> torch.Tensor:
        """float32 [B, Hq]: selected visible blocks / visible (causal) blocks."""
        visible, _ = self.causal()
        sel = self.num_selected().sum(dim=-1, dtype=torch.float32)
        return sel / visible.sum().float()

    @property
    def density(self) -> float:
        """Selected blocks / causal blocks over the whole batch and all heads."""
        return float(self.density_per_head().mean())

    # -- conversion ---------------------------------------------------------------------------
    def block_mask(self, q_len: int | None = None, kv_len: int | None = None):
        """The FlexAttention ``BlockMask`` (H = Hq): partial diagonal blocks + full blocks.

        Built once (from :attr:`lists`) and cached."""
        self._check_lengths(q_len, kv_len)
        if self._block_mask is None:
            self._block_mask = lists_to_block_mask(
                *self.lists, self.q_len, self.kv_len, self.block_size
            )
        return self._block_mask

    def _check_lengths(self, q_len: int | None, kv_len: int | None) -> None:
        q_len = self.q_len if q_len is None else q_len
        kv_len = self.kv_len if kv_len is None else kv_len
        if (q_len, kv_len) != (self.q_len, self.kv_len):
            raise ValueError(
                f"selection was made for (Sq, Sk) = ({self.q_len}, {self.kv_len}), "
                f"asked for ({q_len}, {kv_len})"
            )

    # -- combinators (on masks) ---------------------------------------------------------------
    def _check_compatible(self, other: BlockSelection) -> None:
        if (self.q_len, self.kv_len, self.block_size) != (
            other.q_len,
            other.kv_len,
            other.block_size,
        ) or self.shape != other.shape:
            raise ValueError("cannot combine selections of different shapes / block sizes")

    def __or__(self, other: BlockSelection) -> BlockSelection:
        self._check_compatible(other)
        return BlockSelection(self.mask | other.mask, self.q_len, self.kv_len, self.block_size)

    def __and__(self, other: BlockSelection) -> BlockSelection:
        self._check_compatible(other)
        return BlockSelection(self.mask & other.mask, self.q_len, self.kv_len, self.block_size)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(stored_as={self.stored_as!r}, shape={self.shape}, "
            f"q_len={self.q_len}, kv_len={self.kv_len}, block_size={self.block_size})"
        )
