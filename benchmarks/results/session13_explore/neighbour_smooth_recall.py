"""Session 13 exploration (issue 11): smoothing the probes' estimate over neighbouring query
blocks at 32K (YaRN). Adjacent query blocks attend to nearly the same key blocks, so the
estimate of block i borrows (β/2)·(p_{i-1} + p_{i+1}) — zero extra logits, only [NQB, NKB]
elementwise work — masked to block i's visible key blocks and renormalised. Applied to the
probes alone and to the shipped mixture (P=2 + pooled 0.3 /8). Data, oracle and sweep as session
12's ``pooled_variance_recall.py`` (its cache).

    python benchmarks/results/session13_explore/neighbour_smooth_recall.py --lengths 32768
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks/results"))
sys.path.insert(0, str(ROOT / "benchmarks/results/session12_explore"))

from pooled_variance_recall import for_each_length  # noqa: E402
from probe_pooled_mix_recall import fmt, sweep  # noqa: E402

from prism.scorers.probe import pooled_key_block_probs  # noqa: E402


def smooth(p, prefix_blocks, beta, far_only=0):
    """[B, H, NQB, NKB]: (1-β)·p_i + β/2·(p_{i-1} + p_{i+1}) on the visible, off-diagonal-``far_only``
    columns of row i; renormalised. Edge rows use the one neighbour they have."""
    nqb, nkb = p.shape[-2:]
    up = torch.cat([p[..., :1, :], p[..., :-1, :]], -2)
    down = torch.cat([p[..., 1:, :], p[..., -1:, :]], -2)
    mix = (1 - beta) * p + 0.5 * beta * (up + down)
    i = torch.arange(nqb)[:, None] + prefix_blocks
    j = torch.arange(nkb)[None, :]
    vis = j <= i
    if far_only:
        mix = torch.where(i - j >= far_only, mix, p)
    mix = mix * vis
    return mix / mix.sum(-1, keepdim=True).clamp_min(1e-30)


VARIANTS = [  # (label, alpha, beta, far_only)
    ("P=2 smooth 0.3", 0.0, 0.3, 0),
    ("P=2 smooth 0.5", 0.0, 0.5, 0),
    ("P=2 + pooled 0.3 + smooth 0.2", 0.3, 0.2, 0),
    ("P=2 + pooled 0.3 + smooth 0.4", 0.3, 0.4, 0),
    ("P=2 + pooled 0.2 + smooth 0.4", 0.2, 0.4, 0),
    ("P=2 + pooled 0.3 + smooth 0.4 far2", 0.3, 0.4, 2),
]


def variants(length, layers, ref, probe) -> None:
    pooled = {li: pooled_key_block_probs(ld.q, ld.k, ld.block_size, 8) for li, ld in layers.items()}
    for label, alpha, beta, far in VARIANTS:
        probs = {}
        for li, ld in layers.items():
            pre = (ld.k.shape[2] - ld.q.shape[2]) // ld.block_size
            probs[li] = smooth((1 - alpha) * probe[li] + alpha * pooled[li], pre, beta, far)
        print(f"{label:36s} {fmt(sweep(layers, 'probe', probs), ref)}", flush=True)


if __name__ == "__main__":
    for_each_length("32768", variants)
