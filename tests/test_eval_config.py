"""Experiment configs: sweep expansion, validation, resume, CLI, summary and plots."""

import json

import pytest

from prism.eval import (
    ConfigError,
    Runner,
    expand,
    load_experiment,
    point_key,
    read_records,
    validate,
)
from prism.eval.__main__ import main as cli_main
from prism.eval.modeling import tiny_llama
from prism.eval.runner import pareto_table


def test_sweep_expansion_is_a_grid():
    pts = expand(
        {
            "metric": "recall",
            "length": [1024, 2048],
            "scorers": [
                {"scorer": "prism", "threshold": [0.9, 0.95], "calibrate": [True, False]},
                {"scorer": "meanpool"},
            ],
        }
    )
    assert len(pts) == 2 * (4 + 1)
    combos = {
        (p["length"], p["scorer"].get("threshold"), p["scorer"].get("calibrate")) for p in pts
    }
    assert (2048, 0.95, False) in combos and (1024, None, None) in combos
    # every point is fully resolved with defaults and scalar lengths
    assert all(isinstance(p["length"], int) and p["model"]["name"] == "default" for p in pts)
    assert len({point_key(p) for p in pts}) == len(pts)


def test_list_typed_keys_are_not_swept():
    pts = expand(
        {"recall": {"layers": [0, 3], "targets": [0.9, 0.99]}, "scorers": [{"scorer": "prism"}]}
    )
    assert len(pts) == 1 and pts[0]["recall"]["layers"] == [0, 3]
    # a list for a scalar key of a section sweeps it
    pts = expand({"metric": "ruler", "ruler": {"task": ["vt", "cwe"], "samples": [1, 2]}})
    assert sorted((p["ruler"]["task"], p["ruler"]["samples"]) for p in pts) == [
        ("cwe", 1),
        ("cwe", 2),
        ("vt", 1),
        ("vt", 2),
    ]
    # union's policies are a list-typed scorer parameter: one variant
    pts = expand(
        {"scorers": [{"scorer": "union", "policies": [{"scorer": "window"}, {"scorer": "prism"}]}]}
    )
    assert len(pts) == 1


def test_point_key_ignores_unrelated_sections():
    a = expand({"metric": "recall", "ppl": {"windows": 1}})[0]
    b = expand({"metric": "recall", "ppl": {"windows": 3}, "output": {"dir": "elsewhere"}})[0]
    c = expand({"metric": "recall", "recall": {"layers": [1]}})[0]
    assert point_key(a) == point_key(b) != point_key(c)


@pytest.mark.parametrize(
    "cfg, needle",
    [
        ({"lenght": 4096}, "valid keys: ['name', 'metric', 'length'"),
        ({"model": {"nmae": "x"}}, "valid keys: ['name', 'gguf_file', 'dtype'"),
        ({"scorers": [{"scorer": "prism", "treshold": 0.9}]}, "'threshold'"),
        ({"scorers": [{"scorer": "nope"}]}, "valid scorers"),
        ({"metric": "speed"}, "valid metrics"),
        ({"scorers": [{"threshold": 0.9}]}, "'scorer' key"),
        (
            {"scorers": [{"scorer": "prism", "match_density": 0.3, "match_knob": "nope"}]},
            "match_knob",
        ),
    ],
)
def test_bad_keys_fail_listing_valid_keys(cfg, needle):
    with pytest.raises(ConfigError, match="valid|scorer|match_knob") as err:
        validate(cfg)
    assert needle in str(err.value)


