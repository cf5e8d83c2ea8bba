"""``prism_fused``: the Prism scorer on the fused Triton estimator (same config, same selection).

``PrismFusedScorer`` subclasses :class:`~prism.scorers.prism.PrismScorer`. Where the fused kernel
runs (CUDA tensors; CPU tensors when Triton's interpreter is on, ``TRITON_INTERPRET=1``) it returns
a :class:`ListBlockSelection` that *carries* the BlockMask block lists the kernel wrote, so
``.block_mask()`` does not rebuild them; anywhere else (CPU without the interpreter, Triton not
installed, an unsupported shape) it is exactly ``PrismScorer``.

This module does not import Triton at import time (``import prism`` imports every scorer).
"""

from __future__ import annotations

import os

import torch

from ..masks import BlockSelection
from ..masks.geometry import block_causal
from .base import register_scorer
from .prism import PrismScorer


class ListBlockSelection(BlockSelection):
    """A :class:`BlockSelection` stored as BlockMask block lists.

    ``lists = (kv_num, kv_idx, full_num, full_idx)``: int32 ``[B, Hq, NQB]`` / ``[B, Hq, NQB, W]``,
    partial (causal-frontier) blocks in ``kv_*``, the other selected blocks in ``full_kv_*``; the
    first ``num`` entries of a row are its selected KV block indices.

    * ``block_mask()`` wraps the stored lists (built once, cached) — no sort, no rebuild.
    * ``mask`` (bool ``[B, Hq, NQB, NKB]``) is expanded from the lists on first access and cached:
      one scatter per list (chunked over heads, so the int64 index copy stays small). It costs
      ``B*Hq*NQB*NKB`` bytes (32 MB at 128K tokens, 32 heads), so code on the fast path should use
      ``block_mask()``, ``density`` and ``num_selected()``, which never build it.
    * ``density`` / ``density_per_head()`` are computed from the list lengths.
    """

    def __init__(
        self,
        lists: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        q_len: int,
        kv_len: int,
        block_size: int,
        info: dict | None = None,
    ) -> None:
        kv_num, kv_idx, full_num, full_idx = lists
        if kv_num.dim() != 3 or kv_idx.dim() != 4 or full_num.shape != kv_num.shape:
            raise ValueError(
                "lists must be (kv_num [B,H,NQB], kv_idx [B,H,NQB,W], full_num, full_idx)"
            )
        self.lists = (kv_num, kv_idx, full_num, full_idx)
        self.q_len, self.kv_len, self.block_size = int(q_len), int(kv_len), int(block_size)
        self.info = dict(info or {})
        self._mask: torch.Tensor | None = None
        self._block_mask = None

    # -- the bool mask, lazily -----------------------------------------------------------------
    @property
    def num_kv_blocks(self) -> int:
        return -(-self.kv_len // self.block_size)

    @property
    def mask(self) -> torch.Tensor:  # type: ignore[override]
        if self._mask is None:
            self._mask = self._expand()
        return self._mask

    @mask.setter
    def mask(self, value: torch.Tensor) -> None:
        raise AttributeError("ListBlockSelection.mask is derived from the block lists (read-only)")

    def _expand(self) -> torch.Tensor:
        kv_num, kv_idx, full_num, full_idx = self.lists
        b, h, nqb = kv_num.shape
        nkb = self.num_kv_blocks
        out = torch.zeros(b, h, nqb, nkb + 1, dtype=torch.bool, device=kv_num.device)
        for num, idx in ((kv_num, kv_idx), (full_num, full_idx)):
            w = idx.shape[-1]
            pos = torch.arange(w, device=idx.device)
            for hh in range(h):  # one head at a time: the int64 index copy is [B, NQB, W]
                valid = pos < num[:, hh, :, None]
                tgt = torch.where(valid, idx[:, hh].long(), nkb)  # unused slots -> dump column
                out[:, hh].scatter_(-1, tgt, True)
        return out[..., :nkb].contiguous()

    # -- statistics from the list lengths ----------------------------------------------------------
    def num_selected(self) -> torch.Tensor:
        """int32 [B, Hq, NQB]: selected KV blocks per query block (partial + full)."""
        return self.lists[0] + self.lists[2]

    def density_per_head(self) -> torch.Tensor:
        visible, _ = block_causal(self.q_len, self.kv_len, self.block_size, self.lists[0].device)
        sel = self.num_selected().sum(dim=-1, dtype=torch.float32)
        return sel / visible.sum().float()

    # -- conversion --------------------------------------------------------------------------------
    def block_mask(self, q_len: int | None = None, kv_len: int | None = None):
        self._check_lengths(q_len, kv_len)
        if self._block_mask is None:
            from ..masks.blockmask import lists_to_block_mask

            self._block_mask = lists_to_block_mask(
                *self.lists, self.q_len, self.kv_len, self.block_size
            )
        return self._block_mask

    def __repr__(self) -> str:
        kv_num = self.lists[0]
        return (
            f"ListBlockSelection(shape={tuple(kv_num.shape)} x {self.num_kv_blocks}, "
            f"q_len={self.q_len}, kv_len={self.kv_len}, block_size={self.block_size})"
        )


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@register_scorer("prism_fused")
class PrismFusedScorer(PrismScorer):
    """Prism (DESIGN.md §4) on the fused Triton estimator; same ``PrismConfig`` and selection.

    Path: CUDA tensors -> Triton kernel; CPU tensors -> the kernel under Triton's interpreter if
    ``TRITON_INTERPRET=1``, else the PyTorch ``PrismScorer`` path. Also the PyTorch path when Triton
    is missing or the fused kernel does not support the inputs (``NKB > 4096``, float64, odd D).
    ``last_path`` records which one ran (``"fused"`` or ``"torch"``).
    """

    last_path: str | None = None

    def select(self, q: torch.Tensor, k: torch.Tensor) -> BlockSelection:
        sel = None
        if q.is_cuda or (q.device.type == "cpu" and _interpreter_on()):
            sel = fused_selection(self, q, k)
        self.last_path = "torch" if sel is None else "fused"
        return self.select_torch(q, k) if sel is None else sel


def fused_selection(scorer: PrismScorer, q: torch.Tensor, k: torch.Tensor) -> BlockSelection | None:
    """The fused kernel's selection for ``scorer.config``, or None where it does not apply
    (Triton missing, unsupported input / config)."""
    try:
        from ..kernels.estimation import prism_fused as fused
    except ImportError:  # Triton not installed
        return None
    if not fused.supports(q, k, scorer.config):
        return None
    lists = fused.prism_select_block_lists(q, k, scorer.config)
    return ListBlockSelection(lists, q.shape[2], k.shape[2], scorer.config.block_size)
