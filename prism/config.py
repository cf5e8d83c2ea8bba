"""YAML configs through omegaconf, validated against the scorers' typed configs.

A scorer config is a mapping with a ``scorer`` key and that scorer's parameters, e.g.
``configs/scorers/prism.yaml``; command-line style overrides are ``key=value`` strings
(``threshold=0.9``, ``policies.0.threshold=0.8``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .scorers import SCORERS, available_scorers, build_scorer

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def load_config(
    source: str | Path | Mapping[str, Any] | None = None, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Load a YAML file (or a mapping), apply ``key=value`` overrides, return a plain dict.

    A bare name such as ``"prism"`` resolves to ``configs/scorers/prism.yaml``.
    """
    import yaml
    from omegaconf import OmegaConf

    if source is None:
        cfg = OmegaConf.create({})
    elif isinstance(source, Mapping):
        cfg = OmegaConf.create(dict(source))
    else:
        path = Path(source)
        named = CONFIG_DIR / "scorers" / f"{source}.yaml"
        if not path.is_file() and named.is_file():
            path = named
        if not path.is_file():
            raise FileNotFoundError(
                f"config {source!r} not found (nor as configs/scorers/{source}.yaml)"
            )
        cfg = OmegaConf.load(path)
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
