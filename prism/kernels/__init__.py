"""Attention backends. Each takes ``(q, k, v, block_mask, scale)`` and returns ``[B, Hq, Sq, D]``.

A backend never knows the scorer: everything it needs is in the FlexAttention ``BlockMask``.
Register a new one with :func:`register_backend`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from .flex import flex_sparse_attention
from .reference import reference_attention

BACKENDS: dict[str, Callable] = {}


def register_backend(name: str, fn: Callable | None = None):
    """Register ``fn(q, k, v, block_mask, scale) -> out`` as backend ``name`` (usable as decorator)."""

    def deco(f: Callable) -> Callable:
        BACKENDS[name] = f
        return f

    return deco(fn) if fn is not None else deco


def _triton(q, k, v, block_mask, scale=None):
    from .block_sparse import block_sparse_attention  # imported lazily: needs triton

    return block_sparse_attention(q, k, v, block_mask, scale=scale)


register_backend("reference", reference_attention)
register_backend("flex", flex_sparse_attention)
register_backend("flex_triton", functools.partial(flex_sparse_attention, impl="triton"))
register_backend("flex_flash", functools.partial(flex_sparse_attention, impl="flash"))
register_backend("triton", _triton)


def get_backend(name: str) -> Callable:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid backends: {sorted(BACKENDS)}")
    return BACKENDS[name]


__all__ = [
    "BACKENDS",
    "get_backend",
    "register_backend",
    "reference_attention",
    "flex_sparse_attention",
]
