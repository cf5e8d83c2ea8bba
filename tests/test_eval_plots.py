"""Plots and the GPU speed-up readers (prism.eval.plots)."""

import pytest

from prism.eval.plots import (
    DIRECT_COLUMNS,
    E2E_COLUMNS,
    ESTIMATOR_COLUMNS,
    KERNEL_COLUMNS,
    SpeedupTable,
    dppl_speedup_plot,
    heatmap_plot,
    pareto_plot,
)


def _csv(path, columns, *rows):
    """A CSV file of the benchmark format ``columns`` holding the given fixed rows."""
    lines = [",".join(columns)] + [",".join(str(x) for x in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _recall(scorer, params, density, recall, length=1024):
    fam = scorer if not scorer.startswith("oracle") else scorer
    return {
        "metric": "recall",
        "length": length,
        "scorer": f"{scorer}{params}",
        "family": fam,
        "scorer_name": scorer,
        "params": params,
        "result": {
            "density": density,
            "recall": recall,
            "layers": [0, 1],
            "density_per_head": [[density, density], [density, 1.0]],
        },
    }


def _ppl(scorer, length, density, dppl):
    return {
        "metric": "ppl",
        "length": length,
        "scorer": scorer,
        "scorer_name": scorer,
        "params": {},
        "result": {"ppl": 10.0, "dppl": dppl, "density": density},
    }


def test_pareto_and_heatmap_written(tmp_path):
    recs = [
        _recall("prism", {"threshold": 0.9}, 0.3, 0.9),
        _recall("prism", {"threshold": 0.95}, 0.4, 0.95),
        _recall("meanpool", {"threshold": 0.95}, 0.35, 0.93),
        _recall("oracle-head", {"target": 0.9}, 0.2, 0.9),
    ]
    assert pareto_plot(recs, tmp_path / "p.png").stat().st_size > 1000
    assert heatmap_plot(recs, tmp_path / "h.png").stat().st_size > 1000
    assert pareto_plot([], tmp_path / "none.png") is None


def _ratio(dense, estimator, sparse):
    """The cost model SpeedupTable implements (module docstring of ``prism.eval.plots``):
    dense cost / (estimator cost + sparse kernel cost), all in the same unit."""
    return dense / (estimator + sparse)


def test_speedup_table_parses_each_csv_format(tmp_path):
    """``SpeedupTable`` reads each benchmark CSV format and applies the cost model ``_ratio`` to
    hand-written rows of abstract costs (no clock is read anywhere in this test)."""
    direct = _csv(tmp_path / "direct.csv", DIRECT_COLUMNS, ("prism", 8192, 1.5))
    assert SpeedupTable(direct).speedup("prism", 8192, 0.3) == 1.5  # a ratio column: read as is
    assert SpeedupTable(direct).speedup("prism", 4096, 0.3) is None

    # per-backend rows (density, estimator, kernel, dense); the best kernel cost per unit density
    # (backend b: 2.0) scales to the requested density
    rows = [(8192, "prism", "a", 0.1, 0.2, 0.3, 1.0), (8192, "prism", "b", 0.1, 0.2, 0.2, 1.0)]
    e2e = _csv(tmp_path / "e2e.csv", E2E_COLUMNS, *rows)
    side = [(8192, "xattn", 0.5), (8192, "prism", 9.9)]  # estimator costs from a side file
    _csv(tmp_path / "estimators_x.csv", ESTIMATOR_COLUMNS, *side)
    t = SpeedupTable(e2e)
    per_density = min(r[5] / r[3] for r in rows)
    dense = rows[0][6]
    want_prism = _ratio(dense, rows[0][4], per_density * 0.25)  # the CSV's estimator wins
    want_xattn = _ratio(dense, side[0][2], per_density * 0.25)
    assert t.speedup("prism", 8192, 0.25) == pytest.approx(want_prism)
    assert t.speedup("xattn", 8192, 0.25) == pytest.approx(want_xattn)
    assert t.speedup("minference", 8192, 0.25) is None

    # kernel rows: dense cuDNN and the sparse kernel at two densities, interpolated at 0.3
    kern_rows = [
        (8192, "sdpa_cudnn_dense", 1.0, 1.0),
        (8192, "triton_sparse", 0.1, 0.2),
        (8192, "triton_sparse", 0.5, 0.6),
    ]
    kern = _csv(tmp_path / "k.csv", KERNEL_COLUMNS, *kern_rows)
    sparse_at = kern_rows[1][3] + (kern_rows[2][3] - kern_rows[1][3]) * (0.3 - 0.1) / (0.5 - 0.1)
    want_window = _ratio(kern_rows[0][3], 0.0, sparse_at)  # no estimator cost for "window"
    assert SpeedupTable(kern).speedup("window", 8192, 0.3) == pytest.approx(want_window)

    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="unrecognised"):
        SpeedupTable(bad)


def test_dppl_speedup_plot_skips_without_data(tmp_path):
    recs = [_ppl("prism", 8192, 0.3, 0.02)]
    path, note = dppl_speedup_plot(recs, tmp_path / "d.png", None)
    assert path is None and "skipped" in note
    path, note = dppl_speedup_plot(recs, tmp_path / "d.png", tmp_path / "missing.csv")
    assert path is None and "skipped" in note
    csv = _csv(tmp_path / "s.csv", DIRECT_COLUMNS, ("prism", 8192, 1.5))
    path, note = dppl_speedup_plot(recs, tmp_path / "d.png", csv)
    assert path is not None and path.stat().st_size > 1000
