"""Attention recall vs density on captured post-RoPE Q/K, and the oracle floor.

Definitions (per layer ℓ and query head h, on one text window):

* ``mass[i, j]`` — the exact causal softmax mass that the queries of block i put on the keys of
  block j (:func:`prism.metrics.block_attention_mass`; computed in query chunks, never S×S).
  Every query row sums to 1, so a block row sums to its number of queries.
* **recall** of a selection = Σ selected mass / Σ mass (each query weighs the same).
* **density** = selected blocks / causal (visible) blocks.
* **oracle density** at recall r — the fewest blocks reaching recall r, two floors:

  - ``head`` (the true floor): over the whole (ℓ, h) block map, the smallest number of blocks whose
    mass reaches r · total. Taking blocks in descending mass order is optimal (every block costs
    one unit), so this is exact.
  - ``row`` (the floor for per-row policies such as top-p): every query-block row i must reach
    r · (its own mass) with the fewest blocks of that row; the density is the sum over rows.

  No forced blocks: the oracle keeps only what the mass asks for. For a scorer's point, the
  oracle is evaluated at *that scorer's achieved recall*: per (ℓ, h) for ``head``, per (ℓ, h, i)
  row for ``row``, so ``density / oracle_density`` is the scorer's overhead at equal recall.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..masks import BlockSelection, block_causal
from ..masks.select import minimal_count  # the prefix rule's count; also importable from here
from ..metrics import attention_recall, block_attention_mass


def oracle_selection(mass: torch.Tensor, target: float | torch.Tensor, mode: str = "head"):
    """Bool mask (shape of ``mass`` [..., NQB, NKB]) of the oracle selection reaching ``target``.

    ``target``: a recall in (0, 1], or a tensor of recalls shaped [...] (head mode) or
    [..., NQB] (row mode). Ties are broken by position (stable order).
    """
    if mode not in ("head", "row"):
        raise ValueError(f"unknown oracle mode {mode!r}; valid: ['head', 'row']")
    if mode == "head":
        flat = mass.flatten(-2)
        total = flat.sum(-1)
        tgt = torch.as_tensor(target, dtype=flat.dtype, device=flat.device) * total
        n = minimal_count(flat, tgt.expand_as(total))
        order = flat.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(
            -1, order, torch.arange(flat.shape[-1]).expand_as(order)
        )
        return (rank < n.unsqueeze(-1)).view(mass.shape)
    total = mass.sum(-1)
    tgt = torch.as_tensor(target, dtype=mass.dtype, device=mass.device) * total
    n = minimal_count(mass, tgt.expand_as(total))
    order = mass.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(mass.shape[-1]).expand_as(order)
    )
    return rank < n.unsqueeze(-1)


def oracle_density(
    mass: torch.Tensor, visible: torch.Tensor, target: float | torch.Tensor, mode: str = "head"
) -> torch.Tensor:
    """Oracle density per (B, H): float32 [B, H] (see the module docstring)."""
    n_visible = visible.sum().float()
    if mode == "head":
        flat = mass.flatten(-2)
        total = flat.sum(-1)
        tgt = torch.as_tensor(target, dtype=flat.dtype, device=flat.device) * total
        return minimal_count(flat, tgt.expand_as(total)).float() / n_visible
    if mode == "row":
        total = mass.sum(-1)
        tgt = torch.as_tensor(target, dtype=mass.dtype, device=mass.device) * total
        return minimal_count(mass, tgt.expand_as(total)).sum(-1).float() / n_visible
    raise ValueError(f"unknown oracle mode {mode!r}; valid: ['head', 'row']")


def selection_stats(
    mass: torch.Tensor, sel: BlockSelection | torch.Tensor
) -> dict[str, torch.Tensor]:
    """Recall, density and both oracle densities at the achieved recall, per (B, H) [B, H]."""
    mask = sel.mask if isinstance(sel, BlockSelection) else sel
    nqb, nkb = mass.shape[-2:]
    visible = _visible_like(mass, sel)
    mask = mask & visible
    recall = attention_recall(mass, mask)
    density = mask.sum(dim=(-2, -1)).float() / visible.sum().float()
    row_total = mass.sum(-1)
    row_recall = (mass * mask).sum(-1) / row_total.clamp_min(1e-30)
    return {
        "recall": recall,
        "density": density,
        "oracle_density": oracle_density(mass, visible, recall, "head"),
        "oracle_row_density": oracle_density(mass, visible, row_recall, "row"),
    }


def _visible_like(mass: torch.Tensor, sel: BlockSelection | torch.Tensor) -> torch.Tensor:
    if isinstance(sel, BlockSelection):
        visible, _ = sel.causal()
        return visible
    return mass.new_ones(mass.shape[-2:], dtype=torch.bool)


class LayerData:
    """Captured Q/K of one layer with its exact block mass (computed once, lazily)."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, block_size: int, chunk: int) -> None:
        self.q, self.k = q, k
        self.block_size, self.chunk = block_size, chunk
        self._mass: torch.Tensor | None = None

    @property
    def mass(self) -> torch.Tensor:
        if self._mass is None:
            self._mass = block_attention_mass(self.q, self.k, self.block_size, chunk=self.chunk)
        return self._mass

    def visible(self) -> torch.Tensor:
        visible, _ = block_causal(self.q.shape[2], self.k.shape[2], self.block_size)
        return visible


