"""Selection rules: turn block scores into a boolean block selection.

All rules work on the last dimension (KV blocks, NKB) of tensors shaped ``[..., NQB, NKB]`` and
take ``visible`` (bool, broadcastable, block-causal) so that invisible blocks are never chosen.
"""

from __future__ import annotations

import torch


def masked_softmax(logits: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Float32 softmax over KV blocks restricted to ``visible`` (every row has >= 1 visible)."""
    return logits.float().masked_fill(~visible, float("-inf")).softmax(dim=-1)


def top_p(probs: torch.Tensor, visible: torch.Tensor, p: float) -> torch.Tensor:
    """Minimal prefix of the descending order whose mass reaches ``p``.

    A block is kept iff the probability mass strictly before it (in descending order) is < p, so
    the set is never empty. ``p >= 1`` keeps every visible block.
    """
    if p >= 1.0:
        return visible.expand_as(probs).clone()
    probs = probs.masked_fill(~visible, 0.0)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(dim=-1) - sorted_p
    keep_sorted = before < p
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return keep & visible


def top_k(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` highest-scoring visible blocks of each row (all visible ones if fewer)."""
    nkb = scores.shape[-1]
    k = min(int(k), nkb)
    masked = scores.float().masked_fill(~visible, float("-inf"))
    idx = masked.topk(k, dim=-1).indices
    keep = torch.zeros(masked.shape, dtype=torch.bool, device=scores.device)
    keep.scatter_(-1, idx, True)
    return keep & visible


def min_prob(probs: torch.Tensor, visible: torch.Tensor, value: float) -> torch.Tensor:
    """Every visible block whose probability is at least ``value``."""
    return (probs >= value) & visible


RULES = ("top_p", "top_k", "min_prob")


def apply_rule(
    probs: torch.Tensor, visible: torch.Tensor, rule: str, threshold: float, k: int, floor: float
) -> torch.Tensor:
    """Dispatch on the configured rule name (``top_p`` | ``top_k`` | ``min_prob``)."""
    if rule == "top_p":
        return top_p(probs, visible, threshold)
    if rule == "top_k":
        return top_k(probs, visible, k)
    if rule == "min_prob":
        return min_prob(probs, visible, floor)
    raise ValueError(f"unknown selection rule {rule!r}; valid rules: {list(RULES)}")
