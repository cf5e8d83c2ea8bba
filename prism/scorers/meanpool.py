"""Mean-pool scorer: the RoPE-blind baseline Prism fixes (DESIGN.md §4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.estimation.op import PrismKernelParams
from ..masks import BlockSelection, apply_rule, block_causal, block_dims, masked_softmax
from ._fused_pooled import IMPLS, FusedPooledScorer
from ._pooling import gqa_scores, inv_sqrt, pool_blocks
from .base import ProbScorerConfig, register_scorer


@dataclass
class MeanPoolConfig(ProbScorerConfig):
    """``softmax(q̄ · k̄ᵀ / sqrt(D))`` block-causal per query head, then the rule (top-p 0.95).

    impl: ``"auto"`` — the fused Triton estimator (Prism's, with one band spanning every dim and
        no calibration: the same scores) on CUDA tensors where Triton is installed and the head
        dim is even, the PyTorch path otherwise; ``"triton"`` — always the fused kernel (also on
        CPU tensors under ``TRITON_INTERPRET=1``), a clear error where it cannot run;
        ``"torch"`` — always the PyTorch path.
    """

    impl: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.impl not in IMPLS:
            raise ValueError(f"unknown impl {self.impl!r}; valid: {list(IMPLS)}")


@register_scorer("meanpool")
class MeanPoolScorer(FusedPooledScorer):
    Config = MeanPoolConfig

    def block_probs(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """float32 [B, Hq, NQB, NKB] block-causal row probabilities."""
        bq, bk = block_dims(self.block_size)
        visible, _ = block_causal(q.shape[2], k.shape[2], self.block_size, q.device)
        logits = gqa_scores(pool_blocks(q, bq), pool_blocks(k, bk)) * inv_sqrt(q.shape[-1])
        return masked_softmax(logits, visible)

    def kernel_params(self, d: int) -> PrismKernelParams:
        """Mean pooling as the fused Prism estimator runs it: both bands = all ``d`` dims (so the
        kernel scores one band, scale ``1/sqrt(d)``), no calibration, this config's rule."""
        if d % 2:
            raise ValueError(f"the fused mean-pool estimator needs an even head dim, got D={d}")
        c = self.config

        def make() -> PrismKernelParams:
            return PrismKernelParams(
                block_size=c.block_size,
                q_block_size=c.q_block_size or c.block_size,
                high_dims=d,
                low_dims=d,
                threshold_high=c.threshold,
                threshold_low=c.threshold,
                rule=c.rule,
                top_k=int(c.top_k),
                min_prob=c.min_prob,
                calibrate=False,
                force_sink=c.force_sink,
                force_diagonal=c.force_diagonal,
            )

        return self._cached_params(d, make)

    def select_torch(self, q: torch.Tensor, k: torch.Tensor) -> BlockSelection:
        """The plain PyTorch path (the definition the fused kernel is tested against)."""
        c = self.config
        sq, sk = q.shape[2], k.shape[2]
        visible, _ = block_causal(sq, sk, self.block_size, q.device)
        probs = self.block_probs(q, k)
        keep = apply_rule(probs, visible, c.rule, c.threshold, c.top_k, c.min_prob)
        return self.finalize(keep, sq, sk)
