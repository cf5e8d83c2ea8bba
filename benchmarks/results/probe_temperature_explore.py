"""Issue 11, session 10: two more cheap variants of the shared 2-probe estimate (1 computed probe
per block), recall at equal density against the block oracle, embedded SmolLM2-135M, the data,
layers and oracle of ``prism/configs/experiments/probe_shared_recall.yaml``:

* a softmax temperature T on the probe logits (``q / T``; T > 1 flattens each probe's
  distribution toward the block's average over its 128 queries);
* no forced diagonal block (``FORCE_DIAG=0``; the sink stays).

    python benchmarks/results/probe_temperature_explore.py 4096,8192 1.0 1.1 1.2
    FORCE_DIAG=0 python benchmarks/results/probe_temperature_explore.py 4096,8192 1.0 1.1

Raw output: ``probe_temperature_explore.log`` / ``probe_temperature_explore_nodiag.log``. Its loops
were later replaced by ``prism.eval.recall.evaluate_scorer`` / ``evaluate_oracle``; re-run
(``4096 1.0``) it prints the logged 4K lines unchanged.
"""

import os
import sys
import time
from pathlib import Path

import torch

from prism.eval.config import load_experiment
from prism.eval.recall import evaluate_oracle, evaluate_scorer, recall_at_density
from prism.eval.runner import Runner
from prism.scorers import build_scorer

ROOT = Path(__file__).resolve().parents[2]
torch.set_num_threads(2)
cfg = load_experiment(
    ROOT / "prism/configs/experiments/probe_shared_recall.yaml", ["progress=false"]
)
runner = Runner(cfg)
TH = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.96, 0.97, 0.98, 0.99]  # fmt: skip
TARGETS = [0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.84, 0.87, 0.9, 0.92, 0.94, 0.96, 0.97, 0.98, 0.99, 0.995]  # fmt: skip
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
        o = evaluate_oracle(layers, t, "row")
        opts.append((o["density"], o["recall"]))
    orc = [recall_at_density(opts, d) for d in DENS]
    print("oracle", length, [None if x is None else round(x, 4) for x in orc], flush=True)
    cfg = dict(
        probes=int(os.environ.get("P", "2")),
        placement="shared",
        impl="torch",
        force_diagonal=FD,
        force_sink=FS,
    )
    sc = build_scorer("probe", **cfg)
    print("force_diagonal", FD, "force_sink", FS, "P", sc.config.probes, flush=True)
    for T in temps:
        probs = {li: sc.block_probs(ld.q / T, ld.k) for li, ld in layers.items()}
        pts = []
        for th in TH:
            res = evaluate_scorer(build_scorer("probe", threshold=th, **cfg), layers, probs)
            pts.append((res["density"], res["recall"]))
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
