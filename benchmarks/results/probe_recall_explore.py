"""Hybrids of the exact probes with pooled scores (issue 11, part 3), on the data of probe_recall.

    python benchmarks/results/probe_recall_explore.py [lengths...]   # default 8192

First runs the harness on ``prism/configs/experiments/probe_recall.yaml`` exactly as
``python -m prism.eval`` does (finished points are skipped), then reuses its captured post-RoPE
Q/K and exact block masses (same model, text, layers) to sweep the
threshold of estimators that are not registered scorers, and appends harness-shaped records to
benchmarks/results/probe_recall_explore.jsonl (summarised by probe_recall_summary.py):

* ``mix(a)``: ``(1 − a) · probe2 + a · meanpool`` block probabilities (both rows sum to 1), top-p;
* ``union``: top-p of probe2 OR top-p of meanpool at the same threshold;
* ``meanq``: one probe per block whose query is the block's *mean* query (exact softmax over the
  keys the block's last row sees), and ``ends+meanq``: the 2 end probes plus it (weights 1/3);
* ``probe2^g``: the 2-probe estimate sharpened / flattened, ``p**g`` renormalised per row.

All with the forced sink + diagonal blocks of the other scorers.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from prism.eval.config import load_experiment
from prism.eval.recall import selection_stats, summarise
from prism.eval.runner import Runner
from prism.masks import apply_rule, block_causal
from prism.scorers import build_scorer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
THRESHOLDS = (0.2, 0.35, 0.5, 0.7, 0.8, 0.85, 0.9, 0.94, 0.97)


def meanq_probs(q: torch.Tensor, k: torch.Tensor, bs: int) -> torch.Tensor:
    """float32 [B, Hq, NQB, NKB]: exact causal softmax of each block's mean query over the keys
    its last row sees, summed into KV blocks."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    nqb, nkb = -(-sq // bs), -(-sk // bs)
    qm = torch.stack(
        [q[:, :, i * bs : min((i + 1) * bs, sq)].float().mean(2) for i in range(nqb)], 2
    )
    s = torch.matmul(qm.view(b, hkv, g * nqb, d), k.float().transpose(-1, -2))
    s = s.view(b, hq, nqb, sk) * d**-0.5
    last = (sk - sq) + torch.clamp((torch.arange(nqb) + 1) * bs, max=sq) - 1
    s = s.masked_fill(torch.arange(sk)[None, :] > last[:, None], float("-inf")).softmax(-1)
    s = torch.nn.functional.pad(s, (0, nkb * bs - sk))
    return s.view(b, hq, nqb, nkb, bs).sum(-1)


def main(lengths: list[int]) -> None:
    cfg = load_experiment(ROOT / "prism/configs/experiments/probe_recall.yaml", ["progress=false"])
    runner = Runner(cfg)
    runner.run()  # the harness points (finished ones are skipped); keeps the captured layers
    out = HERE / "probe_recall_explore.jsonl"
    done = {(r["length"], r["family"], r["params"]["threshold"]) for r in _read(out)}
    probe2 = build_scorer("probe", probes=2, placement="ends")
    mean = build_scorer("meanpool")
    for length in lengths:
        point = next(p for p in runner.points if p["length"] == length)
        t0 = time.perf_counter()
        layers = runner.layer_data(point)
        # estimates per layer, computed once: [B, Hq, NQB, NKB] each
        est = {}
        for li, ld in layers.items():
            p2 = probe2.block_probs(ld.q, ld.k)
            mp = mean.block_probs(ld.q, ld.k)
            mq = meanq_probs(ld.q, ld.k, 128)
            est[li] = {
                "mix(a=0.1)": 0.9 * p2 + 0.1 * mp,
                "mix(a=0.25)": 0.75 * p2 + 0.25 * mp,
                "mix(a=0.5)": 0.5 * p2 + 0.5 * mp,
                "meanq": mq,
                "ends+meanq": (2 * p2 + mq) / 3,
                "probe2^0.7": _power(p2, 0.7),
                "probe2^1.3": _power(p2, 1.3),
                "union(probe2, meanpool)": (p2, mp),
            }
            _ = ld.mass  # exact mass (cached by the harness object)
        print(f"L={length}: captured + estimated in {time.perf_counter() - t0:.0f}s", flush=True)
        names = list(next(iter(est.values())))
        with open(out, "a", encoding="utf-8") as fh:
            for name in names:
                for t in THRESHOLDS:
                    if (length, name, t) in done:
                        continue
                    per = {"recall": [], "density": [], "oracle_density": []}
                    per["oracle_row_density"] = []
                    for li in sorted(layers):
                        ld = layers[li]
                        sq, sk = ld.q.shape[2], ld.k.shape[2]
                        visible, _ = block_causal(sq, sk, 128)
                        e = est[li][name]
                        if isinstance(e, tuple):
                            keep = apply_rule(e[0], visible, "top_p", t, 16, 0.01)
                            keep = keep | apply_rule(e[1], visible, "top_p", t, 16, 0.01)
                        else:
                            keep = apply_rule(e, visible, "top_p", t, 16, 0.01)
                        sel = probe2.finalize(keep, sq, sk)
                        for key, val in selection_stats(ld.mass, sel).items():
                            per[key].append(val[0].tolist())
                    res = summarise(per, sorted(layers))
                    rec = {
                        "experiment": "probe_recall_explore",
                        "metric": "recall",
                        "length": length,
                        "scorer": f"{name}(threshold={t})",
                        "family": name,
                        "scorer_name": "explore",
                        "params": {"threshold": t},
                        "result": res,
                    }
                    fh.write(json.dumps(rec) + "\n")
                    fh.flush()
                    print(
                        f"L={length} {name:<26} t={t:<5} density {res['density']:.3f} "
                        f"recall {res['recall']:.4f}",
                        flush=True,
                    )


def _power(p: torch.Tensor, g: float) -> torch.Tensor:
    x = p.clamp_min(0).pow(g)
    return x / x.sum(-1, keepdim=True)


def _read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or [8192])
