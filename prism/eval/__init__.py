"""Accuracy harness: attention recall vs density, perplexity, RULER-style tasks, lm-eval, sweeps.

    python -m prism.eval configs/experiments/threshold_sweep.yaml length=[4096,8192]

Python API::

    from prism.eval import run_experiment, load_experiment, expand
    records = run_experiment("threshold_sweep", ["length=4096", "recall.layers=[0,15]"])

See :mod:`prism.eval.config` for the config schema and the sweep rules, :mod:`prism.eval.recall`
for the recall / oracle definitions, :mod:`prism.eval.tasks` for the tasks.
"""

from .config import ConfigError, ExperimentConfig, expand, load_experiment, point_key, validate
from .recall import (
    density_at_recall,
    evaluate_scorer,
    oracle_density,
    oracle_selection,
    selection_stats,
)
from .runner import Runner, pareto_table, read_records, run_experiment, summary

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "Runner",
    "density_at_recall",
    "evaluate_scorer",
    "expand",
    "load_experiment",
    "oracle_density",
    "oracle_selection",
    "pareto_table",
    "point_key",
    "read_records",
    "run_experiment",
    "selection_stats",
    "summary",
    "validate",
]
