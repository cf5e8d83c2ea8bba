"""``BlockSelection``: the scorer's output, the one thing every backend consumes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .blockmask import selection_to_block_mask
from .geometry import block_causal


@dataclass
class BlockSelection:
    """Which KV blocks each query block attends to, per query head.

    Attributes:
        mask: bool [B, Hq, NQB, NKB], block-causal (forced sink / diagonal included by scorers).
        q_len: Sq.  kv_len: Sk (>= Sq; P = Sk - Sq is the cached prefix).  block_size: BS.
        info: optional per-scorer diagnostics (e.g. FlexPrefill's per-head pattern choice).
    """

    mask: torch.Tensor
    q_len: int
    kv_len: int
    block_size: int
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mask.dtype != torch.bool or self.mask.dim() != 4:
            raise ValueError("BlockSelection.mask must be a bool tensor [B, Hq, NQB, NKB]")

    # -- geometry -----------------------------------------------------------------------------
    def causal(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(visible, partial) bool [NQB, NKB] for this selection's lengths."""
        return block_causal(self.q_len, self.kv_len, self.block_size, self.mask.device)

    # -- statistics ---------------------------------------------------------------------------
    def density_per_head(self) -> torch.Tensor:
        """float32 [B, Hq]: selected visible blocks / visible (causal) blocks."""
        visible, _ = self.causal()
        sel = (self.mask & visible).sum(dim=(-2, -1), dtype=torch.float32)
        return sel / visible.sum().float()

    @property
    def density(self) -> float:
        """Selected blocks / causal blocks over the whole batch and all heads."""
        return float(self.density_per_head().mean())

    # -- conversion ---------------------------------------------------------------------------
    def block_mask(self, q_len: int | None = None, kv_len: int | None = None):
        """The FlexAttention ``BlockMask`` (H = Hq): partial diagonal blocks + full blocks."""
        self._check_lengths(q_len, kv_len)
        return selection_to_block_mask(self.mask, self.q_len, self.kv_len, self.block_size)

    def _check_lengths(self, q_len: int | None, kv_len: int | None) -> None:
        q_len = self.q_len if q_len is None else q_len
        kv_len = self.kv_len if kv_len is None else kv_len
        if (q_len, kv_len) != (self.q_len, self.kv_len):
            raise ValueError(
                f"selection was made for (Sq, Sk) = ({self.q_len}, {self.kv_len}), "
                f"asked for ({q_len}, {kv_len})"
            )

    # -- combinators --------------------------------------------------------------------------
    def _check_compatible(self, other: BlockSelection) -> None:
        if (self.q_len, self.kv_len, self.block_size) != (
            other.q_len,
            other.kv_len,
            other.block_size,
        ) or self.mask.shape != other.mask.shape:
            raise ValueError("cannot combine selections of different shapes / block sizes")

    def __or__(self, other: BlockSelection) -> BlockSelection:
        self._check_compatible(other)
        return BlockSelection(self.mask | other.mask, self.q_len, self.kv_len, self.block_size)

    def __and__(self, other: BlockSelection) -> BlockSelection:
        self._check_compatible(other)
        return BlockSelection(self.mask & other.mask, self.q_len, self.kv_len, self.block_size)
