"""Session 12 exploration (issue 11): the shape of the pooled-key mixture at 32K (YaRN).

Variants of ``P=2 + pooled 0.3 /8`` (the shipped mixture, worst gap −0.0103 to the top-p block
oracle at 32K): a temperature on the pooled logits, and a mixing weight that depends on the
distance of the key block from the query block (the probes sit at the block's ends, so they are
sharp near the diagonal; the pooled rows help far from it). Same data, oracle and sweep as
``pooled_variance_recall.py`` (its cache).

    python benchmarks/results/session12_explore/pooled_shape_recall.py --lengths 32768
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks/results"))
sys.path.insert(0, str(ROOT / "benchmarks/results/session12_explore"))

from pooled_variance_recall import for_each_length, pooled_var_probs  # noqa: E402
from probe_pooled_mix_recall import fmt, sweep  # noqa: E402


def far_weight(nqb, nkb, prefix_blocks, near, a_near, a_far):
    """[NQB, NKB] mixing weight: a_near within ``near`` blocks of the diagonal, a_far beyond."""
    i = torch.arange(nqb)[:, None] + prefix_blocks
    j = torch.arange(nkb)[None, :]
    return torch.where(i - j < near, a_near, a_far)


VARIANTS = [  # (label, temp, near, a_near, a_far)
    ("pooled 0.3 /8 (shipped)", 1.0, 0, 0.3, 0.3),
    ("temp 0.8", 0.8, 0, 0.3, 0.3),
    ("temp 1.25", 1.25, 0, 0.3, 0.3),
    ("near 4: 0.15 / far 0.4", 1.0, 4, 0.15, 0.4),
    ("near 8: 0.2 / far 0.4", 1.0, 8, 0.2, 0.4),
    ("near 16: 0.2 / far 0.45", 1.0, 16, 0.2, 0.45),
]


def variants(length, layers, ref, probe) -> None:
    pooled: dict = {}
    for label, temp, near, a_near, a_far in VARIANTS:
        if temp not in pooled:
            pooled[temp] = {
                li: pooled_var_probs(ld.q, ld.k, ld.block_size, 8, 0.0, temp)
                for li, ld in layers.items()
            }
        probs = {}
        for li, ld in layers.items():
            nqb, nkb = probe[li].shape[-2:]
            pre = (ld.k.shape[2] - ld.q.shape[2]) // ld.block_size
            w = far_weight(nqb, nkb, pre, near, a_near, a_far)
            mix = (1 - w) * probe[li] + w * pooled[temp][li]
            probs[li] = mix / mix.sum(-1, keepdim=True).clamp_min(1e-30)  # rows sum to 1
        print(f"{label:26s} {fmt(sweep(layers, 'probe', probs), ref)}", flush=True)


if __name__ == "__main__":
    for_each_length("32768", variants)
