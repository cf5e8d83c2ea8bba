"""Tiny random transformers models for the tests (Llama, Qwen2, Qwen3, Mistral; built offline).

Built by ``prism.models.tiny`` (the one place that builds them). Every model shares the
attention shapes (Hq=4, Hkv=2, D=32, hidden 64) so a compiled flex kernel is reused across tests
and families.
"""

from __future__ import annotations

import torch

from prism.models.tiny import TINY_FAMILIES as FAMILIES  # noqa: F401 (re-export)
from prism.models.tiny import TINY_VOCAB as VOCAB
from prism.models.tiny import config_class, tiny_config, tiny_model  # noqa: F401 (re-exports)


def ids_of(n: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    """Random token ids [batch, n] (ids 0-2 left free for padding)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, n), generator=g)


def logits(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def cache_kw(model) -> dict:
    """Keyword arguments that make ``model`` fill a fresh DynamicCache."""
    from prism.models import cache_kwargs

    return cache_kwargs(model)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------
# an independent reference: block-sparse attention from a token-level mask, in float64
# ------------------------------------------------------------------------------------------
class OracleAttention:
    """A transformers attention function that makes the selection with ``scorer`` on the q/k it
    receives, expands it to a token mask (query t in block t // BS, key j in block j // BS), ANDs
    it with the causal rule (cached-prefix offset) and the model's mask, and computes softmax
    attention in float64 (rows with no allowed key give 0). Decode (Sq == 1) runs dense.

    Uses nothing of Prism but the scorer. Per layer it counts selected / causal blocks over every
    batch row and head (``density``) and the mean share of the full causal attention mass inside
    the selection (``recall``).
    """

    name = "prism_test_oracle"

    def __init__(self, scorer):
        self.scorer = scorer
        self.selected: dict[int, int] = {}
        self.causal: dict[int, int] = {}
        self.recalls: dict[int, list[float]] = {}

    def density(self, layer: int) -> float:
        return self.selected[layer] / self.causal[layer]

    def recall(self, layer: int) -> float:
        return sum(self.recalls[layer]) / len(self.recalls[layer])

    def __call__(self, module, q, k, v, attention_mask, dropout=0.0, scaling=None, **kw):
        b, hq, sq, d = q.shape
        hkv, sk = k.shape[1], k.shape[2]
        bs = self.scorer.block_size
        scale = d**-0.5 if scaling is None else scaling
        q_pos = torch.arange(sq) + (sk - sq)
        k_pos = torch.arange(sk)
        causal = q_pos[:, None] >= k_pos[None, :]  # [Sq, Sk]
        allowed = causal if attention_mask is None else causal & attention_mask.bool()
        allowed = allowed.expand(b, 1, sq, sk)
        g = hq // hkv
        kd = k.double().repeat_interleave(g, 1)
        vd = v.double().repeat_interleave(g, 1)
        s = q.double() @ kd.transpose(-1, -2) * scale  # [B, Hq, Sq, Sk]
        if sq > 1:
            sel = self.scorer(q, k).mask  # [B, Hq, NQB, NKB]
            tokens = sel[:, :, torch.arange(sq) // bs][..., k_pos // bs]  # [B, Hq, Sq, Sk]
            nqb, nkb = -(-sq // bs), -(-sk // bs)
            grid = torch.zeros(nqb * bs, nkb * bs, dtype=torch.bool)
            grid[:sq, :sk] = causal
            visible = grid.view(nqb, bs, nkb, bs).any(3).any(1)  # [NQB, NKB]
            layer = module.layer_idx
            self.selected[layer] = self.selected.get(layer, 0) + int((sel & visible).sum())
            self.causal[layer] = self.causal.get(layer, 0) + int(visible.sum()) * b * hq
            full = _softmax_rows(s, allowed)
            self.recalls.setdefault(layer, []).append(float((full * tokens).sum(-1).mean()))
            allowed = allowed & tokens
        out = _softmax_rows(s, allowed) @ vd
        return out.to(q.dtype).transpose(1, 2).contiguous(), None


def _softmax_rows(s: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    return torch.where(allowed.any(-1, keepdim=True), p, torch.zeros_like(p))


def oracle_run(model, scorer, fn):
    """``fn(model)`` with ``model`` switched to :class:`OracleAttention` over ``scorer``; returns
    (result, oracle). The model's attention implementation is restored afterwards."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    oracle = OracleAttention(scorer)
    AttentionInterface.register(oracle.name, oracle)
    AttentionMaskInterface.register(oracle.name, sdpa_mask)
    before = model.config._attn_implementation
    model.set_attn_implementation(oracle.name)
    try:
        return fn(model), oracle
    finally:
        model.set_attn_implementation(before)
