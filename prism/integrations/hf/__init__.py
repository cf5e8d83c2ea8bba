"""Hugging Face transformers integration: Prism as an attention implementation.

Importing this package registers ``"prism"`` in ``transformers.AttentionInterface`` (the attention
function) and in ``AttentionMaskInterface`` (the mask builder), so both work::

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="prism")
    prism.patch_model(model, scorer="prism", threshold=0.95)      # or config="configs/hf/x.yaml"

What runs where (per attention call; q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] as the model passes
them: after q/k norms and RoPE, K/V not expanded for GQA, Sk - Sq = the cached prefix P):

* pre-fill (``Sq >= min_query_len``, ``Sk >= min_len``): the layer's scorer picks the blocks,
  the backend computes attention over them (``Sk > Sq``: chunked pre-fill, same geometry with the
  offset P);
* decode (``Sq == 1``), short inputs, dense layers, non-causal modules: dense SDPA, exactly as
  ``attn_implementation="sdpa"``;
* explicit masks. A padded batch (eager): every row runs sparse on its own unpadded span, as if
  alone. Masks made of one causal key span per query row -- packed sequences, binding sliding
  windows, padding under ``torch.compile`` -- run sparse with the span applied token by token in
  the kernel (backends that honour the BlockMask's ``mask_mod``: the flex ones). Anything else
  (static caches, other masks, other backends) runs exact dense SDPA with the model's mask, with a
  one-time warning.
* ``torch.compile(model, fullgraph=True)``: one graph, no breaks. Without a KV cache,
  transformers cannot rule out packed sequences while tracing and passes an explicit mask; the
  span path above keeps that sparse and exact (a mask that is not one span per row stops with
  an error rather than running wrong).

The policy lives on the patched modules (``module._prism_policy``); a model loaded with
``attn_implementation="prism"`` and never patched uses the process-wide default policy
(:func:`~prism.policy.set_default_policy`).

Modules: :mod:`.attention` (the attention function and its routing), :mod:`.masks` (the mask
builder and reading explicit masks), :mod:`.patch` (registration, ``patch_model``). The policy and
the statistics are framework-neutral: :mod:`prism.policy`, :mod:`prism.stats` (re-exported here).
"""

from __future__ import annotations

try:  # transformers is an optional dependency (pip install "prism-sparse[hf]")
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "prism.integrations.hf needs transformers: pip install 'prism-sparse[hf]' "
        "(or pip install transformers accelerate)"
    ) from exc

from ...policy import (
    PADDING_MODES,
    POLICY_KEYS,
    PrismPolicy,
    as_policy,
    default_policy,
    set_default_policy,
)
from ...stats import LayerStats, PrismStats, collect_stats
from .attention import AttentionCall, prism_attention_forward, reset_warnings
from .masks import prism_mask
from .patch import (
    ATTN_NAME,
    compile_regions,
    decoder_layers,
    get_policy,
    patch_model,
    patched,
    register,
    unpatch_model,
)

register()

__all__ = [
    "ATTN_NAME",
    "AttentionCall",
    "LayerStats",
    "PADDING_MODES",
    "POLICY_KEYS",
    "PrismPolicy",
    "PrismStats",
    "as_policy",
    "collect_stats",
    "compile_regions",
    "decoder_layers",
    "default_policy",
    "get_policy",
    "patch_model",
    "patched",
    "prism_attention_forward",
    "prism_mask",
    "register",
    "reset_warnings",
    "set_default_policy",
    "unpatch_model",
]
