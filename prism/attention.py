"""Sparse attention entry points: ``sparse_attention`` (functional) and ``SparseAttention``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._checks import check_qkv
from .kernels import get_backend
from .masks import BlockSelection
from .scorers import Scorer, build_scorer


def _run(
    scorer: Scorer,
    backend: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None,
    selection: BlockSelection | None,
) -> tuple[torch.Tensor, BlockSelection]:
    check_qkv(q, k, v)
    fn = get_backend(backend)
    if selection is None:
        selection = scorer(q, k)
    elif selection.mask.shape[:2] != q.shape[:2] or (selection.q_len, selection.kv_len) != (
        q.shape[2],
        k.shape[2],
    ):
        raise ValueError("the given selection does not match q/k shapes")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = fn(q, k, v, selection.block_mask(), scale=scale)
    return out, selection


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scorer: str | Scorer = "prism",
    backend: str = "flex",
    scale: float | None = None,
    selection: BlockSelection | None = None,
    return_selection: bool = False,
    **params: Any,
):
    """Block-sparse causal attention.

    q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] with Sk >= Sq (a cached prefix of Sk - Sq tokens) and
    Hq a multiple of Hkv. Returns out [B, Hq, Sq, D] (and the BlockSelection if asked).
    ``params`` go to the scorer (``threshold``, ``block_size``, ...); ``scale`` defaults to D**-0.5.
    """
    s = build_scorer(scorer, **params)
    out, sel = _run(s, backend, q, k, v, scale, selection)
    return (out, sel) if return_selection else out


class SparseAttention(nn.Module):
    """Drop-in block-sparse attention: ``SparseAttention(scorer="prism", backend="flex",
    threshold=0.95)(q, k, v)``. ``last_selection`` keeps the most recent selection."""

    def __init__(self, scorer: str | Scorer = "prism", backend: str = "flex", **params: Any):
        super().__init__()
        self.scorer = build_scorer(scorer, **params)
        get_backend(backend)  # fail early on a typo
        self.backend = backend
        self.last_selection: BlockSelection | None = None

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float | None = None,
        selection: BlockSelection | None = None,
    ) -> torch.Tensor:
        out, self.last_selection = _run(self.scorer, self.backend, q, k, v, scale, selection)
        return out

    def extra_repr(self) -> str:
        return f"scorer={self.scorer!r}, backend={self.backend!r}"
