"""Scorer base class, typed configs and the registry.

A scorer maps ``q [B, Hq, Sq, D]`` and ``k [B, Hkv, Sk, D]`` (post-RoPE, Sk >= Sq) to a
:class:`~prism.masks.BlockSelection`. Adding one = a file in this folder with a config dataclass
and a class decorated with :func:`register_scorer`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .._checks import check_qk, check_threshold
from ..masks import (
    RULES,
    BlockSelection,
    apply_rule,
    block_causal,
    check_block_size,
    check_q_block_size,
    grid_block_size,
)

SCORERS: dict[str, type[Scorer]] = {}


@dataclass
class ScorerConfig:
    """Knobs every scorer accepts.

    block_size: BS, the attention block (default 128).
    q_block_size: BSQ, the query rows of a block where they differ from ``block_size`` (0 = the
        same: square blocks). 192 makes FlashAttention-4 on Hopper run its 192 x 128 tile for
        head dims <= 64 (a 128-row block forces its 128 x 128 one); scorers that support it set
        ``rect_blocks`` (``prism``, ``meanpool``), the others reject it.
    threshold: the scorer's coverage target (top-p mass for prism / meanpool), in (0, 1].
        1.0 selects every causal block (output == dense causal attention).
    force_sink: always keep KV block 0.  force_diagonal: always keep the partial (diagonal) blocks.
    """

    block_size: int = 128
    threshold: float = 0.95
    force_sink: bool = True
    force_diagonal: bool = True
    q_block_size: int = 0

    def __post_init__(self) -> None:
        check_block_size(self.block_size)
        check_q_block_size(self.q_block_size)
        check_threshold("threshold", self.threshold)

    def __setattr__(self, name: str, value: Any) -> None:
        # a scorer reads its config when it is built (its kernel parameters, the key of its
        # compiled op): changing it afterwards would leave the two silently different
        if self.__dict__.get("_frozen", False):
            raise AttributeError(
                f"{type(self).__name__} belongs to a built scorer and is read-only; build a new "
                f"scorer, e.g. with dataclasses.replace(config, {name}=...)"
            )
        object.__setattr__(self, name, value)


@dataclass
class ProbScorerConfig(ScorerConfig):
    """Scorers that produce per-row block probabilities choose a rule:

    rule: ``top_p`` (minimal prefix reaching ``threshold``), ``top_k`` (``top_k`` blocks per row)
        or ``min_prob`` (blocks with probability >= ``min_prob``).
    """

    rule: str = "top_p"
    top_k: int = 16
    min_prob: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}; valid rules: {list(RULES)}")
        if int(self.top_k) < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        check_threshold("min_prob", self.min_prob)


def make_config(config_cls: type, params: Mapping[str, Any], owner: str):
    """Instantiate ``config_cls`` from ``params``, rejecting unknown keys with the valid ones."""
    valid = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} for {owner!r}; valid keys: {valid}")
    return config_cls(**dict(params))


class Scorer:
    """Base class. Subclasses set ``name`` / ``Config`` and implement :meth:`select`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[ScorerConfig]] = ScorerConfig
    #: set on a deprecated alias (e.g. ``prism_fused``): the name of the scorer it stands for
    alias_of: ClassVar[str | None] = None
    #: whether the scorer supports ``q_block_size != block_size`` (rectangular blocks)
    rect_blocks: ClassVar[bool] = False

    def __init__(self, config: ScorerConfig | None = None, **params: Any) -> None:
        if config is not None and params:
            raise ValueError("pass either a config object or keyword parameters, not both")
        if config is None:
            config = make_config(self.Config, params, self.name or type(self).__name__)
        elif not isinstance(config, self.Config):
            raise TypeError(f"{self.name} expects a {self.Config.__name__}, got {type(config)}")
        qbs = config.q_block_size
        if qbs not in (0, config.block_size) and not self.rect_blocks:
            valid = sorted(
                n for n, cls in SCORERS.items() if cls.rect_blocks and cls.alias_of is None
            )
            raise ValueError(
                f"scorer {self.name!r} does not support q_block_size={qbs} != block_size="
                f"{config.block_size} (rectangular blocks); scorers that do: {valid}"
            )
        object.__setattr__(config, "_frozen", True)  # see ScorerConfig.__setattr__
        self.config = config

    @property
    def block_size(self) -> int | tuple[int, int]:
        """The block grid: BS, or ``(BSQ, BSK)`` where ``q_block_size`` differs from it."""
        c = self.config
        return grid_block_size(c.q_block_size or c.block_size, c.block_size)

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> BlockSelection:
        check_qk(q, k)
        return self.select(q, k)

    def select(self, q: torch.Tensor, k: torch.Tensor) -> BlockSelection:  # pragma: no cover
        raise NotImplementedError

    def select_by_rule(
        self, q: torch.Tensor, k: torch.Tensor, probs: torch.Tensor | None = None
    ) -> BlockSelection:
        """The standard selection of a scorer with ``block_probs(q, k)`` ([B, Hq, NQB, NKB] row
        probabilities) and a :class:`ProbScorerConfig`: the rule over the causal blocks, then
        the forced blocks. Top-p with ``threshold >= 1`` keeps every causal block without
        computing the probabilities. ``probs``: use these instead of ``block_probs(q, k)`` (a
        study sweeping the rule over estimates computed once)."""
        c = self.config
        sq, sk = q.shape[2], k.shape[2]
        visible, _ = block_causal(sq, sk, self.block_size, q.device)
        if c.rule == "top_p" and c.threshold >= 1.0:
            keep = visible.expand(q.shape[0], q.shape[1], *visible.shape)
            return self.finalize(keep, sq, sk)
        if probs is None:
            probs = self.block_probs(q, k)  # type: ignore[attr-defined]
        keep = apply_rule(probs, visible, c.rule, c.threshold, c.top_k, c.min_prob)
        return self.finalize(keep, sq, sk)

    def finalize(self, keep: torch.Tensor, sq: int, sk: int, **info: Any) -> BlockSelection:
        """Add forced blocks (sink, partial/diagonal), clip to block-causal, wrap up.

        keep: bool [B, Hq, NQB, NKB].
        """
        visible, partial = block_causal(sq, sk, self.block_size, keep.device)
        if self.config.force_diagonal:
            keep = keep | partial
        if self.config.force_sink:
            keep = keep.clone()
            keep[..., 0] = True
        return BlockSelection(keep & visible, sq, sk, self.block_size, info=dict(info))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def register_scorer(name: str):
    """Class decorator registering a :class:`Scorer` subclass under ``name``."""

    def deco(cls: type[Scorer]) -> type[Scorer]:
        if name in SCORERS:
            raise ValueError(f"scorer {name!r} is already registered")
        cls.name = name
        SCORERS[name] = cls
        return cls

    return deco


def available_scorers(aliases: bool = True) -> list[str]:
    """Registered scorer names, sorted; ``aliases=False`` leaves out deprecated aliases
    (scorers with ``alias_of`` set, e.g. ``prism_fused``)."""
    return sorted(n for n, cls in SCORERS.items() if aliases or cls.alias_of is None)


def build_scorer(name: str | Mapping[str, Any] | Scorer, **params: Any) -> Scorer:
    """Build a registered scorer: ``build_scorer("prism", threshold=0.9)``.

    ``name`` may also be a mapping with a ``scorer`` key (e.g. a loaded YAML config) or an already
    built :class:`Scorer` (returned as is when no params are given).
    """
    if isinstance(name, Scorer):
        if params:
            raise ValueError("cannot apply parameters to an already built scorer")
        return name
    if isinstance(name, Mapping):
        merged = dict(name)
        merged.update(params)
        if "scorer" not in merged:
            raise ValueError(
                f"a scorer config needs a 'scorer' key; valid scorers: {available_scorers()}"
            )
        name = merged.pop("scorer")
        params = merged
    if not isinstance(name, str) or name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; valid scorers: {available_scorers()}")
    return SCORERS[name](**params)
