"""FlexPrefill (Lai et al., arXiv 2502.20766; DESIGN.md §5): a per-head choice between a
query-aware block pattern and a vertical-slash pattern.

Probe: the last ``n = min(BS, Sq)`` queries against all keys, causal, float32 row softmax
``p [n, Sk]`` (probe row r at absolute position ``a_r = Sk − n + r``). Per (batch, query head):

1. **Pattern.** ``â = softmax(mean_r(q_probe) · k̄ᵀ / sqrt(D))`` over the NKB pooled key blocks
   (k̄ = zero-padded block means, as in the mean-pool scorer), and ``v̄[j] = Σ_r Σ_{c in block j}
   p[r, c] / n`` (the probe's vertical profile summed into blocks). ``d = sqrt(JSD(â ‖ v̄))``
   (natural log). ``d < tau`` → *query-aware* head, otherwise *vertical-slash*.
2. **Query-aware.** ``softmax(q̄ · k̄ᵀ / sqrt(D))`` block-causal per row, divided by NQB so that the
   whole map sums to 1; keep the minimal descending set of blocks of the **whole map** whose
   mass reaches ``threshold`` (γ): a block is kept iff the mass strictly before it is < γ
   (:func:`prism.masks.select.cover_map`).
3. **Vertical-slash.** Columns ``v[c] = Σ_r p[r, c]`` and diagonals ``s[o] = Σ_r p[r, a_r − o]``
   (o = 0 … Sk − 1): keep the minimal descending set of columns covering γ of their mass, and the
   same for diagonals (:func:`prism.masks.select.cover`), then the blocks they touch (exactly as
   for MInference; the probe and the mapping are :mod:`prism.scorers._vertical_slash`).
4. **Minimum budget** (``min_budget`` tokens, 1024). Where the published method is loose, we
   define: a vertical-slash head keeps at least ``min_budget`` columns and ``min_budget``
   diagonals (the highest); a query-aware head keeps at least ``ceil(min_budget / BS)`` blocks in
   every row (its highest), i.e. every query sees at least ~min_budget keys.
5. Always: the first column block (sink) and the diagonal blocks, through ``force_sink`` /
   ``force_diagonal``.

Both branches are computed for every head and picked with ``torch.where`` (no host sync, no loop
over heads). ``threshold >= 1`` keeps every causal block. The per-head pattern and distance are in
``selection.info["query_aware"]`` (bool [B, Hq]) and ``selection.info["jsd"]`` (float32 [B, Hq]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..masks import BlockSelection, block_causal
from ..masks.select import cover, cover_map, masked_softmax, top_k
from ._pooling import gqa_scores, inv_sqrt, pool_blocks
from ._validate import check_int
from ._vertical_slash import lines_to_blocks, probe_profiles
from .base import Scorer, ScorerConfig, register_scorer


@dataclass
class FlexPrefillConfig(ScorerConfig):
    """FlexPrefill knobs (published defaults).

    threshold: γ, the coverage of both patterns (0.95; 0.9 also published).
    tau: τ, the sqrt-JSD below which a head is query-aware (0.1; 0 makes every head
        vertical-slash).
    min_budget: minimum tokens kept per head / per row (1024; 0 disables it).
    chunk_size: keys per probe step (memory ``B·Hq·BS·chunk_size`` floats).
    """

    threshold: float = 0.95
    tau: float = 0.1
    min_budget: int = 1024
    chunk_size: int = 8192

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)):
            raise TypeError(f"tau must be a number >= 0, got {self.tau!r}")
        if not math.isfinite(self.tau) or self.tau < 0:
            raise ValueError(f"tau must be a finite number >= 0, got {self.tau}")
        check_int("min_budget", self.min_budget, 0)
        check_int("chunk_size", self.chunk_size, 1)


def sqrt_jsd(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sqrt of the Jensen-Shannon divergence (natural log) over the last dim; 0·log 0 = 0."""
    m = (p + q) / 2
    m_safe = m.clamp_min(torch.finfo(m.dtype).tiny)
    jsd = 0.5 * (torch.xlogy(p, p / m_safe) + torch.xlogy(q, q / m_safe)).sum(-1)
    return jsd.clamp_min(0).sqrt()


@register_scorer("flexprefill")
class FlexPrefillScorer(Scorer):
    """FlexPrefill; see the module docstring for the exact definition."""

    Config = FlexPrefillConfig

    def select(self, q: torch.Tensor, k: torch.Tensor) -> BlockSelection:
        c = self.config
        b, hq, sq, d = q.shape
        sk = k.shape[2]
        bs, gamma = c.block_size, c.threshold
        visible, _ = block_causal(sq, sk, bs, q.device)
        nqb, nkb = visible.shape
        if gamma >= 1.0:
            return self.finalize(visible.expand(b, hq, nqb, nkb), sq, sk)

        n = min(bs, sq)
        vertical, slash = probe_profiles(q, k, n, c.chunk_size)  # [B, Hq, Sk] each
        kp = pool_blocks(k, bs)  # [B, Hkv, NKB, D]

        # 1. pattern: pooled probe estimate vs the probe's true vertical profile, in blocks
        q_mean = q[:, :, sq - n :].sum(2, keepdim=True, dtype=torch.float32) / n
        est = (gqa_scores(q_mean, kp) * inv_sqrt(d)).softmax(dim=-1)[:, :, 0]  # [B, Hq, NKB]
        v_blocks = torch.zeros(b, hq, nkb * bs, device=q.device)
        v_blocks[..., :sk] = vertical
        v_blocks = v_blocks.view(b, hq, nkb, bs).sum(-1) / n
        dist = sqrt_jsd(est, v_blocks)  # [B, Hq]
        query_aware = dist < c.tau

        # 2. query-aware: whole-map coverage of the pooled block-causal softmax
        probs = masked_softmax(gqa_scores(pool_blocks(q, bs), kp) * inv_sqrt(d), visible)
        keep_qa = cover_map(probs / nqb, gamma, visible)
        per_row = -(-c.min_budget // bs)
        if per_row:
            keep_qa |= top_k(probs, visible, per_row)
        del probs

        # 3. vertical-slash from the probe
        columns = cover(vertical, gamma)
        offsets = cover(slash, gamma)
        if c.min_budget:
            columns |= top_k(vertical, None, c.min_budget)
            offsets |= top_k(slash, None, c.min_budget)
        keep_vs = lines_to_blocks(columns, offsets, sq, sk, bs)

        keep = torch.where(query_aware[..., None, None], keep_qa, keep_vs)
        return self.finalize(keep, sq, sk, query_aware=query_aware, jsd=dist)
