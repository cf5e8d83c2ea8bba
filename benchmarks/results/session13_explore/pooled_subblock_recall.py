"""Session 13 exploration (issue 11): finer key pooling in the pooled-key mixture at 32K (YaRN).

The pooled estimate scores each sampled query row against one mean key per 128-key block. Here
each key block is split into ``sub`` sub-blocks (128/sub keys each), each with its own mean key,
and the block's logit is the log-sum-exp of its sub-blocks' ``s·q·μ + log n`` — the same
"every key replaced by its (sub-)block mean" approximation, with less of the keys' spread
averaged away (the variance term of session 12 did this parametrically and lost perplexity).
Same data, oracle and sweep as session 12's ``pooled_variance_recall.py`` (its cache).

    python benchmarks/results/session13_explore/pooled_subblock_recall.py --lengths 32768
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

from prism.scorers.probe import _pooled_layout  # noqa: E402


def pooled_sub_probs(q, k, bs, stride=8, sub=1):
    """float32 [B, Hq, NQB, NKB]: pooled estimate with ``sub`` mean keys per key block."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    nqb, nkb = -(-sq // bs), -(-sk // bs)
    prefix = sk - sq
    w = bs // sub
    kf = torch.nn.functional.pad(k.float(), (0, 0, 0, nkb * bs - sk)).view(b, hkv, nkb * sub, w, d)
    valid = torch.zeros(nkb * bs)
    valid[:sk] = 1
    count = valid.view(nkb * sub, w).sum(1)
    mu = kf.sum(3) / count.clamp_min(1)[:, None]
    rows, owner, weight = _pooled_layout(int(sq), bs, int(stride), "cpu")
    out = torch.zeros(b, hq, nqb, nkb)
    cols = torch.arange(nkb)
    for r0 in range(0, rows.numel(), 2048):
        r = rows[r0 : r0 + 2048]
        n = r.numel()
        qr = q.index_select(2, r).float().view(b, hkv, g * n, d)
        z = (qr @ mu.transpose(-1, -2)) * d**-0.5 + count.clamp_min(1e-30).log()
        z = z.view(b, hq, n, nkb, sub).logsumexp(-1)
        z.masked_fill_(cols[None, :] > ((r + prefix) // bs)[:, None], float("-inf"))
        p = torch.softmax(z, -1) * weight[r0 : r0 + n, None]
        out.index_add_(2, owner[r0 : r0 + n], p)
    return out


VARIANTS = [  # (label, alpha, stride, sub)
    ("P=2 + pooled 0.3 /8", 0.3, 8, 1),
    ("P=2 + pooled 0.3 /8 sub2", 0.3, 8, 2),
    ("P=2 + pooled 0.4 /8 sub2", 0.4, 8, 2),
    ("P=2 + pooled 0.3 /8 sub4", 0.3, 8, 4),
    ("P=2 + pooled 0.4 /8 sub4", 0.4, 8, 4),
    ("P=2 + pooled 0.5 /8 sub4", 0.5, 8, 4),
    ("sub4 alone /8", 1.0, 8, 4),
]


def variants(length, layers, ref, probe) -> None:
    cache: dict = {}
    for label, alpha, stride, sub in VARIANTS:
        if (stride, sub) not in cache:
            cache[stride, sub] = {
                li: pooled_sub_probs(ld.q, ld.k, ld.block_size, stride, sub)
                for li, ld in layers.items()
            }
        probs = {li: (1 - alpha) * probe[li] + alpha * cache[stride, sub][li] for li in layers}
        print(f"{label:26s} {fmt(sweep(layers, 'probe', probs), ref)}", flush=True)


if __name__ == "__main__":
    for_each_length("32768", variants)
