"""Attention backends. Each takes ``(q, k, v, block_mask, scale)`` and returns ``[B, Hq, Sq, D]``.

A backend never knows the scorer: everything it needs is in the FlexAttention ``BlockMask``.
A backend is a :class:`Backend` record; add one with :func:`register_backend`.

``honours_mask_mod``: whether the backend applies the BlockMask's ``mask_mod`` inside partial
blocks (FlexAttention does). Backends that do not (``triton``, ``reference``) apply the causal
rule ``q_idx + (Sk - Sq) >= kv_idx`` there instead, which is what every BlockMask Prism builds
for plain causal attention carries; callers with any other ``mask_mod`` (HF span masks) must pick
a backend that honours it.

``reference`` (:mod:`prism.kernels.reference`) is the oracle every backend is tested against
(``tests/test_backend_contract.py`` runs over :func:`available_backends`); it is also the CPU
fallback of ``triton`` when Triton's interpreter is off.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from .flex import flex_sparse_attention
from .reference import reference_attention


@dataclass(frozen=True)
class Backend:
    """A registered attention backend: ``fn(q, k, v, block_mask, scale=None) -> out``."""

    name: str
    fn: Callable
    honours_mask_mod: bool = False

    def __call__(self, q, k, v, block_mask, scale=None):
        return self.fn(q, k, v, block_mask, scale=scale)


#: name -> Backend record
BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, fn: Callable | None = None, *, honours_mask_mod: bool = False):
    """Register ``fn(q, k, v, block_mask, scale) -> out`` as backend ``name`` (usable as a
    decorator). ``honours_mask_mod``: the backend applies the BlockMask's ``mask_mod``."""

    def deco(f: Callable) -> Callable:
        BACKENDS[name] = Backend(name, f, honours_mask_mod)
        return f

    return deco(fn) if fn is not None else deco


def _triton(q, k, v, block_mask, scale=None):
    from .block_sparse import block_sparse_attention  # imported lazily: needs triton

    return block_sparse_attention(q, k, v, block_mask, scale=scale)


register_backend("reference", reference_attention)
register_backend("flex", flex_sparse_attention, honours_mask_mod=True)
register_backend(
    "flex_triton", functools.partial(flex_sparse_attention, impl="triton"), honours_mask_mod=True
)
register_backend(
    "flex_flash", functools.partial(flex_sparse_attention, impl="flash"), honours_mask_mod=True
)
register_backend("triton", _triton)


def get_backend_record(name: str) -> Backend:
    """The :class:`Backend` record of ``name`` (ValueError listing the valid names)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid backends: {sorted(BACKENDS)}")
    return BACKENDS[name]


def get_backend(name: str) -> Backend:
    """The backend ``name``, callable as ``backend(q, k, v, block_mask, scale=None)``."""
    return get_backend_record(name)


def available_backends() -> list[str]:
    return sorted(BACKENDS)


__all__ = [
    "BACKENDS",
    "Backend",
    "available_backends",
    "get_backend",
    "get_backend_record",
    "register_backend",
    "reference_attention",
    "flex_sparse_attention",
]
