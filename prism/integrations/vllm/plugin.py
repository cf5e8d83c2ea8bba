"""Registration with vLLM: the ``vllm.general_plugins`` entry point calls :func:`register`.

vLLM loads general plugins in every process it starts (front end, engine core, workers), before
it parses the attention backend. :func:`register` then

1. points vLLM's ``AttentionBackendEnum.CUSTOM`` placeholder at Prism's backend class
   (``--attention-backend CUSTOM``), unless another plugin registered it first;
2. on the CPU platform, whose backend selector always answers ``CPU_ATTN``, wraps
   ``CpuPlatform.get_attn_backend_cls`` so that a request for ``CUSTOM`` pointing at Prism is
   honoured for causal decoder layers; every other request goes to vLLM's selector unchanged.

Why ``CUSTOM`` and not a new member such as ``PRISM`` (``register_backend("PRISM", ...)``): the
front end pickles the engine config, backend enum included, to the engine-core process it spawns,
and that process unpickles it before it loads any plugin, so a member added at run time does not
exist there yet (``ValueError: ... is not a valid AttentionBackendEnum``). ``CUSTOM`` is a
built-in member and crosses the process boundary.

It can run any number of times in a process (vLLM's own warning for plugins); nothing is
registered twice.
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger("prism")

#: the backend class vLLM imports
BACKEND_PATH = "prism.integrations.vllm.backend.PrismAttentionBackend"

__all__ = ["BACKEND_PATH", "register"]


def _is_prism(selected) -> bool:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return selected is AttentionBackendEnum.CUSTOM and _custom_path() == BACKEND_PATH


def _custom_path() -> str | None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    try:
        return AttentionBackendEnum.CUSTOM.get_path()
    except ValueError:  # CUSTOM not registered by anyone
        return None


def _patch_cpu_platform() -> None:
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.get_attn_backend_cls
    if getattr(original, "_prism_wrapped", False):
        return
    original_fn = original.__func__

    @functools.wraps(original_fn)
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        cfg = attn_selector_config
        if _is_prism(selected_backend) and not (cfg.use_mla or cfg.use_sparse):
            from vllm.v1.attention.backend import AttentionType

            if cfg.attn_type == AttentionType.DECODER:
                logger.info("Prism: using the Prism sparse pre-fill attention backend")
                return BACKEND_PATH
            logger.info("Prism: %s attention runs vLLM's CPU backend", cfg.attn_type)
        return original_fn(cls, selected_backend, attn_selector_config, num_heads)

    get_attn_backend_cls._prism_wrapped = True
    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def register() -> None:
    """The ``vllm.general_plugins`` entry point (see the module docstring)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    taken = _custom_path()
    if taken not in (None, BACKEND_PATH):
        logger.warning(
            "Prism: vLLM's CUSTOM attention backend is already registered to %s; "
            "Prism's backend is not registered", taken,
        )  # fmt: skip
        return
    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    _patch_cpu_platform()
