"""Selection rules, block-causal geometry and BlockMask construction."""

from .blockmask import block_mask_to_bool, bool_to_block_lists, selection_to_block_mask
from .geometry import (
    SUPPORTED_BLOCK_SIZES,
    SUPPORTED_Q_BLOCK_SIZES,
    block_causal,
    block_dims,
    check_block_size,
    check_q_block_size,
    grid_block_size,
    grid_shape,
    local_window,
)
from .select import (
    RULES,
    apply_rule,
    cover,
    cover_map,
    masked_softmax,
    min_prob,
    minimal_count,
    top_k,
    top_p,
)
from .selection import BlockSelection

__all__ = [
    "BlockSelection",
    "RULES",
    "SUPPORTED_BLOCK_SIZES",
    "SUPPORTED_Q_BLOCK_SIZES",
    "apply_rule",
    "block_causal",
    "block_dims",
    "block_mask_to_bool",
    "bool_to_block_lists",
    "check_block_size",
    "check_q_block_size",
    "cover",
    "cover_map",
    "grid_block_size",
    "grid_shape",
    "local_window",
    "masked_softmax",
    "min_prob",
    "minimal_count",
    "selection_to_block_mask",
    "top_k",
    "top_p",
]
