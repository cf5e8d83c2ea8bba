"""Old module path of the fused Prism estimator (kept importable; imports Triton).

The estimator now lives in :mod:`.op` (parameters, checks, :func:`prism_select_block_lists`),
:mod:`.pool` (launch 1) and :mod:`.select` (launch 2); import from
``prism.kernels.estimation`` instead.
"""

from __future__ import annotations

from .op import (
    MAX_BLOCK_N,
    Plan,
    PrismKernelParams,
    block_lists_to_block_mask,
    block_lists_to_selection,
    prism_select_block_lists,
    supports,
)
from .pool import pool_blocks_fused
from .select import SelectConfig, pick_select_config, select_from_pooled

__all__ = [
    "MAX_BLOCK_N",
    "Plan",
    "PrismKernelParams",
    "SelectConfig",
    "block_lists_to_block_mask",
    "block_lists_to_selection",
    "pick_select_config",
    "pool_blocks_fused",
    "prism_select_block_lists",
    "select_from_pooled",
    "supports",
]
