"""Policy combinators and simple structural policies.

* ``union`` / ``intersection`` of child policies, e.g. "prism at 0.9 OR a local window of 2":
  ``build_scorer("union", policies=[{"scorer": "prism", "threshold": 0.9},
  {"scorer": "window", "window": 2}])``.
* ``window``: the sink plus the ``window`` visible blocks nearest the diagonal.
* ``dense``: every causal block (the dense baseline through the same kernels).

All of them honour the universal contract (DESIGN.md §3): ``threshold=1.0`` selects every causal
block. ``window`` has no other use for ``threshold``; a combinator's own ``threshold`` is not passed
to its children (they have their own), so ``threshold=1.0`` on the combinator means "dense"
without running them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..masks import BlockSelection, block_causal, local_window
from .base import Scorer, ScorerConfig, build_scorer, register_scorer


@dataclass
class WindowConfig(ScorerConfig):
    """window: number of KV blocks kept at the causal frontier of each row (>= 1)."""

    window: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.window) < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")


def _every_causal_block(scorer: Scorer, q: torch.Tensor, k: torch.Tensor) -> BlockSelection:
    """The dense selection: every visible block, bool [B, Hq, NQB, NKB]."""
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    visible, _ = block_causal(sq, sk, scorer.block_size, q.device)
    return scorer.finalize(visible.expand(b, hq, *visible.shape), sq, sk)


@register_scorer("window")
class WindowScorer(Scorer):
    """The sink plus the ``window`` visible blocks nearest the causal frontier of each row
    (``threshold=1.0``: every causal block)."""

    Config = WindowConfig

    def select(self, q: torch.Tensor, k: torch.Tensor) -> BlockSelection:
        if self.config.threshold >= 1.0:
            return _every_causal_block(self, q, k)
        b, hq, sq, _ = q.shape
        sk = k.shape[2]
        win = local_window(sq, sk, self.block_size, self.config.window, q.device)
        return self.finalize(win.expand(b, hq, *win.shape), sq, sk)


@register_scorer("dense")
class DenseScorer(Scorer):
    """Selects every causal block (``threshold`` is ignored)."""

    def select(self, q: torch.Tensor, k: torch.Tensor) -> BlockSelection:
        return _every_causal_block(self, q, k)


@dataclass
class CombineConfig(ScorerConfig):
    """policies: list of child scorer configs (mappings with a ``scorer`` key) or built scorers.
    Children inherit this config's ``block_size`` unless they set their own (which must then be
    equal); they do not inherit ``threshold`` (``threshold=1.0`` here: every causal block)."""

    policies: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.policies) < 1:
            raise ValueError("a combinator needs at least one policy in 'policies'")


class _Combine(Scorer):
    Config = CombineConfig

    def __init__(self, config: CombineConfig | None = None, **params: Any) -> None:
        super().__init__(config, **params)
        self.children: list[Scorer] = []
        for child in self.config.policies:
            if isinstance(child, Scorer):
                scorer = child
            else:
                child = dict(child)
                child.setdefault("block_size", self.block_size)
                scorer = build_scorer(child)
            if scorer.block_size != self.block_size:
                raise ValueError(
                    f"child policy block_size {scorer.block_size} != combinator block_size {self.block_size}"
                )
            self.children.append(scorer)

    def combine(self, a: BlockSelection, b: BlockSelection) -> BlockSelection:  # pragma: no cover
        raise NotImplementedError

    def select(self, q: torch.Tensor, k: torch.Tensor) -> BlockSelection:
        if self.config.threshold >= 1.0:
            return _every_causal_block(self, q, k)
        out = None
        for child in self.children:
            sel = child(q, k)
            out = sel if out is None else self.combine(out, sel)
        return self.finalize(out.mask, out.q_len, out.kv_len)


@register_scorer("union")
class UnionScorer(_Combine):
    def combine(self, a: BlockSelection, b: BlockSelection) -> BlockSelection:
        return a | b


@register_scorer("intersection")
class IntersectionScorer(_Combine):
    def combine(self, a: BlockSelection, b: BlockSelection) -> BlockSelection:
        return a & b
