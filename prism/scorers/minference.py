"""MInference vertical-slash scorer (Jiang et al., arXiv 2407.02490; DESIGN.md §5).

Probe: the last ``probe`` (64) queries against all keys, causal, float32 row softmax. From the
probe's probabilities ``p[r, c]`` (probe query r at absolute position ``a_r = Sk − n + r``):

* vertical ``v[c] = Σ_r p[r, c]``: keep the top ``vertical`` (512) columns, the first
  ``forced_vertical`` (30) always among them;
* slash ``s[o] = Σ_r p[r, a_r − o]`` for offsets ``o = 0 … Sk − 1`` (o = 0 is the main diagonal):
  keep the top ``slash`` (2048) diagonals, the ``forced_slash`` (100) nearest always among them.

In a block framework the selected columns and diagonals become the blocks they touch: block (i, j)
is kept iff some query a of query block i and key c <= a of KV block j has c a selected column or
``a − c`` a selected offset. Then the sink and diagonal blocks are forced as configured.

``threshold`` is not part of MInference's rule (its budget is the ``vertical`` / ``slash`` counts)
and is accepted only for the common scorer interface; the one exception is the universal contract
of DESIGN.md §3: ``threshold=1.0`` selects every causal block (dense).

The probe and the line-to-block mapping (:func:`probe_profiles`, :func:`top_lines`,
:func:`lines_to_blocks`, shared with FlexPrefill) live in :mod:`prism.scorers._vertical_slash` and
are re-exported here. The probe is chunked over keys (``chunk_size`` keys at a time, two passes),
so memory is ``O(B · Hq · probe · chunk_size)``; GQA never repeats K.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..masks import BlockSelection, block_causal
from ._validate import check_int
from ._vertical_slash import lines_to_blocks, probe_profiles, top_lines
from .base import Scorer, ScorerConfig, register_scorer

__all__ = [
    "MInferenceConfig",
    "MInferenceScorer",
    "lines_to_blocks",
    "probe_profiles",
    "top_lines",
]


@dataclass
class MInferenceConfig(ScorerConfig):
    """MInference vertical-slash knobs (the published comparison setting).

    vertical: columns kept (512).  slash: diagonals kept (2048).
    forced_vertical: the first columns always kept (30).  forced_slash: the nearest diagonals
        always kept (100); each must not exceed its count.
    probe: number of last queries probed (64).
    chunk_size: keys per probe step (memory ``B·Hq·probe·chunk_size`` floats).
    threshold: accepted for the common interface but unused, except ``1.0`` = every causal block.
    """

    vertical: int = 512
    slash: int = 2048
    forced_vertical: int = 30
    forced_slash: int = 100
    probe: int = 64
    chunk_size: int = 8192

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, minimum in (
            ("vertical", 0),
            ("slash", 0),
            ("forced_vertical", 0),
            ("forced_slash", 0),
            ("probe", 1),
            ("chunk_size", 1),
        ):
            check_int(name, getattr(self, name), minimum)
        if self.forced_vertical > self.vertical:
            raise ValueError(
                f"forced_vertical ({self.forced_vertical}) must be <= vertical ({self.vertical})"
            )
        if self.forced_slash > self.slash:
            raise ValueError(f"forced_slash ({self.forced_slash}) must be <= slash ({self.slash})")


@register_scorer("minference")
class MInferenceScorer(Scorer):
    """MInference vertical-slash pattern mapped to blocks; see the module docstring."""

    Config = MInferenceConfig

    def lines(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Selected columns and diagonal offsets, bool [B, Hq, Sk] each."""
        c = self.config
        n = min(c.probe, q.shape[2])
        vertical, slash = probe_profiles(q, k, n, c.chunk_size)
        return (
            top_lines(vertical, c.vertical, c.forced_vertical),
            top_lines(slash, c.slash, c.forced_slash),
        )

    def select(self, q: torch.Tensor, k: torch.Tensor) -> BlockSelection:
        c = self.config
        b, hq, sq, _ = q.shape
        sk = k.shape[2]
        if c.threshold >= 1.0:
            visible, _ = block_causal(sq, sk, c.block_size, q.device)
            return self.finalize(visible.expand(b, hq, *visible.shape), sq, sk)
        columns, offsets = self.lines(q, k)
        return self.finalize(lines_to_blocks(columns, offsets, sq, sk, c.block_size), sq, sk)
