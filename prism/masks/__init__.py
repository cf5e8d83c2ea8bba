"""Selection rules, block-causal geometry and BlockMask construction."""

from .blockmask import block_mask_to_bool, bool_to_block_lists, selection_to_block_mask
from .geometry import SUPPORTED_BLOCK_SIZES, block_causal, check_block_size, local_window
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
    "apply_rule",
    "block_causal",
    "block_mask_to_bool",
    "bool_to_block_lists",
    "check_block_size",
    "cover",
    "cover_map",
    "local_window",
    "masked_softmax",
    "min_prob",
    "minimal_count",
    "selection_to_block_mask",
    "top_k",
    "top_p",
]
