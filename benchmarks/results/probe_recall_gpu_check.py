"""Sanity check of the PyTorch probe scorer on a GPU: peak extra memory and time at 8K-128K.

    python benchmarks/results/probe_recall_gpu_check.py    # writes $OUT/gpu_probe.json if set

B = 1, Hq = 32, Hkv = 8, D = 128, bf16, random q/k, probes = 2 (ends), chunk_mb = 256. This is
the reference PyTorch path (no Triton kernel): the numbers bound memory, they are not the
estimator's target speed.
"""

from __future__ import annotations

import json
import os

import torch
from triton.testing import do_bench

import prism


def measure(s: int, chunk_mb: int = 256) -> dict:
    torch.manual_seed(0)
    q = torch.randn(1, 32, s, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, s, 128, device="cuda", dtype=torch.bfloat16)
    scorer = prism.build_scorer("probe", probes=2, threshold=0.9, chunk_mb=chunk_mb)
    scorer(q, k)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    sel = scorer(q, k)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return {
        "S": s,
        "chunk_mb": chunk_mb,
        "peak_extra_MiB": round(peak / 2**20, 1),
        "select_ms": do_bench(lambda: scorer(q, k), warmup=3, rep=20),
        "block_probs_ms": do_bench(lambda: scorer.block_probs(q, k), warmup=3, rep=20),
        "density": sel.density,
    }


def main() -> None:
    out = {}
    for s in (8192, 32768, 131072):
        out[str(s)] = measure(s)
        print(out[str(s)], flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_probe.json"), "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
