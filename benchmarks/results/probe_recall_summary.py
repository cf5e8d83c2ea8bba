"""Recall at equal density from the probe_recall results (issue 11), oracles included.

    python benchmarks/results/probe_recall_summary.py  > benchmarks/results/probe_recall_tables.md

Reads benchmarks/results/probe_recall.jsonl (the ``python -m prism.eval`` run) and, if present,
probe_recall_explore.jsonl (the hybrids of probe_recall_explore.py). Every family's threshold sweep
gives (density, recall) points (means over sampled layers x heads); recall at a density is the
linear interpolation between the two bracketing points ("–" outside the swept range). The oracle
families are the harness's oracle points at its recall targets, interpolated the same way.
Per-layer tables interpolate each layer's own (density, recall) points.
"""

from __future__ import annotations

import sys
from pathlib import Path

from prism.eval.recall import recall_at_density
from prism.eval.runner import markdown_table, read_records

HERE = Path(__file__).resolve().parent
DENSITIES = (0.10, 0.15, 0.20, 0.25, 0.30, 0.40)
MAIN = (
    "oracle-row",
    "oracle-head",
    "probe(probes=2, placement=ends)",
    "probe(probes=1, placement=middle)",
    "xattn",
    "meanpool",
    "prism",
)
SHORT = {
    "oracle-row": "block oracle (top-p of the true mass per row)",
    "oracle-head": "head oracle (top of the true mass per head map)",
    "probe(probes=2, placement=ends)": "probe: 2 exact (first + last)",
    "probe(probes=1, placement=middle)": "probe: 1 exact (middle)",
    "xattn": "XAttention (stride 8)",
    "meanpool": "mean-pool",
    "prism": "Prism (published defaults)",
}


def family_of(r: dict) -> str:
    return r["scorer_name"] if r["scorer_name"].startswith("oracle-") else r["family"]


def curves(records):
    """{(length, family): [(density, recall, recall_min, per-layer densities, recalls)]}."""
    out: dict[tuple[int, str], list] = {}
    for r in records:
        if r.get("metric") != "recall":
            continue
        res = r["result"]
        out.setdefault((r["length"], family_of(r)), []).append(
            (
                res["density"],
                res["recall"],
                res.get("recall_min"),
                res.get("density_per_layer"),
                res.get("recall_per_layer"),
                res.get("layers"),
            )
        )
    return out


def at(pts, d, col=1):
    v = recall_at_density([(p[0], p[col]) for p in pts if p[col] is not None], d)
    return v


def fmt(v):
    return "–" if v is None else f"{v:.3f}"


def main() -> str:
    recs = read_records(HERE / "probe_recall.jsonl") + read_records(
        HERE / "probe_recall_explore.jsonl"
    )
    cv = curves(recs)
    lengths = sorted({k[0] for k in cv})
    fams = sorted({k[1] for k in cv})
    parts = [
        "# Probe scorer recall study (issue 11)\n",
        "Embedded SmolLM2-135M (30 layers, 9 query / 3 KV heads, D = 64), pydoc text, block 128, "
        "15 sampled layers (0, 2, …, 28), all heads. Recall = share of the true causal softmax "
        "mass inside the selected blocks (mean over layers x heads); density = selected / causal "
        "blocks. Each family sweeps its threshold; the numbers are interpolated at equal density. "
        "Scorers include their forced sink + diagonal blocks; the oracles have none. Command: "
        "`probe_recall_cmd.txt`.\n",
    ]
    for length in lengths:
        rows = []
        for f in [*MAIN, *(f for f in fams if f not in MAIN)]:
            pts = cv.get((length, f))
            if not pts:
                continue
            rows.append([SHORT.get(f, f), *(fmt(at(pts, d)) for d in DENSITIES)])
        parts.append(
            f"## Recall at equal density, {length} tokens\n\n"
            + markdown_table(["estimator", *(f"{d:.2f}" for d in DENSITIES)], rows)
        )
        oracle = cv.get((length, "oracle-row"))
        if oracle:
            rows = []
            for f in [*MAIN[2:], *(f for f in fams if f not in MAIN)]:
                pts = cv.get((length, f))
                if not pts:
                    continue
                cells = []
                for d in DENSITIES:
                    a, o = at(pts, d), at(oracle, d)
                    cells.append("–" if a is None or o is None else f"{a - o:+.3f}")
                rows.append([SHORT.get(f, f), *cells])
            parts.append(
                f"### Gap to the block oracle (recall − oracle-row recall), {length} tokens\n\n"
                + markdown_table(["estimator", *(f"{d:.2f}" for d in DENSITIES)], rows)
            )
        rows = []
        for f in MAIN[2:]:
            pts = cv.get((length, f))
            if not pts:
                continue
            rows.append([SHORT.get(f, f), *(fmt(at(pts, d, 2)) for d in DENSITIES)])
        parts.append(
            f"### Worst (layer, head) recall at equal mean density, {length} tokens\n\n"
            + markdown_table(["estimator", *(f"{d:.2f}" for d in DENSITIES)], rows)
        )
        # per layer, at density 0.20 (each layer's own sweep)
        d0 = 0.20
        layer_ids = None
        table = []
        for f in MAIN:
            pts = cv.get((length, f))
            if not pts or pts[0][3] is None:
                continue
            layer_ids = pts[0][5]
            vals = []
            for li in range(len(layer_ids)):
                lp = [(p[3][li], p[4][li]) for p in pts]
                vals.append(fmt(recall_at_density(lp, d0)))
            table.append([SHORT.get(f, f), *vals])
        if table:
            parts.append(
                f"### Per-layer recall at density {d0:.2f} (each layer's own sweep), "
                f"{length} tokens\n\n"
                + markdown_table(["estimator", *(f"L{x}" for x in layer_ids)], table)
            )
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    text = main()
    sys.stdout.write(text)
