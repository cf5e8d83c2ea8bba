"""Issue 11: the probe scorer's pooled-key mixture (``pooled_mix``) — recall at equal density
against the top-p block oracle on the embedded SmolLM2-135M, CPU float32, at 4K / 8K (trained
RoPE) and 32K (YaRN factor 4, as the real-model benchmark runs past 8K). Same text and layers as
``prism/configs/experiments/probe_topp_oracle_recall.yaml`` and ``recall_32k_yarn.py`` (whose log
has mean-pool / Prism / XAttention at 32K).

Per length: one capture and one exact block mass per layer (cached under ``--cache``: the 32K
capture + masses take ~25 min on 2 cores), every estimator's block probabilities computed once
and swept over top-p thresholds (``evaluate_scorer(..., probs=)``). Prints, per estimator, the
recall interpolated at densities 0.10 / 0.15 / 0.20 / 0.25 / 0.30 / 0.40 and its gap to the
oracle; then the per-row recall tail (the share of a query block's mass kept: quantiles over
all rows, heads, layers) of the probes alone and of the default mixture at about equal density.

    python benchmarks/results/probe_pooled_mix_recall.py > benchmarks/results/probe_pooled_mix_recall.log
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from prism.eval.config import load_experiment
from prism.eval.recall import LayerData, evaluate_scorer, recall_at_density
from prism.eval.runner import Runner
from prism.masks import block_causal
from prism.scorers import build_scorer

ROOT = Path(__file__).resolve().parents[2]
TH = [0.1, 0.3, 0.5, 0.7, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.96, 0.97, 0.98, 0.99, 0.995]
DENS = [0.10, 0.15, 0.20, 0.25, 0.30, 0.40]
YARN = "model.rope_scaling={rope_type: yarn, factor: 4.0, original_max_position_embeddings: 8192}"
VARIANTS = [  # (label, probe-scorer params); the probe block probabilities are computed once each
    ("probe P=2 (default)", {}),
    ("P=2 + pooled 0.15 /8", {"pooled_mix": 0.15}),
    ("P=2 + pooled 0.3 /8", {"pooled_mix": 0.3}),
    ("P=2 + pooled 0.45 /8", {"pooled_mix": 0.45}),
    ("P=2 + pooled 0.3 /1", {"pooled_mix": 0.3, "pooled_stride": 1}),
    ("P=2 + pooled 0.3 /32", {"pooled_mix": 0.3, "pooled_stride": 32}),
    ("probe P=3", {"probes": 3}),
    ("P=3 + pooled 0.2 /8", {"probes": 3, "pooled_mix": 0.2}),
    ("probe P=4", {"probes": 4}),
    ("P=4 + pooled 0.15 /8", {"probes": 4, "pooled_mix": 0.15}),
]


def layers_at(length: int, cache: Path) -> dict[int, LayerData]:
    path = cache / f"recall_L{length}.pt"
    if path.exists():
        raw = torch.load(path)
    else:
        over = ["progress=false", f"length=[{length}]"] + ([YARN] if length > 8192 else [])
        cfg = load_experiment(
            ROOT / "prism/configs/experiments/probe_topp_oracle_recall.yaml", over
        )
        runner = Runner(cfg)
        point = next(p for p in runner.points if p["length"] == length)
        raw = {
            li: {"q": ld.q, "k": ld.k, "mass": ld.mass, "bs": ld.block_size, "chunk": ld.chunk}
            for li, ld in runner.layer_data(point).items()
        }
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(raw, path)
    out = {}
    for li, d in raw.items():
        ld = LayerData(d["q"], d["k"], d["bs"], d["chunk"])
        ld._mass = d["mass"]
        out[li] = ld
    return out


def fmt(r, ref=None):
    s = " / ".join("  –   " if x is None else f"{x:.4f}" for x in r)
    if ref is not None:
        gaps = [None if a is None or b is None else a - b for a, b in zip(r, ref)]
        s += "   gap " + " ".join("  –  " if g is None else f"{g:+.4f}" for g in gaps)
    return s


def sweep(layers, scorer, probs):
    pts = []
    for th in TH:
        r = evaluate_scorer(build_scorer(scorer, threshold=th), layers, probs)
        pts.append((r["density"], r["recall"]))
    return [recall_at_density(pts, d) for d in DENS]


def row_tail(layers, params, threshold):
    sc = build_scorer("probe", impl="torch", threshold=threshold, **params)
    recs, dens = [], []
    for ld in layers.values():
        vis, _ = block_causal(ld.q.shape[2], ld.k.shape[2], ld.block_size)
        keep = sc(ld.q, ld.k).mask & vis
        recs.append(((ld.mass * keep).sum(-1) / ld.mass.sum(-1)).flatten())
        dens.append(float(keep.sum() / (vis.sum() * keep.shape[1])))
    r = torch.cat(recs)
    qs = torch.quantile(r, torch.tensor([0.001, 0.01, 0.05, 0.5]))
    return (
        f"threshold {threshold}: density {sum(dens) / len(dens):.4f}, row recall mean {r.mean():.4f},"
        f" quantiles 0.1%/1%/5%/50% {' / '.join(f'{float(x):.3f}' for x in qs)},"
        f" rows < 0.8: {float((r < 0.8).float().mean()) * 100:.2f} %"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="4096,8192,32768")
    ap.add_argument("--cache", default="/tmp/prism_recall_cache")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    for length in [int(x) for x in a.lengths.split(",")]:
        t0 = time.time()
        layers = layers_at(length, Path(a.cache))
        print(f"== {length} tokens ({len(layers)} layers; data ready in {time.time() - t0:.0f} s)")

        mass_p = {li: ld.mass / ld.mass.sum(-1, keepdim=True) for li, ld in layers.items()}
        ref = sweep(layers, "oracle", mass_p)
        print(f"{'oracle top-p':24s} {fmt(ref)}", flush=True)
        for label, params in VARIANTS:
            sc = build_scorer("probe", impl="torch", **params)
            probs = {li: sc.block_probs(ld.q, ld.k) for li, ld in layers.items()}
            print(f"{label:24s} {fmt(sweep(layers, 'probe', probs), ref)}", flush=True)
        print("row recall tail, probes alone   ", row_tail(layers, {}, 0.93))
        print("row recall tail, + pooled 0.3 /8", row_tail(layers, {"pooled_mix": 0.3}, 0.92))
        print(f"({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
