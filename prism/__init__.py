"""Prism: training-free block-sparse attention for long-context pre-fill.

scorer = prism.build_scorer("prism", threshold=0.95)
sel = scorer(q, k)                  # BlockSelection: .mask, .density, .block_mask(Sq, Sk)
out = prism.sparse_attention(q, k, v, scorer="prism", backend="flex")
"""

from .attention import SparseAttention, sparse_attention
from .kernels import BACKENDS, get_backend, register_backend
from .masks import BlockSelection
from .scorers import SCORERS, Scorer, ScorerConfig, available_scorers, build_scorer, register_scorer

__version__ = "0.1.0"


def load_config(*args, **kwargs):
    """See :func:`prism.config.load_config` (imported lazily: omegaconf is optional at runtime)."""
    from .config import load_config as _load

    return _load(*args, **kwargs)


__all__ = [
    # policy and statistics; HF integration / embedded model (lazy, transformers is optional)
    "PrismPolicy",
    "PrismStats",
    "collect_stats",
    "compile_regions",
    "CUDAGraphPrefill",
    "load_default_model",
    "patch_model",
    "patched",
    "prism_attention_forward",
    "unpatch_model",
    # core
    "BACKENDS",
    "BlockSelection",
    "SCORERS",
    "Scorer",
    "ScorerConfig",
    "SparseAttention",
    "available_scorers",
    "build_scorer",
    "get_backend",
    "load_config",
    "register_backend",
    "register_scorer",
    "sparse_attention",
]


# Imported on first use: the policy and the statistics (no transformers needed), the Hugging Face
# integration and the embedded model (transformers is optional).
_LAZY_EXPORTS = {
    "PrismPolicy": "prism.policy",
    "PrismStats": "prism.stats",
    "collect_stats": "prism.stats",
    "patch_model": "prism.integrations.hf",
    "compile_regions": "prism.integrations.hf",
    "CUDAGraphPrefill": "prism.graphs",
    "unpatch_model": "prism.integrations.hf",
    "patched": "prism.integrations.hf",
    "prism_attention_forward": "prism.integrations.hf",
    "load_default_model": "prism.models",
}


def __getattr__(name):
    module = _LAZY_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'prism' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
