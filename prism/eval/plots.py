"""Plots (matplotlib, PNG) from result records.

* ``<name>_pareto.png`` — recall vs density per scorer family (one panel per length), with the
  per-head and per-row oracle floors.
* ``<name>_density_heatmap.png`` — density per (layer, head) for each scorer family at its
  default setting (the sweep point closest to the scorer's default knob), longest length.
* ``<name>_dppl_speedup.png`` — ΔPPL vs attention speed-up. The speed-up is read from a GPU
  benchmark CSV, one of three formats:

  - rows ``scorer/name, length, speedup``: looked up directly;
  - the end-to-end benchmark's rows ``S, scorer, density, est_ms, kernel_ms, dense_cudnn_ms``
    (``e2e_h200.csv``): modelled at the record's density as ``dense / (the scorer's estimator
    time + the best sparse-kernel time per unit density × density)`` (kernel time scales about
    linearly with density; estimator times of scorers the file lacks come from an
    ``estimators_*.csv`` beside it);
  - the kernel benchmark's rows ``S, kernel, density, ms`` (``kernels_h200.csv``): the sparse
    kernel time interpolated at the density, plus the estimator time when known.

  The GPU shapes differ from the evaluated model's, so these are attention speed-ups *modelled*
  for the measured densities, at lengths the benchmark covers; other lengths are left out, and
  without a usable file the plot is skipped with a note.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_MARKERS = "osD^v<>PXh*"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _distance_to_default(name: str, params: Mapping[str, Any]) -> float:
    """How far a variant's density knobs are from the scorer's defaults (relative, summed)."""
    from ..scorers import SCORERS
    from .runner import SWEEP_KNOBS

    if name not in SCORERS:
        return 0.0
    cfg = SCORERS[name].Config()
    dist = 0.0
    for knob in SWEEP_KNOBS:
        default = getattr(cfg, knob, None)
        val = params.get(knob, default)
        if isinstance(default, (int, float)) and isinstance(val, (int, float)):
            dist += abs(float(val) - float(default)) / max(abs(float(default)), 1e-9)
    return dist


def pareto_plot(records: Sequence[Mapping[str, Any]], path: str | Path) -> Path | None:
    rec = [r for r in records if r["metric"] == "recall"]
    if not rec:
        return None
    plt = _plt()
    lengths = sorted({r["length"] for r in rec})
    fig, axes = plt.subplots(1, len(lengths), figsize=(6.2 * len(lengths), 4.8), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        groups: dict[str, list[tuple[float, float]]] = {}
        for r in rec:
            if r["length"] != length:
                continue
            fam = r["scorer_name"] if r["scorer_name"].startswith("oracle-") else r["family"]
            groups.setdefault(fam, []).append((r["result"]["density"], r["result"]["recall"]))
        for i, (fam, pts) in enumerate(sorted(groups.items())):
            pts.sort()
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            if fam.startswith("oracle-"):
                style = {
                    "color": "black" if fam.endswith("head") else "grey",
                    "ls": "--",
                    "marker": ".",
                }
                ax.plot(xs, ys, label=f"{fam} (floor)", **style)
            else:
                ax.plot(xs, ys, marker=_MARKERS[i % len(_MARKERS)], label=fam, ms=4)
        ax.set_xlabel("density (selected / causal blocks)")
        ax.set_ylabel("attention recall (mean over layers × heads)")
        ax.set_title(f"recall vs density, {length} tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def heatmap_plot(records: Sequence[Mapping[str, Any]], path: str | Path) -> Path | None:
    rec = [
        r
        for r in records
        if r["metric"] == "recall"
        and not r["scorer_name"].startswith("oracle-")
        and r["result"].get("density_per_head")
    ]
    if not rec:
        return None
    length = max(r["length"] for r in rec)
    chosen: dict[str, Mapping[str, Any]] = {}
    for r in rec:
        if r["length"] != length:
            continue
        dist = _distance_to_default(r["scorer_name"], r["params"])
        fam = r["family"]
        if fam not in chosen or dist < chosen[fam][0]:
            chosen[fam] = (dist, r)
    plt = _plt()
    fams = sorted(chosen)
    fig, axes = plt.subplots(1, len(fams), figsize=(3.2 * len(fams) + 1, 4.6), squeeze=False)
    im = None
    for ax, fam in zip(axes[0], fams):
        r = chosen[fam][1]
        mat = r["result"]["density_per_head"]
        im = ax.imshow(mat, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_title(f"{r['scorer']}\nmean {r['result']['density']:.3f}", fontsize=8)
        ax.set_xlabel("query head")
        ax.set_xticks(range(len(mat[0])))
        ax.tick_params(axis="x", labelsize=6)
        layers = r["result"]["layers"]
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels(layers, fontsize=6)
        if ax is axes[0][0]:
            ax.set_ylabel("layer")
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="density")
    fig.suptitle(f"density per layer and head, {length} tokens", fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
    pts = sorted(zip(xs, ys))
    if not pts or x < pts[0][0] - 1e-9 or x > pts[-1][0] + 1e-9:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


# the columns of the benchmark CSVs SpeedupTable reads (in the order the benchmarks write them)
E2E_COLUMNS = ("S", "scorer", "backend", "density", "est_ms", "kernel_ms", "dense_cudnn_ms")
DIRECT_COLUMNS = ("scorer", "length", "speedup")
KERNEL_COLUMNS = ("S", "kernel", "density", "ms")
ESTIMATOR_COLUMNS = ("length", "name", "time_ms")


class SpeedupTable:
    """Speed-ups from a GPU benchmark CSV (see the module docstring for the two formats)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        rows = _read_csv(self.path)
        cols = set(rows[0]) if rows else set()
        self.direct: dict[tuple[str, int], float] = {}
        self.kernel: dict[int, dict[str, list[tuple[float, float]]]] = {}
        self.estimator: dict[tuple[str, int], float] = {}
        self.e2e: dict[int, dict[str, float]] = {}
        if set(E2E_COLUMNS) - {"backend"} <= cols:
            for r in rows:
                s, name = int(float(r["S"])), r["scorer"]
                d, est, kern = float(r["density"]), float(r["est_ms"]), float(r["kernel_ms"])
                if not (math.isfinite(kern) and d > 0):
                    continue
                e = self.e2e.setdefault(
                    s, {"dense": float(r["dense_cudnn_ms"]), "per_density": math.inf}
                )
                e["per_density"] = min(
                    e["per_density"], kern / d
                )  # best backend, ms per unit density
                if math.isfinite(est):
                    old = self.estimator.get((name, s), math.inf)
                    self.estimator[(name, s)] = min(old, est)
            self._read_estimators()
        elif {"speedup", "length"} <= cols and ({"scorer"} & cols or {"name"} & cols):
            for r in rows:
                name = r.get("scorer") or r.get("name")
                self.direct[(name, int(float(r["length"])))] = float(r["speedup"])
        elif set(KERNEL_COLUMNS) <= cols:
            for r in rows:
                self.kernel.setdefault(int(float(r["S"])), {}).setdefault(r["kernel"], []).append(
                    (float(r["density"]), float(r["ms"]))
                )
            self._read_estimators()
        else:
            raise ValueError(f"{path}: unrecognised speed-up CSV columns {sorted(cols)}")

    def _read_estimators(self) -> None:
        """Estimator times (``length, name, time_ms``) from estimators_*.csv beside the file."""
        for est in sorted(self.path.parent.glob("estimators_*.csv")):
            for r in _read_csv(est):
                try:
                    key, t = (r["name"], int(float(r["length"]))), float(r["time_ms"])
                except (KeyError, ValueError):
                    continue
                if math.isfinite(t) and key not in self.estimator:
                    self.estimator[key] = t

    def speedup(self, scorer: str, length: int, density: float | None) -> float | None:
        if self.direct:
            return self.direct.get((scorer, length))
        if self.e2e:
            e = self.e2e.get(length)
            est = self.estimator.get((scorer, length))
            if e is None or density is None or est is None:
                return None
            return e["dense"] / (est + e["per_density"] * density)
        kern = self.kernel.get(length)
        if not kern or density is None:
            return None
        dense = next((min(v)[1] for k, v in kern.items() if "cudnn" in k), None)
        if dense is None:
            dense = min(ms for v in kern.values() for d, ms in v if d >= 0.999)
        for name in ("flex_flash_sparse", "triton_sparse", "flex_triton_sparse"):
            if name in kern:
                pts = kern[name] + [(1.0, dense)]
                t = _interp([p[0] for p in pts], [p[1] for p in pts], density)
                if t is None:
                    continue
                return dense / (t + self.estimator.get((scorer, length), 0.0))
        return None


