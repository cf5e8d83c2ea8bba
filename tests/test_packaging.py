"""``pip install .`` into a fresh venv outside the checkout ships the YAML configs.

The venv sees this interpreter's site-packages (torch, omegaconf, transformers) through a plain
path ``.pth`` line, so nothing is downloaded; the editable install of the checkout is not seen
(a plain path line does not run that directory's ``.pth`` hooks), and the child runs from an empty
working directory, so ``prism`` can only come from the freshly built wheel install.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow

CHILD = textwrap.dedent(
    """
    import json, pathlib, sys
    import prism
    from prism.config import CONFIG_DIR

    out = {"prism_file": prism.__file__, "config_dir": str(CONFIG_DIR)}
    out["prism_cfg"] = prism.load_config("prism")
    out["built"] = prism.build_scorer(out["prism_cfg"]).name
    out["yamls"] = sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.yaml"))
    policy = prism.PrismPolicy.from_config("hf/smollm2")
    out["policy"] = [type(policy).__name__, policy.min_len]
    policy2 = prism.PrismPolicy.from_config("configs/hf/smollm2.yaml")  # the docs' path, no checkout
    out["same"] = policy2.min_len == policy.min_len
    from prism.eval.config import load_experiment

    out["experiment"] = load_experiment("threshold_sweep")["name"]
    print("RESULT" + json.dumps(out))
    """
)


def _copy_source(dst: Path) -> None:
    """The files a build needs (no caches, no egg-info, no build/ left by an earlier build)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(REPO / "prism", dst / "prism", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dst / name)


def test_wheel_install_outside_checkout_loads_configs(tmp_path):
    src, venv, cwd = tmp_path / "src", tmp_path / "venv", tmp_path / "cwd"
    src.mkdir()
    cwd.mkdir()
    _copy_source(src)
    # the venv's own pip is not needed: this interpreter's pip installs into it (--python)
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60
    )
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    child_site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    ours = list(dict.fromkeys(p for p in ours if Path(p).is_dir()))
    Path(child_site, "_outer_site.pth").write_text("\n".join(ours) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INDEX"] = "1"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q"]
        + ["--no-deps", "--no-build-isolation", str(src)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    res = subprocess.run(
        [str(py), "-c", CHILD], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout + res.stderr
    import json

    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT"))
    out = json.loads(line[len("RESULT") :])
    installed = Path(out["prism_file"]).resolve()
    assert REPO not in installed.parents and src not in installed.parents, installed
    assert venv.resolve() in installed.parents
    assert Path(out["config_dir"]).resolve() == installed.parent / "configs"
    # every shipped YAML of the checkout is in the install, and loads to the same mapping
    shipped = sorted(
        str(p.relative_to(REPO / "prism" / "configs"))
        for p in (REPO / "prism" / "configs").rglob("*.yaml")
    )
    assert out["yamls"] == shipped
    from prism.config import load_config

    assert out["prism_cfg"] == load_config(REPO / "prism" / "configs" / "scorers" / "prism.yaml")
    assert out["built"] == "prism"
    assert out["policy"][0] == "PrismPolicy" and out["same"]
    assert (
        out["experiment"]
        == load_config(REPO / "prism/configs/experiments/threshold_sweep.yaml")["name"]
    )
