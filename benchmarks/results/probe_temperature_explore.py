"""Issue 11, session 10: two more cheap variants of the shared 2-probe estimate (1 computed probe
per block), recall at equal density against the block oracle, embedded SmolLM2-135M, the data,
layers and oracle of ``prism/configs/experiments/probe_shared_recall.yaml``:

* a softmax temperature T on the probe logits (``q / T``; T > 1 flattens each probe's
  distribution toward the block's average over its 128 queries);
* no forced diagonal block (``FORCE_DIAG=0``; the sink stays).

    python benchmarks/results/probe_temperature_explore.py 4096,8192 1.0 1.1 1.2
    FORCE_DIAG=0 python benchmarks/results/probe_temperature_explore.py 4096,8192 1.0 1.1

Raw output: ``probe_temperature_explore.log`` / ``probe_temperature_explore_nodiag.log``.
"""

import os
import sys
import time
from pathlib import Path

import torch

from prism.eval.config import load_experiment
from prism.eval.recall import oracle_selection, recall_at_density, selection_stats
from prism.eval.runner import Runner
from prism.masks import apply_rule, block_causal
from prism.metrics import attention_recall
from prism.scorers import build_scorer

ROOT = Path(__file__).resolve().parents[2]
torch.set_num_threads(2)
cfg = load_experiment(
    ROOT / "prism/configs/experiments/probe_shared_recall.yaml", ["progress=false"]
)
runner = Runner(cfg)
TH = [
    0.1,
    0.2,
    0.3,
    0.4,
    0.5,
    0.6,
    0.7,
    0.75,
    0.8,
    0.85,
    0.88,
    0.9,
    0.92,
    0.94,
    0.96,
    0.97,
    0.98,
    0.99,
]
TARGETS = [
    0.4,
    0.5,
    0.6,
    0.7,
    0.75,
    0.8,
    0.84,
    0.87,
    0.9,
    0.92,
    0.94,
    0.96,
    0.97,
    0.98,
    0.99,
    0.995,
]
DENS = [0.10, 0.15, 0.20, 0.25, 0.30, 0.40]
temps = [float(x) for x in sys.argv[2:]] or [1.0, 1.15, 1.3]
FD = os.environ.get("FORCE_DIAG", "1") == "1"
FS = os.environ.get("FORCE_SINK", "1") == "1"
for length in [int(x) for x in sys.argv[1].split(",")]:
    point = next(p for p in runner.points if p["length"] == length)
    t0 = time.time()
    layers = runner.layer_data(point)
    print("captured", length, time.time() - t0, flush=True)
    # oracle curve (row mode)
    opts = []
    for t in TARGETS:
        rs, ds = [], []
        for ld in layers.values():
            vis = ld.visible()
            sel = oracle_selection(ld.mass, t, "row") & vis
            rs.append(attention_recall(ld.mass, sel)[0].mean().item())
            ds.append((sel.sum(dim=(-2, -1)).float() / vis.sum().float())[0].mean().item())
        opts.append((sum(ds) / len(ds), sum(rs) / len(rs)))
    orc = [recall_at_density(opts, d) for d in DENS]
    print("oracle", length, [None if x is None else round(x, 4) for x in orc], flush=True)
    sc = build_scorer(
        "probe",
        probes=int(os.environ.get("P", "2")),
        placement="shared",
        impl="torch",
        force_diagonal=FD,
        force_sink=FS,
    )
    print("force_diagonal", FD, "force_sink", FS, "P", sc.config.probes, flush=True)
    for T in temps:
        probs = {li: sc.block_probs(ld.q / T, ld.k) for li, ld in layers.items()}
        pts = []
        for th in TH:
            rs, ds = [], []
            for li, ld in layers.items():
                sq = ld.q.shape[2]
                vis, _ = block_causal(sq, sq, 128)
                keep = apply_rule(probs[li], vis, "top_p", th, 0, 0.0)
                sel = sc.finalize(keep, sq, sq)
                st = selection_stats(ld.mass, sel)
                rs.append(st["recall"][0].mean().item())
                ds.append(st["density"][0].mean().item())
            pts.append((sum(ds) / len(ds), sum(rs) / len(rs)))
        r = [recall_at_density(pts, d) for d in DENS]
        gap = [None if (a is None or b is None) else round(a - b, 4) for a, b in zip(r, orc)]
        print(
            "T",
            T,
            length,
            "recall",
            [None if x is None else round(x, 4) for x in r],
            "gap",
            gap,
            flush=True,
        )