def dppl_speedup_plot(
    records: Sequence[Mapping[str, Any]], path: str | Path, speedup_csv: str | Path | None
) -> tuple[Path | None, str]:
    """(path or None, note). Skipped (with the reason in the note) without a usable CSV."""
    ppl = [r for r in records if r["metric"] == "ppl" and r["result"].get("dppl") is not None]
    if not ppl:
        return None, "no sparse perplexity records"
    if not speedup_csv or not Path(speedup_csv).is_file():
        return None, f"ΔPPL-vs-speed-up plot skipped: no GPU benchmark CSV at {speedup_csv!r}"
    try:
        table = SpeedupTable(speedup_csv)
    except (ValueError, KeyError) as e:
        return None, f"ΔPPL-vs-speed-up plot skipped: {e}"
    pts = []
    for r in ppl:
        s = table.speedup(r["scorer_name"], r["length"], r["result"].get("density"))
        if s is not None:
            pts.append((s, 100 * r["result"]["dppl"], f"{r['scorer']} {r['length'] // 1024}K"))
    if not pts:
        return None, (
            f"ΔPPL-vs-speed-up plot skipped: {speedup_csv} has no speed-up for these "
            "scorers/lengths/densities (the kernel benchmark must cover the same lengths)"
        )
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for i, (s, d, label) in enumerate(pts):
        ax.scatter([s], [d], marker=_MARKERS[i % len(_MARKERS)], label=label)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel(
        f"attention speed-up vs dense, modelled at the measured density\n(GPU timings: {Path(speedup_csv).name})"
    )
    ax.set_ylabel("ΔPPL vs dense (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path), f"speed-ups from {speedup_csv}"


def make_plots(
    records: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    name: str,
    speedup_csv: str | Path | None = None,
) -> list[Path]:
    out_dir = Path(out_dir)
    written = [
        pareto_plot(records, out_dir / f"{name}_pareto.png"),
        heatmap_plot(records, out_dir / f"{name}_density_heatmap.png"),
    ]
    p, note = dppl_speedup_plot(records, out_dir / f"{name}_dppl_speedup.png", speedup_csv)
    if p is None and any(r["metric"] == "ppl" for r in records):
        print(f"[prism.eval] {note}")
    written.append(p)
    return [w for w in written if w is not None]
