"""Issue 11 at 32K: recall at equal density on the embedded SmolLM2-135M with YaRN (factor 4,
as the real-model benchmark runs past the trained 8K), CPU float32, same text and layers as
``prism/configs/experiments/probe_topp_oracle_recall.yaml``.

One capture and one exact block mass per layer (the harness's ``LayerData``); each estimator's
block probabilities are computed once and swept over top-p thresholds (``prism``, ``xattn``:
the scorer is called per threshold). Oracles: ``oracle-topp`` (the true mass through the same
top-p + forced blocks, the ``oracle`` scorer's selection) and ``oracle-row`` (the harness's row
floor, no forced blocks). Prints one line per estimator: recall interpolated at densities
0.10 / 0.15 / 0.20 / 0.25 / 0.30 / 0.40.

    python benchmarks/results/recall_32k_yarn.py > benchmarks/results/recall_32k_yarn.log

After the logged run (1719 s) its loops were replaced by ``prism.eval.recall.evaluate_scorer``
(with precomputed ``probs``) and ``evaluate_oracle``; not re-run since. The same change to
``probe_temperature_explore.py`` reproduces that script's logged 4K line digit for digit.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from prism.eval.config import load_experiment
from prism.eval.recall import evaluate_oracle, evaluate_scorer, recall_at_density
from prism.eval.runner import Runner
from prism.scorers import build_scorer

ROOT = Path(__file__).resolve().parents[2]
LENGTH = 32768
TH = [0.1, 0.3, 0.5, 0.7, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.96, 0.97, 0.98, 0.99, 0.995]
TARGETS = [0.5, 0.7, 0.8, 0.87, 0.9, 0.92, 0.94, 0.96, 0.97, 0.98, 0.99, 0.995]
DENS = [0.10, 0.15, 0.20, 0.25, 0.30, 0.40]


def fmt(r):
    return " / ".join("–" if x is None else f"{x:.4f}" for x in r)


def main() -> None:
    torch.set_num_threads(2)
    cfg = load_experiment(
        ROOT / "prism/configs/experiments/probe_topp_oracle_recall.yaml",
        [
            "progress=false",
            f"length=[{LENGTH}]",
            "model.rope_scaling={rope_type: yarn, factor: 4.0, original_max_position_embeddings: 8192}",
        ],
    )
    runner = Runner(cfg)
    point = next(p for p in runner.points if p["length"] == LENGTH)
    t0 = time.time()
    layers = runner.layer_data(point)
    for ld in layers.values():
        ld.mass  # noqa: B018 (computed once here, timed)
    print(f"captured + masses at {LENGTH}: {time.time() - t0:.0f} s", flush=True)

    def sweep(name, scorer, probs=None, **cfg):
        pts = []
        for th in TH:
            res = evaluate_scorer(build_scorer(scorer, threshold=th, **cfg), layers, probs)
            pts.append((res["density"], res["recall"]))
        print(f"{name}: {fmt([recall_at_density(pts, d) for d in DENS])}", flush=True)

    # the row floor (no forced blocks)
    pts = []
    for t in TARGETS:
        o = evaluate_oracle(layers, t, "row")
        pts.append((o["density"], o["recall"]))
    print(f"oracle-row: {fmt([recall_at_density(pts, d) for d in DENS])}", flush=True)
    probs = {li: ld.mass / ld.mass.sum(-1, keepdim=True) for li, ld in layers.items()}
    sweep("oracle-topp", "oracle", probs)
    for p in (2, 4):
        cfg = dict(probes=p, placement="shared", impl="torch")
        sc = build_scorer("probe", **cfg)
        probs = {li: sc.block_probs(ld.q, ld.k) for li, ld in layers.items()}
        sweep(f"probe shared P={p}", "probe", probs, **cfg)
    mp = build_scorer("meanpool", impl="torch")
    sweep("meanpool", "meanpool", {li: mp.block_probs(ld.q, ld.k) for li, ld in layers.items()})
    sweep("prism", "prism")
    sweep("xattn", "xattn")
    print(f"total {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