def evaluate_scorer(
    scorer, layers: Mapping[int, LayerData], probs: Mapping[int, torch.Tensor] | None = None
) -> dict[str, Any]:
    """Run ``scorer`` on each captured layer: per-layer/head stats and averages (batch 1).

    ``probs``: block probabilities computed beforehand per layer ([B, Hq, NQB, NKB]); the
    scorer's rule and forced blocks are applied to them
    (:meth:`prism.scorers.Scorer.select_by_rule`), so a threshold sweep scores each layer once.
    """
    per: dict[str, list[list[float]]] = {
        "recall": [],
        "density": [],
        "oracle_density": [],
        "oracle_row_density": [],
    }
    for idx in sorted(layers):
        ld = layers[idx]
        if ld.block_size != scorer.block_size:
            raise ValueError(
                f"layer data made for block_size {ld.block_size}, scorer uses {scorer.block_size}"
            )
        sel = scorer(ld.q, ld.k) if probs is None else scorer.select_by_rule(ld.q, ld.k, probs[idx])
        stats = selection_stats(ld.mass, sel)
        for name, val in stats.items():
            per[name].append(val[0].tolist())
    return summarise(per, sorted(layers))


def evaluate_oracle(layers: Mapping[int, LayerData], target: float, mode: str) -> dict[str, Any]:
    """The oracle point at ``target``: its density per (layer, head) and the recall it reaches."""
    per: dict[str, list[list[float]]] = {"recall": [], "density": []}
    for idx in sorted(layers):
        ld = layers[idx]
        visible = ld.visible()
        sel = oracle_selection(ld.mass, target, mode) & visible
        per["recall"].append(attention_recall(ld.mass, sel)[0].tolist())
        per["density"].append((sel.sum(dim=(-2, -1)).float() / visible.sum().float())[0].tolist())
    out = summarise(per, sorted(layers))
    out["oracle_density"] = out["density"]
    out["oracle_row_density"] = out["density"] if mode == "row" else None
    return out


def summarise(per: Mapping[str, list[list[float]]], layer_ids: Sequence[int]) -> dict[str, Any]:
    """Averages over (layer, head), per-layer means, the worst head, and the raw per-head lists."""
    out: dict[str, Any] = {"layers": list(layer_ids)}
    for name, rows in per.items():
        t = torch.tensor(rows, dtype=torch.float64)  # [L, H]
        out[name] = float(t.mean())
        out[f"{name}_per_layer"] = [float(x) for x in t.mean(dim=1)]
        out[f"{name}_per_head"] = [[round(float(x), 6) for x in r] for r in t]
    rec = torch.tensor(per["recall"], dtype=torch.float64)
    out["recall_min"] = float(rec.min())
    out["recall_p10"] = float(torch.quantile(rec.flatten(), 0.1))
    return out


def density_at_recall(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """Density at which a scorer's (density, recall) sweep reaches ``target`` recall.

    Linear interpolation between the two sweep points bracketing the target on the curve sorted
    by density (a point exactly at the target is returned as is); None when no point reaches it.
    The curve is first made monotone (running max of recall), as one can always spend more.
    """
    pts = sorted(points)
    if not pts:
        return None
    best = -1.0
    mono: list[tuple[float, float]] = []
    for d, r in pts:
        best = max(best, r)
        mono.append((d, best))
    for i, (d, r) in enumerate(mono):
        if r >= target:
            if i == 0:
                return d
            d0, r0 = mono[i - 1]
            if r == r0:
                return d
            return d0 + (d - d0) * (target - r0) / (r - r0)
    return None


def recall_at_density(points: Sequence[tuple[float, float]], density: float) -> float | None:
    """Recall of a sweep interpolated at ``density`` (None outside the swept density range)."""
    pts = sorted(points)
    if not pts or density < pts[0][0] or density > pts[-1][0]:
        return None
    for (d0, r0), (d1, r1) in zip(pts, pts[1:]):
        if d0 <= density <= d1:
            return r0 if d1 == d0 else r0 + (r1 - r0) * (density - d0) / (d1 - d0)
    return pts[-1][1]


def mean_density(scorer, layers: Mapping[int, LayerData]) -> float:
    """Mean selection density of ``scorer`` over the captured layers (and heads)."""
    return float(sum(scorer(ld.q, ld.k).density for ld in layers.values()) / len(layers))


def match_density(
    variant: Mapping[str, Any],
    layers: Mapping[int, LayerData],
    target: float,
    knob: str = "threshold",
    iters: int = 14,
) -> tuple[float | int, float]:
    """Set ``knob`` of a scorer variant so its mean density over ``layers`` is about ``target``.

    Bisection, assuming density grows with the knob (true of ``threshold`` and of MInference's
    ``vertical`` / ``slash`` counts). Returns (knob value, its density): of the two final brackets,
    the one whose density is closer to the target.
    """
    from ..scorers import SCORERS, build_scorer

    name = variant["scorer"]
    params = {
        k: v
        for k, v in variant.items()
        if k not in ("scorer", "label", "match_density", "match_knob")
    }
    default = getattr(SCORERS[name].Config(), knob)
    is_int = isinstance(default, int) and not isinstance(default, bool)
    length = next(iter(layers.values())).k.shape[2]
    lo, hi = (1, length) if is_int else (0.01, 1.0)

    def dens(v) -> float:
        return mean_density(build_scorer(name, **{**params, knob: v}), layers)

    d_lo, d_hi = dens(lo), dens(hi)
    if d_lo >= target:
        return lo, d_lo
    if d_hi <= target:
        return hi, d_hi
    for _ in range(iters if not is_int else 64):
        if is_int and hi - lo <= 1:
            break
        mid = (lo + hi) // 2 if is_int else (lo + hi) / 2
        d_mid = dens(mid)
        if d_mid < target:
            lo, d_lo = mid, d_mid
        else:
            hi, d_hi = mid, d_mid
    if abs(d_lo - target) <= abs(d_hi - target):
        return (lo if is_int else round(lo, 5)), d_lo
    return (hi if is_int else round(hi, 5)), d_hi
