"""Fused block-importance estimators (Triton).

The Prism scorer (DESIGN.md §4) fused into two Triton launches that write the selection straight
into FlexAttention BlockMask block lists:

* :mod:`.op` — :class:`PrismKernelParams` (the resolved knobs), :func:`supports`,
  :func:`check_runnable`, the launcher :func:`prism_select_block_lists` (no Triton import until a
  kernel runs);
* :mod:`.pool` — launch 1: block means + calibration statistics;
* :mod:`.select` — launch 2: per-band scores, softmax, threshold-search top-p, union, forced
  blocks, block lists; :class:`SelectConfig` / :func:`pick_select_config` (launch shapes).

Names are resolved lazily (attribute access), so that ``import prism`` never imports Triton:
Triton's interpreter (``TRITON_INTERPRET=1``) must be switched on before Triton's first import.
``prism.kernels.estimation.prism_fused`` is the old module path (a re-export).

The fused *probe* estimator (``prism.scorers.probe``) lives in :mod:`.probe_op` (host side) and
:mod:`.probe_kernels` (its two Triton launches, reusing :mod:`.select`'s rule and list pieces).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MAX_BLOCK_N": "op",
    "PrismKernelParams": "op",
    "block_lists_to_block_mask": "op",
    "block_lists_to_selection": "op",
    "check_runnable": "op",
    "interpreter_on": "op",
    "prism_select_block_lists": "op",
    "supports": "op",
    "triton_available": "op",
    "unsupported_reason": "op",
    "pool_blocks_fused": "pool",
    "ProbeKernelParams": "probe_op",
    "probe_block_log_masses": "probe_op",
    "probe_block_probs_fused": "probe_op",
    "probe_select_block_lists": "probe_op",
    "SelectConfig": "select",
    "pick_select_config": "select",
    "select_from_pooled": "select",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
