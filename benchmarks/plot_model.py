"""Plots and a markdown table from ``bench_model.py``'s CSV (run anywhere, no GPU needed).

    python benchmarks/plot_model.py csv=benchmarks/results/model_h200.csv out=benchmarks/results/model_h200

Writes ``<out>_speedup.png`` (whole pre-fill speed-up vs length, one line per policy),
``<out>_dppl.png`` (ΔPPL vs speed-up), ``<out>_breakdown.png`` (time split at the longest
length: non-attention, estimator, sparse kernel, the rest of the attention calls) and
``<out>_table.md``.
"""

from __future__ import annotations

import csv
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@dataclass
class Defaults:
    csv: str = "benchmarks/results/model_h200.csv"
    out: str = "benchmarks/results/model_h200"
    title: str = "SmolLM2-135M, H200, bf16"


def _num(v: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def read(path: str) -> list[dict]:
    """The CSV rows; a (length, policy) measured twice keeps the last row."""
    rows: dict = {}
    with open(path) as fh:
        for r in csv.DictReader(fh):
            r = {k: (v if k in ("policy", "error") else _num(v)) for k, v in r.items()}
            rows[(r["length"], r["policy"])] = r
    return list(rows.values())


def markdown(rows: list[dict]) -> str:
    cols = [
        ("length", "length", "{:.0f}"),
        ("policy", "policy", "{}"),
        ("prefill_ms", "pre-fill ms", "{:.1f}"),
        ("speedup", "vs dense", "{:.2f}×"),
        ("attn_ms", "attention ms", "{:.1f}"),
        ("est_ms", "estimator ms", "{:.2f}"),
        ("kernel_ms", "kernel ms", "{:.1f}"),
        ("cudnn_ms", "dense cuDNN attn ms", "{:.1f}"),
        ("density", "density", "{:.3f}"),
        ("dppl", "ΔPPL %", "{:+.2f}"),
        ("peak_gb", "peak GB", "{:.2f}"),
    ]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in sorted(rows, key=lambda r: (r["length"], r["policy"])):
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            ok = isinstance(v, str) or (v is not None and not math.isnan(v))
            cells.append(fmt.format(v) if ok and v != "" else "–")
        if r.get("error"):
            cells[2] = "error: " + r["error"][:50]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(rows: list[dict], out: str, title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    by_pol = defaultdict(list)
    for r in rows:
        if not math.isnan(r.get("speedup", math.nan)):
            by_pol[r["policy"]].append(r)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for pol, rs in sorted(by_pol.items()):
        rs.sort(key=lambda r: r["length"])
        ax.plot([r["length"] / 1024 for r in rs], [r["speedup"] for r in rs], "o-", label=pol)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt length (K tokens)")
    ax.set_ylabel("whole pre-fill speed-up vs dense HF SDPA")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{out}_speedup.png", dpi=120)
    made.append(f"{out}_speedup.png")
    plt.close(fig)

    pts = [r for r in rows if not math.isnan(r.get("dppl", math.nan)) and r["policy"] != "dense"]
    if pts:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for length in sorted({r["length"] for r in pts}):
            rs = [r for r in pts if r["length"] == length]
            ax.scatter(
                [r["speedup"] for r in rs], [r["dppl"] for r in rs], label=f"{length // 1024}K"
            )
            for r in rs:
                ax.annotate(r["policy"], (r["speedup"], r["dppl"]), fontsize=6)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xlabel("whole pre-fill speed-up vs dense")
        ax.set_ylabel("ΔPPL vs dense (%)")
        ax.set_title(title)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(f"{out}_dppl.png", dpi=120)
        made.append(f"{out}_dppl.png")
        plt.close(fig)

    longest = max(r["length"] for r in rows)
    rs = sorted(
        (
            r
            for r in rows
            if r["length"] == longest and not math.isnan(r.get("prefill_ms", math.nan))
        ),
        key=lambda r: r["policy"],
    )
    if rs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        names = [r["policy"] for r in rs]
        null = [r["null_ms"] for r in rs]
        est = [0.0 if math.isnan(r.get("est_ms", math.nan)) else r["est_ms"] for r in rs]
        ker = [
            (r["attn_ms"] if r["policy"].startswith("dense") else r.get("kernel_ms", math.nan))
            for r in rs
        ]
        ker = [0.0 if math.isnan(x) else x for x in ker]
        other = [max(0.0, r["attn_ms"] - e - k) for r, e, k in zip(rs, est, ker)]
        x = range(len(rs))
        ax.bar(x, null, label="non-attention")
        ax.bar(x, est, bottom=null, label="estimator + BlockMask")
        b2 = [a + b for a, b in zip(null, est)]
        ax.bar(x, ker, bottom=b2, label="attention kernel")
        b3 = [a + b for a, b in zip(b2, ker)]
        ax.bar(x, other, bottom=b3, label="other attention-call overhead")
        ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("ms")
        ax.set_title(f"{title}: time split at {longest // 1024}K")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(f"{out}_breakdown.png", dpi=120)
        made.append(f"{out}_breakdown.png")
        plt.close(fig)
    return made


def main(argv=None) -> None:
    from prism.cli import parse_cli

    cfg = parse_cli(Defaults, argv, description=__doc__)
    rows = read(cfg.csv)
    table = markdown(rows)
    Path(f"{cfg.out}_table.md").write_text(table + "\n")
    print(table)
    for p in plots(rows, cfg.out, cfg.title):
        print("wrote", p)


if __name__ == "__main__":
    main()
