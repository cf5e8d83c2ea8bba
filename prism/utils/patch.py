"""Compatibility with the published Prism repository's usage::

    from prism import prism_attention_forward
    from prism.utils.patch import apply_patch

    apply_patch(forward_fn=prism_attention_forward, model_id="Qwen/Qwen3-8B")
    model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-8B")   # runs Prism attention

``apply_patch`` registers the forward function with transformers and makes every model of that
*family* (here Qwen3) default to it when loaded without an explicit ``attn_implementation``
(asking for ``attn_implementation="sdpa"`` still gets SDPA). Nothing is downloaded: ``model_id`` only
picks the family -- from a local directory's ``config.json``, a config class or instance, a model
type (``"qwen3"``), the local Hugging Face cache, or else the name itself (``"Qwen/Qwen3-8B"`` ->
``qwen3``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any

__all__ = ["apply_patch", "patched_families", "remove_patch", "resolve_model_type"]

#: model_type -> (family base class, attention implementation name)
_PATCHED: dict[str, tuple[type, str]] = {}


def _known_model_types() -> list[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return list(CONFIG_MAPPING_NAMES)


def _type_from_name(name: str) -> str | None:
    """Longest known model_type that starts a word of the (normalised) repository name."""
    base = name.rstrip("/").split("/")[-1].lower()
    norm = re.sub(r"[^a-z0-9]+", "_", base)
    forms = (norm, re.sub(r"_(?=\d)", "", norm))  # "gemma-2-9b" is gemma2, "phi-3" is phi3
    best = None
    for mt in _known_model_types():
        hit = any(re.search(rf"(?:^|_){re.escape(mt)}", f) for f in forms)
        if hit and (best is None or len(mt) > len(best)):
            best = mt
    return best


def resolve_model_type(model_id: Any) -> str:
    """The transformers ``model_type`` for ``model_id`` (see the module docstring), offline."""
    from transformers import PretrainedConfig, PreTrainedModel

    if isinstance(model_id, PretrainedConfig):
        return model_id.model_type
    if isinstance(model_id, type):
        if issubclass(model_id, PretrainedConfig):
            return model_id.model_type
        if issubclass(model_id, PreTrainedModel):
            return model_id.config_class.model_type
    if not isinstance(model_id, (str, os.PathLike)):
        raise TypeError(
            f"model_id must be a path, a hub id, a model type or a config, got {type(model_id)}"
        )
    model_id = os.fspath(model_id)
    cfg_file = os.path.join(model_id, "config.json")
    if os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            mt = json.load(f).get("model_type")
        if mt:
            return mt
    if model_id in _known_model_types():
        return model_id
    try:  # a hub id already in the local cache
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model_id, local_files_only=True).model_type
    except Exception:
        pass
    mt = _type_from_name(model_id)
    if mt is None:
        raise ValueError(
            f"cannot tell the model family of {model_id!r} offline: pass a local model directory, "
            "a config class (e.g. transformers.LlamaConfig) or a model type (e.g. 'llama')"
        )
    return mt


def _family_base(model_type: str) -> type:
    """The family's ``XxxPreTrainedModel`` class (every model class of the family derives from it)."""
    import transformers
    from transformers import PreTrainedModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    names = MODEL_MAPPING_NAMES.get(model_type)
    if names is None:
        raise ValueError(f"transformers has no model class for model type {model_type!r}")
    name = names[0] if isinstance(names, (tuple, list)) else names
    cls = getattr(transformers, name)
    for klass in cls.__mro__:
        if PreTrainedModel in klass.__bases__:
            return klass
    return cls


def apply_patch(
    forward_fn: Callable | None = None,
    model_id: Any = None,
    *,
    attn_name: str | None = None,
    **policy: Any,
) -> str:
    """Register ``forward_fn`` (default :func:`prism.prism_attention_forward`) as a transformers
    attention implementation and make the family of ``model_id`` load with it by default.

    ``policy`` keywords (``scorer``, ``threshold``, ``backend``, ``config``, ``dense_layers``...)
    set the default Prism policy those models use (see :func:`prism.patch_model`). Returns the
    family's model type. :func:`remove_patch` undoes it.
    """
    from ..integrations.hf import ATTN_NAME, prism_attention_forward, register
    from ..policy import set_default_policy

    if model_id is None:
        raise ValueError("apply_patch needs model_id (a hub id, local path, model type or config)")
    fn = prism_attention_forward if forward_fn is None else forward_fn
    if attn_name is None:
        attn_name = (
            ATTN_NAME
            if fn is prism_attention_forward
            else f"prism_{getattr(fn, '__name__', 'custom')}"
        )
    register(attn_name, fn)
    if policy:
        set_default_policy(**policy)
    model_type = resolve_model_type(model_id)
    base = _family_base(model_type)
    if model_type in _PATCHED:
        remove_patch(model_type)
    original = base.__dict__.get("get_correct_attn_implementation")

    def get_correct_attn_implementation(self, requested_attention, is_init_check=False):
        if requested_attention is None:
            requested_attention = attn_name
        if original is not None:
            return original(self, requested_attention, is_init_check)
        return super(base, self).get_correct_attn_implementation(requested_attention, is_init_check)

    get_correct_attn_implementation._prism_original = original
    base.get_correct_attn_implementation = get_correct_attn_implementation
    _PATCHED[model_type] = (base, attn_name)
    return model_type


def remove_patch(model_id: Any = None) -> None:
    """Undo :func:`apply_patch` for one family (or for all of them when ``model_id`` is None)."""
    types = list(_PATCHED) if model_id is None else [resolve_model_type(model_id)]
    for mt in types:
        entry = _PATCHED.pop(mt, None)
        if entry is None:
            continue
        base, _ = entry
        original = base.__dict__["get_correct_attn_implementation"]._prism_original
        if original is None:
            del base.get_correct_attn_implementation
        else:
            base.get_correct_attn_implementation = original


def patched_families() -> dict[str, str]:
    """{model_type: attention implementation name} of the families patched by ``apply_patch``."""
    return {mt: name for mt, (_, name) in _PATCHED.items()}
