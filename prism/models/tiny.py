"""Tiny random Hugging Face decoder models, built offline (tests, the harness, the GPU checks).

    model = tiny_model("qwen3", layers=2)           # Hq=4, Hkv=2, D=32, hidden 64, vocab 512

Every family shares the attention shapes unless told otherwise, so a compiled flex kernel is
reused across models. Keyword overrides are the family config's own keys
(``hidden_size=128``, ``num_attention_heads=8``, ``rope_theta=...``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["TINY_FAMILIES", "TINY_VOCAB", "tiny_config", "tiny_model"]

TINY_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
TINY_VOCAB = 512
_CONFIG_NAMES = {
    "llama": "LlamaConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "mistral": "MistralConfig",
}


def config_class(family: str):
    """The transformers config class of a tiny-model family."""
    import transformers

    if family not in _CONFIG_NAMES:
        raise ValueError(f"unknown tiny model family {family!r}; valid: {list(_CONFIG_NAMES)}")
    return getattr(transformers, _CONFIG_NAMES[family])


def tiny_config(family: str = "llama", layers: int = 2, **overrides: Any):
    """A tiny config of ``family``: 4 query heads, 2 KV heads, head dim 32, hidden 64, vocabulary
    512, 4096 positions; ``overrides`` replace any of these or add other config keys."""
    kw: dict[str, Any] = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
    )
    kw.update(overrides)
    return config_class(family)(**kw)


def tiny_model(
    family: str = "llama",
    seed: int = 0,
    layers: int = 2,
    attn_implementation: str = "sdpa",
    **overrides: Any,
):
    """A randomly initialised ``<family>ForCausalLM`` from :func:`tiny_config` (weights seeded by
    ``seed``; float32, CPU, eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, layers, **overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation).eval()
