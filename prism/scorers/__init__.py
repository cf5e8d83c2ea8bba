"""Scorers: estimate which blocks of the causal attention matrix matter.

Importing this package imports every module in this folder, which registers its scorers. Adding a
scorer is one file here with a config dataclass and a ``@register_scorer("name")`` class.
"""

import importlib
import pkgutil

from .base import (
    SCORERS,
    ProbScorerConfig,
    Scorer,
    ScorerConfig,
    available_scorers,
    build_scorer,
    make_config,
    register_scorer,
)

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if not _mod.startswith("_") and _mod not in ("base", "pooling"):
        importlib.import_module(f"{__name__}.{_mod}")

__all__ = [
    "SCORERS",
    "ProbScorerConfig",
    "Scorer",
    "ScorerConfig",
    "available_scorers",
    "build_scorer",
    "make_config",
    "register_scorer",
]
