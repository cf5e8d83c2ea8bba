"""Old import path of the block-sparse test oracle and mask builders (kept as re-exports).

* :func:`naive_block_sparse_attention` is :func:`prism.kernels.reference.reference_attention`
  with its output in ``compute_dtype`` (float32 by default); its semantics are documented there.
* :func:`dense_block_maps` is :func:`prism.kernels.reference.dense_block_maps`.
* The mask builders (``causal_block_maps``, ``block_mask_from_maps``,
  ``random_causal_block_mask``) live in :mod:`prism.testing`.
"""

from __future__ import annotations

import torch

from ...testing import block_mask_from_maps, causal_block_maps, random_causal_block_mask
from ..reference import dense_block_maps, reference_attention

__all__ = [
    "dense_block_maps",
    "naive_block_sparse_attention",
    "causal_block_maps",
    "block_mask_from_maps",
    "random_causal_block_mask",
]


def naive_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask,
    scale: float | None = None,
    return_lse: bool = False,
    compute_dtype: torch.dtype = torch.float32,
):
    """The oracle (:func:`~prism.kernels.reference.reference_attention`) with ``out`` (and
    ``lse`` [B, Hq, Sq]) in ``compute_dtype``; inputs as for ``block_sparse_attention``."""
    return reference_attention(
        q,
        k,
        v,
        block_mask,
        scale,
        return_lse=return_lse,
        compute_dtype=compute_dtype,
        out_dtype=compute_dtype,
    )
