"""Session 13 exploration (issue 11): neighbour smoothing defined so that the fused launch 2 can
compute it — every component distribution restricted to block i's visible KV blocks and
renormalised there ("R"), against the smoothing of ``neighbour_smooth_recall.py`` (smooth the
finished estimate, mask, renormalise the row: "M").

Shared P = 2 probes: block i's probes are s_{i-1}, s_i (s_k: the softmax of block k's last row,
block-summed over the KV blocks it sees). R:

    m_k  = (1-α)·½(ŝ_{k-1} + ŝ_k) + α·p̂ool_k          (^: restricted to V_i, renormalised)
    e_i  = (1-β)·m_i + β/2·(m_{i-1} + m_{i+1})         (a missing neighbour's weight goes to m_i)

Only block i+1's components change under the restriction (the others see no block past i).

    python benchmarks/results/session13_explore/neighbour_renorm_recall.py --lengths 32768
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks/results"))
sys.path.insert(0, str(ROOT / "benchmarks/results/session13_explore"))
sys.path.insert(0, str(ROOT / "benchmarks/results/session12_explore"))

from neighbour_smooth_recall import smooth  # noqa: E402
from pooled_variance_recall import for_each_length  # noqa: E402
from probe_pooled_mix_recall import fmt, sweep  # noqa: E402

from prism.scorers.probe import pooled_key_block_probs, probe_block_probs  # noqa: E402


def restrict(p, nvis_next):
    """p [..., NQB, NKB] (block i+1's distributions, already shifted to row i) restricted to
    row i's first ``nvis`` KV blocks and renormalised."""
    nkb = p.shape[-1]
    keep = torch.arange(nkb)[None, :] < nvis_next[:, None]
    q = p * keep
    return q / q.sum(-1, keepdim=True).clamp_min(1e-30)


def smooth_r(s, pool, alpha, beta):
    """R (module docstring); s, pool [B, H, NQB, NKB]; no prefix."""
    nqb = s.shape[-2]
    nvis = torch.arange(nqb) + 1  # row i sees KV blocks 0..i
    prev = torch.cat([torch.zeros_like(s[..., :1, :]), s[..., :-1, :]], -2)
    probes = 0.5 * (prev + s)
    probes[..., 0, :] = s[..., 0, :]
    m = (1 - alpha) * probes + alpha * pool
    # block i+1's components, restricted to V_i
    s_next = restrict(torch.cat([s[..., 1:, :], s[..., -1:, :]], -2), nvis)
    pool_next = restrict(torch.cat([pool[..., 1:, :], pool[..., -1:, :]], -2), nvis)
    m_next = (1 - alpha) * 0.5 * (s + s_next) + alpha * pool_next
    m_prev = torch.cat([m[..., :1, :], m[..., :-1, :]], -2)
    has_prev = (torch.arange(nqb) > 0).float()[:, None]
    has_next = (torch.arange(nqb) < nqb - 1).float()[:, None]
    e = (1 - beta) * m + beta / 2 * (
        has_prev * m_prev + (1 - has_prev) * m + has_next * m_next + (1 - has_next) * m
    )
    return e


def variants(length, layers, ref, probe) -> None:
    s = {li: probe_block_probs(ld.q, ld.k, ld.block_size, 1, "last") for li, ld in layers.items()}
    pool = {li: pooled_key_block_probs(ld.q, ld.k, ld.block_size, 8) for li, ld in layers.items()}
    li0 = next(iter(layers))
    check = smooth_r(s[li0], pool[li0], 0.0, 0.0)
    print(
        "R(α=0, β=0) vs the shared P=2 probes: max |diff|", float((check - probe[li0]).abs().max())
    )
    for alpha, beta in [(0.3, 0.4), (0.3, 0.3), (0.3, 0.5), (0.25, 0.4), (0.0, 0.4)]:
        probs_m = {li: smooth((1 - alpha) * probe[li] + alpha * pool[li], 0, beta) for li in layers}
        probs_r = {li: smooth_r(s[li], pool[li], alpha, beta) for li in layers}
        print(
            f"{f'M α={alpha} β={beta}':24s} {fmt(sweep(layers, 'probe', probs_m), ref)}", flush=True
        )
        print(
            f"{f'R α={alpha} β={beta}':24s} {fmt(sweep(layers, 'probe', probs_r), ref)}", flush=True
        )


if __name__ == "__main__":
    for_each_length("32768", variants)
