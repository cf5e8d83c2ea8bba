"""YAML configs through omegaconf, validated against the scorers' typed configs.

A scorer config is a mapping with a ``scorer`` key and that scorer's parameters, e.g.
``configs/scorers/prism.yaml``; command-line style overrides are ``key=value`` strings
(``threshold=0.9``, ``policies.0.threshold=0.8``).

The shipped YAMLs live inside the package (``prism/configs/{scorers,policies,hf,experiments}/``,
installed with the wheel); a checkout keeps ``configs`` as a link to that folder. Names resolve
there: ``"prism"`` is ``scorers/prism.yaml``, ``"hf/smollm2"`` is ``hf/smollm2.yaml``, and a
``configs/...`` path that does not exist relative to the working directory falls back to the
package copy, so the paths in the docs work from an installed wheel too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .scorers import SCORERS, available_scorers, build_scorer

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The shipped YAML configs (package data)."""


def resolve_config_path(source: str | Path, group: str = "scorers") -> Path:
    """The YAML file a config name or path refers to.

    Tried in order: ``source`` as a path; ``CONFIG_DIR/<group>/<source>[.yaml]`` (a bare name);
    ``CONFIG_DIR/<source>[.yaml]`` (``"hf/smollm2"``); and for ``configs/...`` paths the same
    path under ``CONFIG_DIR``. Raises ``FileNotFoundError`` listing what was tried.
    """
    path = Path(source)
    if path.is_file():
        return path
    text = str(source)
    rel = text[len("configs/") :] if text.startswith("configs/") else text
    tried = [path]
    for base in (CONFIG_DIR / group, CONFIG_DIR):
        for name in (rel, rel + ".yaml"):
            cand = base / name
            tried.append(cand)
            if cand.is_file():
                return cand
    shipped = sorted(str(p.relative_to(CONFIG_DIR))[:-5] for p in CONFIG_DIR.rglob("*.yaml"))
    raise FileNotFoundError(
        f"config {text!r} not found (tried {', '.join(map(str, tried[:3]))}, ...); "
        f"shipped configs: {shipped}"
    )


def load_config(
    source: str | Path | Mapping[str, Any] | None = None, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Load a YAML file (or a mapping), apply ``key=value`` overrides, return a plain dict.

    A bare name such as ``"prism"`` resolves to ``configs/scorers/prism.yaml``, ``"hf/smollm2"``
    to ``configs/hf/smollm2.yaml`` (see :func:`resolve_config_path`).
    """
    import yaml
    from omegaconf import OmegaConf

    if source is None:
        cfg = OmegaConf.create({})
    elif isinstance(source, Mapping):
        cfg = OmegaConf.create(dict(source))
    else:
        cfg = OmegaConf.load(resolve_config_path(source))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"overrides must look like key=value, got {bad}")
    for item in overrides:
        key, value = item.split("=", 1)
        OmegaConf.update(cfg, key.strip(), yaml.safe_load(value), force_add=True)
    return OmegaConf.to_container(cfg, resolve=True)


def scorer_config(cfg: Mapping[str, Any]):
    """Validate a scorer mapping into its typed config dataclass (unknown keys are rejected)."""
    cfg = dict(cfg)
    name = cfg.pop("scorer", None)
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; valid scorers: {available_scorers()}")
    from .scorers import make_config

    return make_config(SCORERS[name].Config, cfg, name)


def build_scorer_from_config(source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()):
    """``build_scorer_from_config("configs/scorers/prism.yaml", ["threshold=0.9"])``."""
    return build_scorer(load_config(source, overrides))


def config_to_dict(config: Any) -> dict[str, Any]:
    """A typed scorer config back to a plain dict (for logging / YAML dumps)."""
    return dataclasses.asdict(config)
