"""Plugging Prism into transformers models: registration and (un)patching.

:func:`register` puts :func:`~.attention.prism_attention_forward` and :func:`~.masks.prism_mask`
into transformers' attention and mask interfaces; :func:`patch_model` switches a model to them and
attaches a :class:`~prism.policy.PrismPolicy` to it and to every module the attention interface
receives (``module._prism_policy``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ...policy import PrismPolicy, as_policy
from ...scorers import Scorer
from .attention import prism_attention_forward
from .masks import prism_mask

ATTN_NAME = "prism"


def register(name: str = ATTN_NAME, fn=None) -> str:
    """Register ``fn`` (default :func:`prism_attention_forward`) and :func:`prism_mask` under
    ``name`` in transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(name, prism_attention_forward if fn is None else fn)
    AttentionMaskInterface.register(name, prism_mask)
    return name


def _policy_targets(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The modules the attention interface receives as ``module``: attention modules (by class
    name) and anything carrying a ``layer_idx``."""
    for mod in model.modules():
        if hasattr(mod, "layer_idx") or "attention" in type(mod).__name__.lower():
            yield mod


def get_policy(model: torch.nn.Module) -> PrismPolicy | None:
    """The policy ``patch_model`` attached to ``model`` (None if not patched)."""
    return getattr(model, "_prism_policy", None)


def patch_model(
    model: torch.nn.Module,
    scorer: str | Mapping[str, Any] | Scorer | None = None,
    backend: str | None = None,
    *,
    config: str | Path | Mapping[str, Any] | None = None,
    policy: PrismPolicy | None = None,
    **params: Any,
) -> torch.nn.Module:
    """Make a transformers model run Prism attention; returns the model (patched in place).

    ``prism.patch_model(model, scorer="prism", threshold=0.95)``, or from a YAML policy:
    ``prism.patch_model(model, config="configs/hf/smollm2.yaml")`` (keyword arguments override
    the file). Policy keywords: ``backend``, ``min_len``, ``min_query_len``, ``dense_layers``,
    ``layers``, ``padding`` (see :class:`PrismPolicy`); the rest go to the scorer. Calling it again
    replaces the policy; :func:`unpatch_model` undoes it.
    """
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        raise TypeError(
            f"patch_model expects a transformers PreTrainedModel, got {type(model).__name__}"
        )
    pol = as_policy(policy, config, scorer, backend, params)
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if pol.max_layer is not None and isinstance(n_layers, int) and pol.max_layer >= n_layers:
        warnings.warn(
            f"Prism policy names layer {pol.max_layer} but the model has {n_layers} layers; "
            "the extra per-layer settings are unused",
            stacklevel=2,
        )
    register()
    if get_policy(model) is None:
        model._prism_previous_attn = model.config._attn_implementation
    if model.config._attn_implementation != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)
        if model.config._attn_implementation != ATTN_NAME:
            raise RuntimeError(
                f"{type(model).__name__} does not route attention through transformers' "
                "AttentionInterface, so Prism cannot be plugged in"
            )
    for mod in _policy_targets(model):
        mod._prism_policy = pol
    model._prism_policy = pol
    return model


def unpatch_model(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch_model`: restore the previous attention implementation (``sdpa`` if the
    model was loaded with ``attn_implementation="prism"``)."""
    if get_policy(model) is None and model.config._attn_implementation != ATTN_NAME:
        return model
    previous = getattr(model, "_prism_previous_attn", None)
    if previous in (None, ATTN_NAME):
        previous = "sdpa"
    model.set_attn_implementation(previous)
    for mod in _policy_targets(model):
        if "_prism_policy" in mod.__dict__:
            del mod.__dict__["_prism_policy"]
    for attr in ("_prism_policy", "_prism_previous_attn"):
        model.__dict__.pop(attr, None)
    return model


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's decoder layers: the first ``ModuleList`` whose entries have ``self_attn``."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) and hasattr(mod[0], "self_attn"):
            return mod
    raise TypeError(f"{type(model).__name__}: no decoder layers (ModuleList of self_attn) found")


def compile_regions(model: torch.nn.Module, *, dynamic: bool = True, **compile_kwargs: Any):
    """Regional compilation: ``torch.compile`` every decoder layer in place, the attention call
    itself left outside the graphs (returns the model).

    Each layer compiles into two graphs — norm, Q/K/V projections and RoPE before the attention
    call; output projection, residuals, norm and MLP after it — which fuse the elementwise work
    that dominates a long pre-fill's non-attention time (the norms' fp32 round trips, RoPE, SiLU).
    The Prism attention call between them runs eagerly (``torch.compiler.disable``), so it keeps
    everything a compiled graph cannot: the fused Triton estimators, per-layer statistics, the
    sparse/dense choice per call. One compile serves every layer (the layers share their code;
    parameters are graph inputs) and, with ``dynamic=True`` (default), every sequence length.
    Works with or without :func:`patch_model` (dense attention is compiled into the graphs then),
    before or after it. ``compile_kwargs`` go to ``torch.compile`` (e.g. ``mode``).
    """
    for layer in decoder_layers(model):
        layer.self_attn._prism_eager_region = True
        layer.compile(dynamic=dynamic, **compile_kwargs)
    return model


@contextlib.contextmanager
def patched(model: torch.nn.Module, scorer: Any = None, backend: str | None = None, **kwargs):
    """``with prism.patched(model, threshold=0.9): model.generate(...)`` -- restores the previous
    state (unpatched, or the previous policy) on exit."""
    before = get_policy(model)
    patch_model(model, scorer, backend, **kwargs)
    try:
        yield model
    finally:
        if before is None:
            unpatch_model(model)
        else:
            patch_model(model, policy=before)
