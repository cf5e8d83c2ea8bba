"""Mean-pool scorer: the RoPE-blind baseline Prism fixes (DESIGN.md §4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..masks import BlockSelection, apply_rule, block_causal, masked_softmax
from ._pooling import gqa_scores, inv_sqrt, pool_blocks
from .base import ProbScorerConfig, Scorer, register_scorer


@dataclass
class MeanPoolConfig(ProbScorerConfig):
    """``softmax(q̄ · k̄ᵀ / sqrt(D))`` block-causal per query head, then the rule (top-p 0.95)."""


@register_scorer("meanpool")
class MeanPoolScorer(Scorer):
    Config = MeanPoolConfig

    def block_probs(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """float32 [B, Hq, NQB, NKB] block-causal row probabilities."""
        bs = self.block_size
        visible, _ = block_causal(q.shape[2], k.shape[2], bs, q.device)
        logits = gqa_scores(pool_blocks(q, bs), pool_blocks(k, bs)) * inv_sqrt(q.shape[-1])
        return masked_softmax(logits, visible)

    def select(self, q: torch.Tensor, k: torch.Tensor) -> BlockSelection:
        c = self.config
        sq, sk = q.shape[2], k.shape[2]
        visible, _ = block_causal(sq, sk, c.block_size, q.device)
        probs = self.block_probs(q, k)
        keep = apply_rule(probs, visible, c.rule, c.threshold, c.top_k, c.min_prob)
        return self.finalize(keep, sq, sk)
