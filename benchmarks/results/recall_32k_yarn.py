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
"""

from __future__ import annotations

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

    def sweep(name, scorer, probs=None):
        pts = []
        for th in TH:
            rs, ds = [], []
            for li, ld in layers.items():
                sq = ld.q.shape[2]
                if probs is None:
                    sel = build_scorer(name, threshold=th)(ld.q, ld.k)
                else:
                    vis, _ = block_causal(sq, sq, 128)
                    keep = apply_rule(probs[li], vis, "top_p", th, 0, 0.0)
                    sel = scorer.finalize(keep, sq, sq)
                st = selection_stats(ld.mass, sel)
                rs.append(st["recall"][0].mean().item())
                ds.append(st["density"][0].mean().item())
            pts.append((sum(ds) / len(ds), sum(rs) / len(rs)))
        print(f"{name}: {fmt([recall_at_density(pts, d) for d in DENS])}", flush=True)

    # the row floor (no forced blocks)
    pts = []
    for t in TARGETS:
        rs, ds = [], []
        for ld in layers.values():
            vis = ld.visible()
            sel = oracle_selection(ld.mass, t, "row") & vis
            rs.append(attention_recall(ld.mass, sel)[0].mean().item())
            ds.append((sel.sum(dim=(-2, -1)).float() / vis.sum().float())[0].mean().item())
        pts.append((sum(ds) / len(ds), sum(rs) / len(rs)))
    print(f"oracle-row: {fmt([recall_at_density(pts, d) for d in DENS])}", flush=True)
    oracle = build_scorer("oracle")
    sweep(
        "oracle-topp",
        oracle,
        {li: ld.mass / ld.mass.sum(-1, keepdim=True) for li, ld in layers.items()},
    )
    for p in (2, 4):
        sc = build_scorer("probe", probes=p, placement="shared", impl="torch")
        sweep(
            f"probe shared P={p}", sc, {li: sc.block_probs(ld.q, ld.k) for li, ld in layers.items()}
        )
    mp = build_scorer("meanpool", impl="torch")
    sweep("meanpool", mp, {li: mp.block_probs(ld.q, ld.k) for li, ld in layers.items()})
    sweep("prism", None)
    sweep("xattn", None)
    print(f"total {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