def test_bad_override_from_yaml(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("name: e\nmetric: recall\nscorers:\n  - {scorer: prism}\n")
    cfg = load_experiment(str(path), ["scorers.0.threshold=[0.8,0.9]", "length=512"])
    assert cfg["scorers"][0]["threshold"] == [0.8, 0.9] and cfg["length"] == 512
    with pytest.raises(ConfigError, match="valid keys"):
        load_experiment(str(path), ["recall.layer=[1]"])
    assert cli_main([str(path), "modle.name=x"]) == 2


def test_shipped_experiment_configs_expand():
    for name in (
        "threshold_sweep",
        "prism_ablation",
        "equal_density",
        "ppl_defaults",
        "ruler",
        "lm_eval_longbench",
    ):
        assert len(expand(load_experiment(name))) > 0


def _cfg(tmp_path, **kw):
    cfg = {
        "name": "t",
        "metric": "recall",
        "length": [256, 512],
        "progress": False,
        "scorers": [{"scorer": "prism", "block_size": 64, "threshold": [0.5, 0.9]}],
        "model": {"name": "tiny", "backend": "reference"},
        "recall": {"layers": [0, 1], "chunk": 128, "targets": [0.9]},
        "output": {"dir": str(tmp_path), "speedup_csv": None},
    }
    cfg.update(kw)
    return cfg


class _CountingRunner(Runner):
    calls = 0

    def eval_recall(self, point):
        type(self).calls += 1
        return super().eval_recall(point)


def test_resume_skips_finished_points(tmp_path, capsys):
    model = tiny_llama()
    # plots only at the last run (the output section is not part of a point's key)
    cfg = _cfg(tmp_path, output={"dir": str(tmp_path), "speedup_csv": None, "plots": False})
    runner = _CountingRunner(cfg, model=model)
    n = len(runner.points)
    assert n == 2 * 2 + 2 * 2  # 2 lengths x (2 thresholds + oracle head/row at one target)
    recs = runner.run()
    assert _CountingRunner.calls == n and len(recs) == n
    lines = (tmp_path / "t.jsonl").read_text().splitlines()
    assert len(lines) == n
    # a killed run leaves a truncated line: it is ignored and that point re-runs
    (tmp_path / "t.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    _CountingRunner.calls = 0
    recs2 = _CountingRunner(cfg, model=model).run()
    assert _CountingRunner.calls == 1
    assert [r["key"] for r in recs2] == [r["key"] for r in recs]
    # growing the sweep runs only the new points
    _CountingRunner.calls = 0
    cfg2 = _cfg(
        tmp_path, scorers=[{"scorer": "prism", "block_size": 64, "threshold": [0.5, 0.9, 0.7]}]
    )
    _CountingRunner(cfg2, model=model).run()
    assert _CountingRunner.calls == 2
    out = capsys.readouterr().out
    assert "already in" in out and "Pareto" in out
    assert (tmp_path / "t.csv").read_text().count("\n") == n + 2 + 1
    assert (tmp_path / "t_pareto.png").stat().st_size > 1000
    assert (tmp_path / "t_density_heatmap.png").stat().st_size > 1000
    recs = read_records(tmp_path / "t.jsonl")
    by = {(r["length"], r["scorer"]): r["result"] for r in recs}
    # a higher threshold keeps more blocks and more mass
    lo, hi = (
        by[(512, "prism(block_size=64, threshold=0.5)")],
        by[(512, "prism(block_size=64, threshold=0.9)")],
    )
    assert hi["density"] >= lo["density"] and hi["recall"] >= lo["recall"]
    assert "density @ recall 0.9" in pareto_table(recs, (0.9,))


def test_cli_dry_run_lists_points(tmp_path, capsys):
    path = tmp_path / "e.yaml"
    path.write_text(json.dumps(_cfg(tmp_path)))  # JSON is YAML
    assert cli_main([str(path), "--dry-run", "length=256"]) == 0
    out = capsys.readouterr().out
    assert out.count("todo") == 4 and "4 points" in out
    # --report rebuilds CSV / summary / plots from whatever records the file holds
    rec = {
        "key": "k",
        "metric": "recall",
        "length": 256,
        "scorer": "prism",
        "family": "prism",
        "scorer_name": "prism",
        "params": {},
        "result": {
            "density": 0.5,
            "recall": 0.9,
            "recall_min": 0.8,
            "oracle_density": 0.4,
            "oracle_row_density": 0.45,
        },
    }
    (tmp_path / "t.jsonl").write_text(json.dumps(rec) + "\n")
    assert cli_main([str(path), "--report"]) == 0
    assert "| 256 | prism | 0.5000 | 0.9000 |" in capsys.readouterr().out
    assert (tmp_path / "t.csv").read_text().count("\n") == 2


def test_summary_of_ruler_and_ppl_records():
    from prism.eval import summary

    def ruler(scorer, name, preds, acc):
        return {
            "metric": "ruler",
            "length": 4096,
            "scorer": scorer,
            "scorer_name": name,
            "task": "vt",
            "ruler": {"task": "vt", "samples": 2},
            "result": {
                "accuracy": acc,
                "samples": 2,
                "per_sample": [{"prediction": p} for p in preds],
            },
        }

    recs = [ruler("dense", "none", ["A B", "C"], 0.5), ruler("prism", "prism", ["A B ", "D"], 0.0)]
    recs.append(
        {
            "metric": "ppl",
            "length": 4096,
            "scorer": "prism",
            "scorer_name": "prism",
            "result": {"ppl": 10.5, "dppl": 0.05, "density": 0.3},
        }
    )
    text = summary(recs)
    assert "| 4096 | prism | 0.0000 | 0.0000 | 1/2 |" in text
    assert "+5.00%" in text
