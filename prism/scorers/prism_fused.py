"""Deprecated names of the fused Prism path, kept so that old configs and code keep working.

* scorer ``prism_fused``: an alias of ``prism`` with ``impl="triton"`` (the fused Triton estimator,
  also on CPU tensors under ``TRITON_INTERPRET=1``; an error where it cannot run). Use
  ``build_scorer("prism", impl="triton")`` — or the default ``impl="auto"``, which takes the fused
  kernel on CUDA anyway.
* ``ListBlockSelection(lists, q_len, kv_len, block_size)``: a list-stored selection; use
  ``prism.masks.BlockSelection.from_lists``.

This module does not import Triton at import time (``import prism`` imports every scorer).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from ..masks.selection import BlockLists, BlockSelection
from .base import make_config, register_scorer
from .prism import PrismConfig, PrismScorer

__all__ = ["ListBlockSelection", "PrismFusedScorer", "fused_selection"]


class ListBlockSelection(BlockSelection):
    """Deprecated: a :class:`BlockSelection` stored as block lists, i.e.
    ``BlockSelection.from_lists(lists, q_len, kv_len, block_size, info)``."""

    def __init__(
        self,
        lists: BlockLists,
        q_len: int,
        kv_len: int,
        block_size: int,
        info: dict | None = None,
    ) -> None:
        self._init_lists(lists, q_len, kv_len, block_size, info)


@register_scorer("prism_fused")
class PrismFusedScorer(PrismScorer):
    """Deprecated alias of ``prism`` with ``impl="triton"`` (same :class:`PrismConfig`).

    ``impl`` defaults to ``"triton"`` here (an ``"auto"`` config is taken as ``"triton"``); an
    explicit ``impl`` (or the deprecated ``fused=False``) is honoured."""

    alias_of = "prism"

    def __init__(self, config: PrismConfig | None = None, **params: Any) -> None:
        warnings.warn(
            "scorer 'prism_fused' is deprecated: use 'prism' with impl='triton' (or the default "
            "impl='auto', which runs the fused kernel on CUDA)",
            DeprecationWarning,
            stacklevel=2,
        )
        if config is None and "fused" not in params:
            params.setdefault("impl", "triton")
        if config is None:
            config = make_config(PrismConfig, params, "prism_fused")
        elif params:
            raise ValueError("pass either a config object or keyword parameters, not both")
        if isinstance(config, PrismConfig) and config.impl == "auto":
            config = dataclasses.replace(config, impl="triton")
        super().__init__(config)


def fused_selection(scorer: PrismScorer, q: torch.Tensor, k: torch.Tensor) -> BlockSelection | None:
    """Deprecated: the fused kernel's selection for ``scorer.config``, or None where it does not
    apply (Triton missing, inputs not on CUDA, unsupported inputs). Use ``PrismScorer`` with
    ``impl="auto"`` / ``"triton"``."""
    from ..kernels.estimation import op

    if not op.triton_available() or not op.supports(q, k, scorer.kernel_params(q.shape[-1])):
        return None
    if not q.is_cuda and not (q.device.type == "cpu" and op.interpreter_on()):
        return None
    return scorer.select_triton(q, k)
