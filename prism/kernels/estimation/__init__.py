"""Fused block-importance estimators (Triton).

``prism_fused``: the Prism scorer (DESIGN.md §4) fused into two Triton launches that write the
selection straight into FlexAttention BlockMask block lists. Imported lazily (attribute access),
so that ``import prism`` never imports Triton: Triton's interpreter (``TRITON_INTERPRET=1``) must be
switched on before Triton's first import.
"""

from __future__ import annotations

import importlib

_EXPORTS = (
    "MAX_BLOCK_N",
    "SelectConfig",
    "block_lists_to_block_mask",
    "block_lists_to_selection",
    "pick_select_config",
    "prism_select_block_lists",
    "supports",
)

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.prism_fused"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
