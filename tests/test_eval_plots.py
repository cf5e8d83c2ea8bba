"""Plots and the GPU speed-up readers (prism.eval.plots)."""

import pytest

from prism.eval.plots import SpeedupTable, dppl_speedup_plot, heatmap_plot, pareto_plot


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


def test_speedup_table_parses_each_csv_format(tmp_path):
    """``SpeedupTable``'s arithmetic on hand-written CSV rows (fixed numbers; nothing is timed)."""
    direct = tmp_path / "direct.csv"
    direct.write_text("scorer,length,speedup\nprism,8192,1.5\n")
    assert SpeedupTable(direct).speedup("prism", 8192, 0.3) == 1.5
    assert SpeedupTable(direct).speedup("prism", 4096, 0.3) is None

    e2e = tmp_path / "e2e.csv"
    e2e.write_text(
        "S,scorer,backend,density,est_ms,kernel_ms,dense_cudnn_ms\n"
        "8192,prism,a,0.1,0.2,0.3,1.0\n8192,prism,b,0.1,0.2,0.2,1.0\n"
    )
    (tmp_path / "estimators_x.csv").write_text(
        "length,name,time_ms\n8192,xattn,0.5\n8192,prism,9.9\n"
    )
    t = SpeedupTable(e2e)
    # dense / (estimator + best kernel ms per unit density x density) = 1 / (0.2 + 2.0 * 0.25)
    assert t.speedup("prism", 8192, 0.25) == pytest.approx(1 / 0.7)
    assert t.speedup("xattn", 8192, 0.25) == pytest.approx(1 / 1.0)  # estimator from the side file
    assert t.speedup("minference", 8192, 0.25) is None

    kern = tmp_path / "k.csv"
    kern.write_text(
        "S,kernel,density,ms\n8192,sdpa_cudnn_dense,1.0,1.0\n8192,triton_sparse,0.1,0.2\n8192,triton_sparse,0.5,0.6\n"
    )
    assert SpeedupTable(kern).speedup("window", 8192, 0.3) == pytest.approx(1 / 0.4)

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
    csv = tmp_path / "s.csv"
    csv.write_text("scorer,length,speedup\nprism,8192,1.5\n")
    path, note = dppl_speedup_plot(recs, tmp_path / "d.png", csv)
    assert path is not None and path.stat().st_size > 1000
