"""``python -m prism``: sparse vs dense attention on synthetic long inputs (RoPE'd, text-like).

The real-model demo replaces this once the HF integration lands.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from . import available_scorers, sparse_attention
from .metrics import attention_recall, block_attention_mass
from .synthetic import synthetic_qkv


def dense_causal(q, k, v):
    sq, sk = q.shape[2], k.shape[2]
    g = q.shape[1] // k.shape[1]
    allowed = (torch.arange(sq)[:, None] + sk - sq) >= torch.arange(sk)[None, :]
    return F.scaled_dot_product_attention(
        q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=allowed
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m prism", description=__doc__)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument(
        "--scorers", nargs="+", default=["meanpool", "prism"], choices=available_scorers()
    )
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--backend", default="flex")
    args = ap.parse_args(argv)

    q, k, v = synthetic_qkv(length=args.length)
    print(f"synthetic q {tuple(q.shape)}, k/v {tuple(k.shape)} (B, H, S, D), RoPE'd, fp32, CPU")
    t0 = time.perf_counter()
    ref = dense_causal(q, k, v)
    t_dense = time.perf_counter() - t0
    mass = block_attention_mass(q, k)
    print(f"{'scorer':<10} {'density':>8} {'recall':>8} {'rel.err':>9} {'time s':>8}")
    print(f"{'dense':<10} {1.0:>8.3f} {1.0:>8.3f} {0.0:>9.2e} {t_dense:>8.3f}")
    for name in args.scorers:
        sparse_attention(
            q, k, v, scorer=name, backend=args.backend, threshold=args.threshold
        )  # warm-up
        t0 = time.perf_counter()
        out, sel = sparse_attention(
            q,
            k,
            v,
            scorer=name,
            backend=args.backend,
            threshold=args.threshold,
            return_selection=True,
        )
        dt = time.perf_counter() - t0
        err = ((out - ref).norm() / ref.norm()).item()
        rec = attention_recall(mass, sel).mean().item()
        print(f"{name:<10} {sel.density:>8.3f} {rec:>8.3f} {err:>9.2e} {dt:>8.3f}")


if __name__ == "__main__":
    main()
