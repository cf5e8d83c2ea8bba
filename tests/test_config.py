"""YAML configs through omegaconf into the typed scorer configs, with key=value overrides."""

from pathlib import Path

import pytest

import prism
from prism.config import CONFIG_DIR, build_scorer_from_config, load_config, scorer_config
from prism.scorers.prism import PrismConfig


def test_every_scorer_yaml_builds_its_scorer_with_defaults():
    files = sorted((CONFIG_DIR / "scorers").glob("*.yaml"))
    assert {f.stem for f in files} >= {"prism", "meanpool"}
    for f in files:
        cfg = load_config(f)
        scorer = prism.build_scorer(cfg)
        assert scorer.name == cfg["scorer"] == f.stem
        # YAML defaults equal the dataclass defaults (the YAML documents them, it does not drift)
        assert scorer.config == type(scorer.config)()


def test_overrides_and_typed_validation():
    s = build_scorer_from_config("prism", ["threshold=0.9", "calibrate=false", "high_dims=32"])
    assert isinstance(s.config, PrismConfig)
    assert (s.config.threshold, s.config.calibrate, s.config.high_dims) == (0.9, False, 32)
    with pytest.raises(ValueError, match="valid keys"):
        build_scorer_from_config("prism", ["thresold=0.9"])
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        build_scorer_from_config("prism", ["threshold=2"])
    with pytest.raises(ValueError, match="key=value"):
        load_config("prism", ["threshold"])


def test_union_policy_yaml_with_nested_override():
    path = CONFIG_DIR / "policies" / "prism_plus_window.yaml"
    s = build_scorer_from_config(path, ["policies.0.threshold=0.8"])
    assert s.name == "union"
    assert [c.name for c in s.children] == ["prism", "window"]
    assert s.children[0].config.threshold == 0.8


def test_scorer_config_rejects_unknown_scorer(tmp_path: Path):
    with pytest.raises(ValueError, match="valid scorers"):
        scorer_config({"scorer": "nope"})
    p = tmp_path / "x.yaml"
    p.write_text("scorer: meanpool\nthreshold: 0.5\n")
    assert prism.build_scorer(load_config(p)).config.threshold == 0.5


def test_configs_live_in_the_package_and_names_resolve_from_any_cwd(tmp_path, monkeypatch):
    import yaml

    assert CONFIG_DIR == Path(prism.__file__).resolve().parent / "configs"
    groups = {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()}
    assert groups >= {"scorers", "policies", "hf", "experiments"}
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: every name must come from the package
    by_file = yaml.safe_load((CONFIG_DIR / "hf" / "smollm2.yaml").read_text())
    for name in ("hf/smollm2", "hf/smollm2.yaml", "configs/hf/smollm2.yaml"):
        assert load_config(name) == by_file
    assert load_config("prism") == yaml.safe_load((CONFIG_DIR / "scorers/prism.yaml").read_text())
    # a file in the working directory wins over a shipped config of the same name
    (tmp_path / "prism").write_text("scorer: meanpool\n")
    assert load_config("prism") == {"scorer": "meanpool"}
    with pytest.raises(FileNotFoundError, match="shipped configs"):
        load_config("no_such_config")
