"""Oracle scorer: the true block attention mass as the estimate — the "block oracle" of issue 11.

For studies, not for speed. ``block_probs`` is the exact causal softmax mass that the queries of
query block i put on the keys of KV block j (:func:`prism.metrics.block_attention_mass`: each
query's full softmax over its causal keys, in float32, summed into blocks), divided by the
block's number of queries so that every row sums to 1: ``[B, Hq, NQB, NKB]``. Then the standard
rule (``top_p`` by default) and the forced sink / diagonal blocks, exactly as every estimating
scorer, so that "recall at equal density against the oracle" measures the estimate and nothing
else. Top-p on this estimate keeps, per query block, the fewest blocks holding ``threshold`` of
its true mass (before the forced blocks).

Cost: one full causal ``QKᵀ`` and softmax (dense attention's FLOPs, in PyTorch). Memory: the
float32 scores of one chunk of query rows, ``[B, Hq, rows, Sk]``, with as many rows (a multiple
of the block size, at least one block) as fit in ``chunk_mb`` MiB — never ``[Sq, Sk]``.

Threshold sweeps score the same tensors many times: the block masses of the last inputs are
kept (at most :data:`CACHE_MB` MiB of them, per block size) and reused while the very same q
and k objects are alive and unmodified (checked by weak reference and version counter).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..masks import BlockSelection
from ..metrics import block_attention_mass
from ._validate import check_int
from .base import ProbScorerConfig, Scorer, register_scorer

CACHE_MB = 512
_CACHE: OrderedDict[tuple, tuple] = OrderedDict()  # key -> (weakref q, weakref k, probs)


def _cached_probs(q: torch.Tensor, k: torch.Tensor, block_size: int, compute) -> torch.Tensor:
    key = (id(q), id(k), q._version, k._version, block_size)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is q and hit[1]() is k:
        _CACHE.move_to_end(key)
        return hit[2]
    probs = compute()
    _CACHE[key] = (weakref.ref(q), weakref.ref(k), probs)
    total = sum(v[2].numel() * 4 for v in _CACHE.values())
    while len(_CACHE) > 1 and total > CACHE_MB << 20:
        _, old = _CACHE.popitem(last=False)
        total -= old[2].numel() * 4
    return probs


@dataclass
class OracleConfig(ProbScorerConfig):
    """Oracle knobs (plus the rule knobs of :class:`ProbScorerConfig`).

    chunk_mb: MiB of float32 scores per step (query rows are processed in chunks of that size).
    """

    chunk_mb: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("chunk_mb", self.chunk_mb, 1)


@register_scorer("oracle")
class OracleScorer(Scorer):
    """The exact block mass, then the standard selection; see the module docstring."""

    Config = OracleConfig

    def block_probs(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """float32 [B, Hq, NQB, NKB]: the true block mass per query, rows summing to 1 (a
        cached tensor for repeated inputs: do not modify it)."""
        c = self.config
        b, hq, sq, _ = q.shape

        def compute() -> torch.Tensor:
            rows = max(c.block_size, (c.chunk_mb << 20) // (b * hq * k.shape[2] * 4))
            mass = block_attention_mass(q, k, c.block_size, chunk=rows)
            return mass / mass.sum(-1, keepdim=True).clamp_min(1e-30)

        return _cached_probs(q, k, c.block_size, compute)

    def select(self, q: torch.Tensor, k: torch.Tensor) -> BlockSelection:
        return self.select_by_rule(q, k)
