"""Per-layer statistics of the sparse pre-fill: density and (optionally) attention recall.

Framework-neutral (no transformers import): an integration calls :meth:`PrismStats.record_sparse`
/ :meth:`PrismStats.record_dense` from its attention function while a :class:`PrismStats` is
attached to the policy (``policy.stats``); with none attached nothing is recorded and the default
path pays nothing. :func:`collect_stats` attaches one for the duration of a ``with`` block.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .masks import BlockSelection
from .policy import PrismPolicy, default_policy


@dataclass
class LayerStats:
    """Per-layer counters. ``density`` = selected / causal blocks over every sparse call, batch
    row and head; ``recall`` = mean share of the true attention mass inside the selection."""

    calls: int = 0
    sparse_calls: int = 0
    dense_calls: Counter = field(default_factory=Counter)
    selected_blocks: int = 0
    causal_blocks: int = 0
    recall_sum: float = 0.0
    recall_calls: int = 0

    @property
    def density(self) -> float | None:
        return self.selected_blocks / self.causal_blocks if self.causal_blocks else None

    @property
    def recall(self) -> float | None:
        return self.recall_sum / self.recall_calls if self.recall_calls else None


class PrismStats:
    """Per-layer density (and optional attention recall) of the sparse pre-fill calls.

    ``recall``: False, True (every layer: costs a dense fp32 attention per layer) or a list of
    layer indices. ``defer_recall``: keep copies of those layers' q/k and compute the recall
    when it is first read, so that a timed forward pass does not pay for it. Collected in eager
    mode only (not inside a compiled graph).

    Layers are keyed by their index; a module without one (``layer_idx`` None) counts as -1.
    """

    def __init__(self, recall: bool | Sequence[int] = False, defer_recall: bool = False) -> None:
        self.recall_layers: bool | frozenset[int] = (
            recall if isinstance(recall, bool) else frozenset(int(i) for i in recall)
        )
        self.defer_recall = defer_recall
        self.layers: dict[int, LayerStats] = {}
        self._pending: list[tuple] = []

    def _layer(self, idx: int | None) -> LayerStats:
        key = -1 if idx is None else int(idx)
        if key not in self.layers:
            self.layers[key] = LayerStats()
        return self.layers[key]

    def wants_recall(self, idx: int | None) -> bool:
        if isinstance(self.recall_layers, bool):
            return self.recall_layers
        return idx is not None and idx in self.recall_layers

    # -- recording (called by the integrations) ---------------------------------------------
    def record_call(self, idx: int | None, sparse: bool = True) -> None:
        """Count one attention call of layer ``idx`` (and one sparse call if ``sparse``) without
        recording a selection: for a call whose selections arrive piecewise (one
        :meth:`record_sparse` with ``new_call=False`` per batch row)."""
        st = self._layer(idx)
        st.calls += 1
        if sparse:
            st.sparse_calls += 1

    def record_dense(self, idx: int | None, reason: str) -> None:
        """Count one call of layer ``idx`` that ran dense, and why (``"decode"``, ``"short"``...)."""
        self.record_call(idx, sparse=False)
        self._layer(idx).dense_calls[reason] += 1

    def record_sparse(
        self,
        idx: int | None,
        sel: BlockSelection,
        q: torch.Tensor,
        k: torch.Tensor,
        scale: float | None,
        new_call: bool = True,
    ) -> None:
        """Add the selection ``sel`` of layer ``idx`` (for q [B, Hq, Sq, D], k [B, Hkv, Sk, D]):
        its selected and causal blocks over every batch row and head, and the recall if asked.
        ``new_call=False``: part of a call already counted with :meth:`record_call`."""
        if new_call:
            self.record_call(idx, sparse=True)
        st = self._layer(idx)
        visible, _ = sel.causal()
        n_vis = int(visible.sum())
        per_head = sel.density_per_head()  # [B, Hq]; never expands a list-form selection
        st.selected_blocks += round(float(per_head.sum()) * n_vis)
        st.causal_blocks += n_vis * per_head.numel()
        if self.wants_recall(idx):
            if self.defer_recall:
                self._pending.append((st, sel, q.detach().clone(), k.detach().clone(), scale))
            else:
                self._add_recall(st, sel, q, k, scale)

    @staticmethod
    def _add_recall(st: LayerStats, sel: BlockSelection, q, k, scale) -> None:
        from .metrics import attention_recall, block_attention_mass

        mass = block_attention_mass(q, k, sel.block_size, scale)
        st.recall_sum += float(attention_recall(mass, sel).mean())
        st.recall_calls += 1

    @property
    def pending_recalls(self) -> int:
        """How many deferred recalls wait to be computed."""
        return len(self._pending)

    def compute_pending(self) -> None:
        """Compute the deferred recalls (done automatically when ``recall`` is read)."""
        while self._pending:
            self._add_recall(*self._pending.pop(0))

    # -- views ------------------------------------------------------------------------------
    @property
    def density(self) -> dict[int, float]:
        """{layer: density} over the layers that ran sparse."""
        return {i: s.density for i, s in sorted(self.layers.items()) if s.density is not None}

    @property
    def recall(self) -> dict[int, float]:
        """{layer: mean attention recall} over the layers it was asked for."""
        self.compute_pending()
        return {i: s.recall for i, s in sorted(self.layers.items()) if s.recall is not None}

    @property
    def overall_density(self) -> float | None:
        """Selected / causal blocks over every sparse layer (dense layers not counted)."""
        sel = sum(s.selected_blocks for s in self.layers.values())
        tot = sum(s.causal_blocks for s in self.layers.values())
        return sel / tot if tot else None

    def summary(self) -> str:
        """A small per-layer table."""
        self.compute_pending()
        lines = [f"{'layer':>5} {'calls':>5} {'sparse':>6} {'density':>8} {'recall':>7}  dense"]
        for i, s in sorted(self.layers.items()):
            d = "-" if s.density is None else f"{s.density:.3f}"
            r = "-" if s.recall is None else f"{s.recall:.3f}"
            why = ", ".join(f"{k}:{v}" for k, v in sorted(s.dense_calls.items()))
            lines.append(f"{i:>5} {s.calls:>5} {s.sparse_calls:>6} {d:>8} {r:>7}  {why}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        od = self.overall_density
        return f"PrismStats(layers={len(self.layers)}, overall_density={od})"


@contextlib.contextmanager
def collect_stats(
    model: Any = None,
    recall: bool | Sequence[int] = False,
    defer_recall: bool = False,
) -> Iterator[PrismStats]:
    """``with prism.collect_stats(model, recall=[12]) as stats: model(ids)`` -> per-layer density
    (``stats.density``), recall on the chosen layers (``stats.recall``), ``stats.summary()``.

    ``model``: anything carrying the policy as ``model._prism_policy`` (what
    :func:`prism.patch_model` sets), or a :class:`~prism.policy.PrismPolicy` itself; ``None`` (or a
    model without a policy) collects for the default policy (models loaded with
    ``attn_implementation="prism"`` and never patched). See :class:`PrismStats`."""
    if isinstance(model, PrismPolicy):
        pol = model
    else:
        pol = (getattr(model, "_prism_policy", None) if model is not None else None) or (
            default_policy()
        )
    before = pol.stats
    stats = PrismStats(recall, defer_recall=defer_recall)
    pol.stats = stats
    try:
        yield stats
    finally:
        pol.stats = before


__all__ = ["LayerStats", "PrismStats", "collect_stats"]
