"""Selection rules: turn block scores into a boolean block selection.

Every rule of the package lives here, once:

* :func:`top_p` — per row, the minimal descending set whose probability mass reaches ``p``
  (prism, meanpool, probe, ... through :func:`apply_rule`);
* :func:`top_k` — per row, the ``k`` highest entries;
* :func:`min_prob` — every entry with probability ``>= value``;
* :func:`cover` — the minimal descending set of candidates covering a *share* ``p`` of their
  total mass, optionally after some mass already covered (XAttention's per-row rule with its forced
  blocks, FlexPrefill's column / diagonal rule);
* :func:`cover_map` — :func:`cover` over a whole ``[NQB, NKB]`` block map at once (FlexPrefill's
  query-aware rule);
* :func:`minimal_count` — only the *size* of such a set, for a given target mass (the oracle
  densities of :mod:`prism.eval.recall`).

Shapes: rules work on the last dimension (N entries; NKB KV blocks for a block map
``[..., NQB, NKB]``) and take ``visible`` / ``candidates`` (bool, broadcastable) so that invisible
entries are never chosen; they return bool tensors shaped like the scores.

**The prefix rule and its ties.** ``top_p`` / ``cover`` / ``minimal_count`` share one definition:
sort the candidates by descending value, and keep an entry iff the mass *strictly before it* in
that order is below the target (``< p``, ``< p × total``, ...). The set is therefore the shortest
prefix reaching the target and is never empty for a positive target. Entries with exactly equal
values are ordered by position (lower index first: a stable sort), so at a tie straddling the
target the earlier entries are kept and the later ones dropped. Counts (:func:`minimal_count`) do
not depend on the tie order.
"""

from __future__ import annotations

import torch

RULES = ("top_p", "top_k", "min_prob")


