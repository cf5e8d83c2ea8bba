"""The fused estimators as ``torch.library`` custom ops, for use inside ``torch.compile``.

(They live with the scorers, not in ``prism.kernels``: the ops resolve a scorer's config and
probe layout, which are scorer code; the kernels stay free of scorer imports.)

Dynamo cannot trace the estimators' host code (launch planning, Triton launches), so under
``torch.compile`` the scorers call these opaque ops instead (their output shapes come from the
fake implementations; the real ones are the eager launchers):

* ``torch.ops.prism.prism_select_lists(q, k, config_key)`` —
  :func:`prism.kernels.estimation.op.prism_select_block_lists` with the config of ``config_key``
  (a ``prism`` or ``meanpool`` scorer) resolved for q's head dim (inside the op: the head dim may
  be symbolic while tracing);
* ``torch.ops.prism.probe_select_lists(q, k, params_key)`` —
  :func:`prism.kernels.estimation.probe_op.probe_select_block_lists` over the probe layout of ``params_key``'s ``probes``
  and ``placement`` (``prism.scorers.probe.probe_layout``, built inside the op: eager code);
* ``torch.ops.prism.probe_block_probs(q, k, config_key)`` — the probe scorer's eager
  ``block_probs`` (launch 1 + the pooled-key mixture, ``pooled_mix`` > 0) for the config of
  ``config_key``: float32 ``[B, Hq, NQB, NKB]``; the rule runs in the graph.

The keys are JSON strings (compile-time constants; parsed once and cached): ``config_key`` the
scorer's name and config fields, ``params_key`` ``{"kernel": ProbeKernelParams, "probes": P,
"placement": ...}``. Both return ``(kv_num, kv_idx, full_num, full_idx)``: int32 ``[B, Hq, NQB]`` and
``[B, Hq, NQB, NKB]``. Forward only (no autograd formula).
"""

from __future__ import annotations

import dataclasses
import functools
import json

import torch
from torch import Tensor

from ..kernels.estimation.op import (
    PrismKernelParams,
    prism_select_block_lists,
    triton_available,
)
from ..kernels.estimation.probe_op import ProbeKernelParams, probe_select_block_lists
from ..masks.geometry import grid_shape

__all__ = [
    "auto_takes_fused",
    "config_key",
    "probe_block_probs_op",
    "prism_select_lists_op",
    "probe_params_key",
    "probe_select_lists_op",
]


def auto_takes_fused(q: Tensor) -> bool:
    """Whether a scorer's ``impl="auto"`` takes its fused Triton estimator for ``q`` (where the
    inputs are supported): CUDA tensors with Triton installed — eagerly the launchers, inside
    ``torch.compile`` the opaque ops of this module (checked on the H200 with a fullgraph
    compile of patched Llama and Qwen3 models, ``benchmarks/check_hf_gpu.py``)."""
    return q.is_cuda and triton_available()


def config_key(config, scorer: str) -> str:
    """The JSON key of a config of a scorer the fused Prism estimator runs (``prism``:
    :class:`prism.scorers.prism.PrismConfig`, ``meanpool``: its config): the scorer's name and
    the config's fields. ``scorer`` is required: the op rebuilds the scorer by that name, so a
    config keyed under the wrong name would run the wrong estimator."""
    return json.dumps({"scorer": scorer, **dataclasses.asdict(config)}, sort_keys=True)


def probe_params_key(params: ProbeKernelParams, probes: int, placement: str) -> str:
    """The JSON key of the probe op: kernel parameters plus the probe layout's knobs."""
    doc = {"kernel": dataclasses.asdict(params), "probes": int(probes), "placement": placement}
    return json.dumps(doc, sort_keys=True)


@functools.lru_cache(maxsize=256)
def _fused_scorer(key: str):
    from .base import build_scorer  # the scorer modules import this one

    return build_scorer(json.loads(key))


def _prism_params(key: str, d: int) -> PrismKernelParams:
    return _fused_scorer(key).kernel_params(int(d))


@functools.lru_cache(maxsize=256)
def _probe_params(key: str) -> tuple[ProbeKernelParams, int, str]:
    doc = json.loads(key)
    return ProbeKernelParams(**doc["kernel"]), doc["probes"], doc["placement"]


def _fake_lists(q: Tensor, k: Tensor, block_size: int, q_block_size: int = 0):
    b, hq, sq = q.shape[0], q.shape[1], q.shape[2]
    nqb, nkb = grid_shape(sq, k.shape[2], (q_block_size or block_size, block_size))
    num = q.new_empty((b, hq, nqb), dtype=torch.int32)
    idx = q.new_empty((b, hq, nqb, nkb), dtype=torch.int32)
    return num, idx, torch.empty_like(num), torch.empty_like(idx)


@torch.library.custom_op("prism::prism_select_lists", mutates_args=())
def prism_select_lists_op(
    q: Tensor, k: Tensor, config: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fused Prism estimator's block lists (see the module docstring)."""
    return tuple(prism_select_block_lists(q, k, _prism_params(config, q.shape[-1])))


@prism_select_lists_op.register_fake
def _(q, k, config):
    doc = json.loads(config)
    return _fake_lists(q, k, int(doc["block_size"]), int(doc.get("q_block_size", 0)))


@torch.library.custom_op("prism::probe_select_lists", mutates_args=())
def probe_select_lists_op(
    q: Tensor, k: Tensor, params: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fused probe estimator's block lists (see the module docstring)."""
    from .probe import probe_layout, shares_probes  # that module imports this one

    kernel, probes, placement = _probe_params(params)
    rows, weights = probe_layout(q.shape[2], kernel.block_size, probes, placement, q.device)
    shared = shares_probes(placement, probes)
    return tuple(probe_select_block_lists(q, k, rows, weights, kernel, shared))


@probe_select_lists_op.register_fake
def _(q, k, params):
    return _fake_lists(q, k, _probe_params(params)[0].block_size)


@torch.library.custom_op("prism::probe_block_probs", mutates_args=())
def probe_block_probs_op(q: Tensor, k: Tensor, config: str) -> Tensor:
    """The probe scorer's block probabilities, computed eagerly (see the module docstring)."""
    return _fused_scorer(config).block_probs(q, k)


@probe_block_probs_op.register_fake
def _(q, k, config):
    bs = int(json.loads(config)["block_size"])
    nqb = (q.shape[2] + bs - 1) // bs
    nkb = (k.shape[2] + bs - 1) // bs
    return q.new_empty((q.shape[0], q.shape[1], nqb, nkb), dtype=torch.float32)
