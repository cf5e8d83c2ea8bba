"""Session 12 exploration (issue 11): a second-moment (variance) term in the pooled-key estimate.

The pooled-key estimate scores a query row against each key block's mean key, ``s·q·μ_j + log n_j``
(s = 1/sqrt(D)), i.e. log Σ_c exp(s·q·k_c) with every key replaced by the block mean. Averaging a
block's keys removes their spread, most of all in the fast RoPE pairs (Prism's observation), so
blocks whose keys vary a lot are under-scored. Under an independent-Gaussian model of the keys of
block j (per-dim mean μ_j, variance σ²_j), E[exp(s·q·k)] = exp(s·q·μ_j + ½·s²·Σ_d q_d² σ²_jd), so

    z_j = s·q·μ_j + β·½·s²·(q∘q)·σ²_j + log n_j       (β = 1: the Gaussian moment; 0: today's)

costs one more [rows, D] x [D, NKB] product. Printed as in probe_pooled_mix_recall.py: recall at
equal density interpolated at 0.10 ... 0.40 and its gap to the top-p block oracle.

    python benchmarks/results/session12_explore/pooled_variance_recall.py --lengths 4096,8192,32768
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks/results"))

from probe_pooled_mix_recall import DENS, fmt, layers_at, sweep  # noqa: E402

from prism.scorers import build_scorer  # noqa: E402
from prism.scorers.probe import _pooled_layout  # noqa: E402


def pooled_var_probs(q, k, bs, stride=8, beta=1.0, temp=1.0):
    """float32 [B, Hq, NQB, NKB]: pooled-key estimate with the variance term (module docstring)."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    nqb, nkb = -(-sq // bs), -(-sk // bs)
    prefix = sk - sq
    kf = torch.nn.functional.pad(k.float(), (0, 0, 0, nkb * bs - sk)).view(b, hkv, nkb, bs, d)
    count = torch.full((nkb,), float(bs))
    count[-1] = float(sk - (nkb - 1) * bs)
    mu = kf.sum(3) / count[:, None]
    ex2 = (kf * kf).sum(3) / count[:, None]
    var = (ex2 - mu * mu).clamp_min(0)
    s = d**-0.5
    rows, owner, weight = _pooled_layout(int(sq), bs, int(stride), "cpu")
    qr = q.index_select(2, rows).float().view(b, hkv, g * rows.numel(), d)
    z = qr @ mu.transpose(-1, -2) * s
    if beta:
        z = z + (0.5 * beta * s * s) * ((qr * qr) @ var.transpose(-1, -2))
    z = z.view(b, hq, rows.numel(), nkb) / temp + count.log()
    cols = torch.arange(nkb)
    z.masked_fill_(cols[None, :] > ((rows + prefix) // bs)[:, None], float("-inf"))
    p = torch.softmax(z, -1) * weight[:, None]
    out = torch.zeros(b, hq, nqb, nkb)
    out.index_add_(2, owner, p)
    return out


VARIANTS = [  # (label, alpha, stride, beta, temp)
    ("P=2 + pooled 0.3 /8", 0.3, 8, 0.0, 1.0),
    ("P=2 + var 0.3 /8 b=1", 0.3, 8, 1.0, 1.0),
    ("P=2 + var 0.3 /8 b=.5", 0.3, 8, 0.5, 1.0),
    ("P=2 + var 0.4 /8 b=1", 0.4, 8, 1.0, 1.0),
    ("P=2 + var 0.5 /8 b=1", 0.5, 8, 1.0, 1.0),
    ("var alone /8 b=1", 1.0, 8, 1.0, 1.0),
    ("pooled alone /8", 1.0, 8, 0.0, 1.0),
]
VARIANTS_LONG = [  # at 32K (the miss of session 11: P=2 + pooled 0.3 /8 at -0.0103)
    ("P=2 + pooled 0.3 /8", 0.3, 8, 0.0, 1.0),
    ("P=2 + pooled 0.25 /8", 0.25, 8, 0.0, 1.0),
    ("P=2 + pooled 0.35 /8", 0.35, 8, 0.0, 1.0),
    ("P=2 + pooled 0.3 /4", 0.3, 4, 0.0, 1.0),
    ("P=2 + var 0.3 /8 b=.5", 0.3, 8, 0.5, 1.0),
    ("P=2 + var 0.35 /8 b=.5", 0.35, 8, 0.5, 1.0),
]


def for_each_length(default_lengths: str, body) -> None:
    """Parse ``--lengths/--cache/--threads``; per length load the capture, print the oracle's and
    the default probes' recall, then ``body(length, layers, ref, probe)`` (``probe``: the
    shared P = 2 block probabilities per layer). Shared by the session 12 scripts."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default=default_lengths)
    ap.add_argument("--cache", default="/tmp/prism_recall_cache")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print("densities", DENS)
    for length in [int(x) for x in a.lengths.split(",")]:
        t0 = time.time()
        layers = layers_at(length, Path(a.cache))
        print(f"== {length} tokens ({len(layers)} layers; data ready in {time.time() - t0:.0f} s)")
        mass_p = {li: ld.mass / ld.mass.sum(-1, keepdim=True) for li, ld in layers.items()}
        ref = sweep(layers, "oracle", mass_p)
        print(f"{'oracle top-p':24s} {fmt(ref)}", flush=True)
        sc = build_scorer("probe", impl="torch")
        probe = {li: sc.block_probs(ld.q, ld.k) for li, ld in layers.items()}
        print(f"{'probe P=2 (default)':24s} {fmt(sweep(layers, 'probe', probe), ref)}", flush=True)
        body(length, layers, ref, probe)
        print(f"({time.time() - t0:.0f} s)", flush=True)


def variants(length, layers, ref, probe) -> None:
    cache: dict = {}
    for label, alpha, stride, beta, temp in VARIANTS if length <= 8192 else VARIANTS_LONG:
        key = (stride, beta, temp)
        if key not in cache:
            cache[key] = {
                li: pooled_var_probs(ld.q, ld.k, ld.block_size, stride, beta, temp)
                for li, ld in layers.items()
            }
        probs = {li: (1 - alpha) * probe[li] + alpha * cache[key][li] for li in layers}
        print(f"{label:24s} {fmt(sweep(layers, 'probe', probs), ref)}", flush=True)


if __name__ == "__main__":
    for_each_length("4096,8192,32768", variants)