def masked_softmax(logits: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Float32 softmax over the last dim restricted to ``visible``.

    logits [..., NQB, NKB]; visible bool, broadcastable (every row must have >= 1 visible entry).
    Returns float32 probabilities shaped like ``logits``, 0 on invisible entries.
    """
    return logits.float().masked_fill(~visible, float("-inf")).softmax(dim=-1)


def _descending(
    values: torch.Tensor, candidates: torch.Tensor | None, dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shared core of the prefix rule.

    values float [..., N] (>= 0 on candidates); candidates bool broadcastable to values, or None
    (all). Sorts descending, non-candidates last with value 0, ties by position (stable sort).
    Returns ``(before, total, order)``: the exclusive prefix sums of the sorted values (the mass
    strictly before each entry) [..., N] and the total [..., 1], both in ``dtype`` (default: the
    values' dtype), and the permutation ``order`` int64 [..., N] (sorted position -> index).
    """
    v = values if candidates is None else values.masked_fill(~candidates, -1.0)
    sorted_v, order = v.sort(dim=-1, descending=True, stable=True)
    if candidates is not None:
        sorted_v.clamp_min_(0.0)
    if dtype is not None and sorted_v.dtype != dtype:
        sorted_v = sorted_v.to(dtype)
    csum = sorted_v.cumsum(dim=-1)
    total = csum[..., -1:].clone()
    before = csum.sub_(sorted_v)  # exclusive prefix sums, in place
    return before, total, order


def _unsort(keep_sorted: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Scatter a bool [..., N] from sorted positions back to the original ones."""
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def top_p(probs: torch.Tensor, visible: torch.Tensor, p: float) -> torch.Tensor:
    """Per row, the minimal prefix of the descending order whose probability mass reaches ``p``.

    probs float [..., NQB, NKB] (rows sum to 1 over visible entries); visible bool, broadcastable.
    A block is kept iff the probability mass strictly before it (descending order, equal
    probabilities ordered by ascending KV block index) is ``< p``, so a row is never empty.
    ``p >= 1`` keeps every visible block. Cumulative sums in the probabilities' dtype (float32).
    Returns bool shaped like ``probs``.
    """
    if p >= 1.0:
        return visible.expand_as(probs).clone()
    before, _, order = _descending(probs, visible, None)
    return _unsort(before < p, order) & visible


def top_k(scores: torch.Tensor, visible: torch.Tensor | None, k: int) -> torch.Tensor:
    """Per row, the ``k`` highest-scoring visible entries (all visible ones if fewer).

    scores float [..., N]; visible bool broadcastable, or None (every entry). Ties at the k-th
    score are broken by ``torch.topk`` (unspecified order). Returns bool shaped like ``scores``.
    """
    n = scores.shape[-1]
    k = min(int(k), n)
    masked = scores.float()
    if visible is not None:
        masked = masked.masked_fill(~visible, float("-inf"))
    keep = torch.zeros(masked.shape, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return keep
    keep.scatter_(-1, masked.topk(k, dim=-1).indices, True)
    return keep if visible is None else keep & visible


def min_prob(probs: torch.Tensor, visible: torch.Tensor, value: float) -> torch.Tensor:
    """Every visible entry whose probability is at least ``value``: bool shaped like ``probs``."""
    return (probs >= value) & visible


def cover(
    mass: torch.Tensor,
    p: float,
    candidates: torch.Tensor | None = None,
    start: torch.Tensor | None = None,
    accumulate: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Minimal descending set of ``candidates`` covering a share ``p`` of the mass.

    mass float [..., N] (>= 0, need not be normalised); candidates bool broadcastable to mass, or
    None (every entry); start float [...] or None: mass already covered (e.g. by forced blocks),
    counted before any candidate. The total is ``start + Σ candidate mass``. A candidate is kept
    iff ``start +`` (mass of the candidates strictly before it in descending order, ties by
    position) ``< p × total``; ``p >= 1`` keeps every candidate. Cumulative sums run in
    ``accumulate`` (float64 by default, so that long rows, e.g. one entry per token, stay exact
    enough). Returns bool [..., N].
    """
    cand = (
        torch.ones(mass.shape, dtype=torch.bool, device=mass.device)
        if candidates is None
        else candidates.expand(mass.shape)
    )
    if p >= 1.0:
        return cand.clone()
    before, total, order = _descending(mass.float(), cand, accumulate)
    if start is not None:
        start = start.to(accumulate).unsqueeze(-1)
        before += start
        total += start
    keep_sorted = before < p * total
    del before
    return _unsort(keep_sorted, order) & cand


def cover_map(mass: torch.Tensor, p: float, visible: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`cover` over a whole block map: the minimal descending set of visible blocks of each
    ``[NQB, NKB]`` map covering a share ``p`` of the map's visible mass.

    mass float [..., NQB, NKB]; visible bool broadcastable to it (e.g. block-causal [NQB, NKB]) or
    None. Ties by flat position (row-major). Returns bool [..., NQB, NKB].
    """
    cand = None if visible is None else visible.expand(mass.shape).flatten(-2)
    return cover(mass.flatten(-2), p, cand).view(mass.shape)


def minimal_count(values: torch.Tensor, target: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """Fewest entries of ``values`` whose sum reaches ``target``: the size of the prefix rule's set.

    values float [..., N] (>= 0); target float [...] (the mass to reach, absolute). Counts the
    entries whose descending-order mass strictly before them is ``< target − rtol × Σ values``
    (a relative tolerance against float rounding). Cumulative sums in the values' dtype.
    Returns int64 [...].
    """
    before, _, _ = _descending(values, None, None)
    tol = rtol * values.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return (before < (target.unsqueeze(-1) - tol)).sum(dim=-1)


def apply_rule(
    probs: torch.Tensor, visible: torch.Tensor, rule: str, threshold: float, k: int, floor: float
) -> torch.Tensor:
    """Dispatch on the configured rule name (``top_p`` | ``top_k`` | ``min_prob``).

    probs float [..., NQB, NKB]; visible bool broadcastable; returns bool shaped like ``probs``.
    """
    if rule == "top_p":
        return top_p(probs, visible, threshold)
    if rule == "top_k":
        return top_k(probs, visible, k)
    if rule == "min_prob":
        return min_prob(probs, visible, floor)
    raise ValueError(f"unknown selection rule {rule!r}; valid rules: {list(RULES)}")
