"""Experiment configs: schema, validation, sweep expansion, point keys.

An experiment is an omegaconf YAML file (plus ``key=value`` overrides, including list indices
such as ``scorers.0.threshold=0.9``). Its schema is the dataclasses below; an unknown key at any
level fails with the list of valid keys.

**Sweeps**: a list given for a *scalar* key expands into a grid (cartesian product). Keys whose
schema type is a list (``scorers``, ``recall.layers``, ``recall.targets``, ``ruler.tasks``...) are
taken as they are. Inside each scorer mapping the same rule holds against that scorer's config
dataclass: ``{scorer: prism, threshold: [0.9, 0.95], calibrate: [true, false]}`` is four variants.
Each grid point is one ``(metric, length, scorer variant, ...)`` evaluation; its *key* (a hash of
everything that determines its result) is what resume uses to skip finished points.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS = ("recall", "ppl", "ruler", "lm_eval")
BASELINE = "none"  # scorer name of the unpatched model (the native dense attention)
# keys of a scorer mapping that are not scorer parameters: a display label, and density matching
# (``match_density: 0.3`` sets the ``match_knob`` parameter, default ``threshold``, by bisection so
# that the mean density over the captured layers at the point's length is about 0.3)
RESERVED = ("label", "match_density", "match_knob")


@dataclass
class ModelConfig:
    """name: "default" (the embedded SmolLM2-135M), "tiny" (a random 2-layer Llama, for tests), or
    a local HF model folder / hub id. gguf_file: a GGUF file inside ``name`` (a folder).
    dtype: float32 | bfloat16 | float16. rope_scaling: e.g. ``{rope_type: yarn, factor: 2.0}``
    (``original_max_position_embeddings`` defaults to the model's context) to run past the
    trained context. backend: the sparse attention backend used when a scorer is patched in.
    threads: torch CPU threads (null = torch's default)."""

    name: str = "default"
    gguf_file: str | None = None
    dtype: str = "float32"
    rope_scaling: dict | None = None
    backend: str = "flex"
    threads: int | None = None


@dataclass
class DataConfig:
    """corpus: "pydoc" (Python's pydoc_data.topics, ≈113K SmolLM2 tokens of English) or a path to a
    UTF-8 text file. offset: first token of the first window."""

    corpus: str = "pydoc"
    offset: int = 0


@dataclass
class RecallConfig:
    """layers: layer indices to capture (null = all). targets: recall targets of the oracle points
    and the Pareto table. oracle: add the oracle points (per-head and per-row floors).
    chunk: query chunk of the exact blockwise mass computation (memory O(Hq · chunk · Sk))."""

    layers: list | None = None
    targets: list = field(default_factory=lambda: [0.9, 0.95, 0.99])
    oracle: bool = True
    chunk: int = 1024


@dataclass
class PplConfig:
    """windows: non-overlapping windows of ``length`` tokens from ``data.offset`` on. tail: also
    report the perplexity of the last ``tail`` fraction of each window's positions (where the
    causal rows are long and sparsity bites). chunk: positions per lm-head chunk."""

    windows: int = 1
    tail: float = 0.5
    chunk: int = 1024


@dataclass
class RulerConfig:
    """task: one of prism.eval.tasks.TASKS (a list expands). samples: prompts per task.
    haystack: "pydoc" (real text) or "noise" (RULER's repeated filler sentences).
    max_new_tokens: null = the task's default. template: "plain" or "chat" (tokenizer's
    chat template around the instruction)."""

    task: str = "niah_single"
    samples: int = 4
    haystack: str = "pydoc"
    max_new_tokens: int | None = None
    template: str = "plain"


@dataclass
class LmEvalConfig:
    """Passed to ``lm_eval.simple_evaluate`` through :mod:`prism.eval.lm_eval_adapter`."""

    tasks: list = field(default_factory=list)
    limit: int | None = None
    num_fewshot: int | None = None
    include_path: str | None = None
    batch_size: int = 1


@dataclass
class OutputConfig:
    """dir: results folder; ``<name>.jsonl`` / ``<name>.csv`` / plots go there.
    resume: skip points already in the JSONL file. plots: write PNGs at the end.
    speedup_csv: GPU benchmark results (for the ΔPPL-vs-speed-up plot), skipped if absent."""

    dir: str = "benchmarks/results/runs"
    name: str | None = None
    resume: bool = True
    plots: bool = True
    csv: bool = True
    speedup_csv: str | None = "benchmarks/results/e2e_h200.csv"


@dataclass
class ExperimentConfig:
    """Top level. metric: recall | ppl | ruler | lm_eval (a list expands). length: tokens per
    window / prompt (a list expands). seed: task generation seed. baseline: add the unpatched
    model (scorer "none") as the dense reference of ppl / ruler points. scorers: list of scorer
    mappings (``{scorer: NAME, param: value-or-list}``)."""

    name: str = "experiment"
    metric: str = "recall"
    length: int = 4096
    seed: int = 0
    baseline: bool = True
    progress: bool = True
    scorers: list = field(default_factory=lambda: [{"scorer": "prism"}])
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    recall: RecallConfig = field(default_factory=RecallConfig)
    ppl: PplConfig = field(default_factory=PplConfig)
    ruler: RulerConfig = field(default_factory=RulerConfig)
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# sections whose content decides a point's result, per metric (for the resume key)
_RELEVANT = {
    "recall": ("model", "data", "recall"),
    "ppl": ("model", "data", "ppl"),
    "ruler": ("model", "ruler"),
    "lm_eval": ("model", "lm_eval"),
}
_RECALL_KEY_FIELDS = ("layers", "chunk")  # targets / oracle add points, they don't change one


class ConfigError(ValueError):
    """A bad experiment config (unknown key, wrong type, unknown scorer/metric)."""


def _is_list_field(f: dataclasses.Field) -> bool:
    return "list" in str(f.type).lower()


def _is_section(f: dataclasses.Field) -> bool:
    return dataclasses.is_dataclass(f.default_factory) if callable(f.default_factory) else False


def _check_keys(cls: type, cfg: Mapping[str, Any], where: str) -> None:
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(cfg) - set(valid))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {valid}")


def _scorer_fields(name: str) -> dict[str, dataclasses.Field]:
    from ..scorers import SCORERS, available_scorers

    if name == BASELINE:
        return {}
    if name not in SCORERS:
        raise ConfigError(
            f"unknown scorer {name!r}; valid scorers: {available_scorers()} (or {BASELINE!r})"
        )
    return {f.name: f for f in dataclasses.fields(SCORERS[name].Config)}


def validate(cfg: Mapping[str, Any]) -> None:
    """Check every key of a raw (possibly sweeping) experiment mapping against the schema."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"an experiment config must be a mapping, got {type(cfg).__name__}")
    _check_keys(ExperimentConfig, cfg, "the experiment config")
    for f in dataclasses.fields(ExperimentConfig):
        if _is_section(f) and f.name in cfg and cfg[f.name] is not None:
            if not isinstance(cfg[f.name], Mapping):
                raise ConfigError(f"{f.name!r} must be a mapping")
            _check_keys(f.default_factory, cfg[f.name], f"section {f.name!r}")
    for m in _as_list(cfg.get("metric", ExperimentConfig.metric)):
        if m not in METRICS:
            raise ConfigError(f"unknown metric {m!r}; valid metrics: {list(METRICS)}")
    scorers = cfg.get("scorers", [{"scorer": "prism"}])
    if not isinstance(scorers, Sequence) or isinstance(scorers, str):
        raise ConfigError("'scorers' must be a list of mappings with a 'scorer' key")
    for i, s in enumerate(scorers):
        if not isinstance(s, Mapping) or "scorer" not in s:
            raise ConfigError(f"scorers[{i}] must be a mapping with a 'scorer' key, got {s!r}")
        for name in _as_list(s["scorer"]):
            fields = _scorer_fields(name)
            unknown = sorted(set(s) - set(fields) - {"scorer", *RESERVED})
            if unknown:
                raise ConfigError(
                    f"unknown key(s) {unknown} for scorer {name!r} (scorers[{i}]); "
                    f"valid keys: {[*RESERVED, *fields]}"
                )
            knob = s.get("match_knob", "threshold")
            if "match_density" in s and name != BASELINE and knob not in fields:
                raise ConfigError(
                    f"match_knob {knob!r} is not a parameter of scorer {name!r}; valid: {list(fields)}"
                )


def _as_list(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _grid(mapping: Mapping[str, Any], list_keys: set[str]) -> list[dict[str, Any]]:
    """Cartesian product over the scalar keys that hold lists."""
    keys = list(mapping)
    choices = [
        [mapping[k]] if k in list_keys or not isinstance(mapping[k], (list, tuple)) else mapping[k]
        for k in keys
    ]
    for k, c in zip(keys, choices):
        if len(c) == 0:
            raise ConfigError(f"sweep over {k!r} is an empty list")
    return [dict(zip(keys, combo)) for combo in itertools.product(*choices)]


def expand_scorers(scorers: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Scorer mappings with list values for scalar parameters -> one mapping per variant."""
    out: list[dict[str, Any]] = []
    for s in scorers:
        for name in _as_list(s["scorer"]):
            fields = _scorer_fields(name)
            list_keys = {n for n, f in fields.items() if _is_list_field(f)}
            params = {k: v for k, v in s.items() if k != "scorer"}
            for combo in _grid(params, list_keys):
                variant = {"scorer": name, **combo}
                if variant not in out:
                    out.append(variant)
    return out


def expand(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A raw experiment mapping -> the list of fully resolved points (plain dicts).

    Each point has every schema key filled (defaults applied), a single ``scorer`` mapping in place
    of ``scorers``, and scalars only where the schema has scalars.
    """
    validate(cfg)
    base = dataclasses.asdict(ExperimentConfig())
    sections = {f.name for f in dataclasses.fields(ExperimentConfig) if _is_section(f)}
    top_lists = {f.name for f in dataclasses.fields(ExperimentConfig) if _is_list_field(f)}
    top = {k: v for k, v in cfg.items() if k not in sections}
    scorers = top.pop("scorers", base["scorers"])
    merged_sections: dict[str, list[dict[str, Any]]] = {}
    for name in sorted(sections):
        sec_cls = next(
            f.default_factory for f in dataclasses.fields(ExperimentConfig) if f.name == name
        )
        list_keys = {f.name for f in dataclasses.fields(sec_cls) if _is_list_field(f)}
        # dict-typed fields (rope_scaling) are scalars that are never swept
        values = {**base[name], **(cfg.get(name) or {})}
        merged_sections[name] = _grid(values, list_keys)
    top_values = {k: v for k, v in {**base, **top}.items() if k not in sections and k != "scorers"}
    top_grid = _grid(top_values, top_lists)
    variants = expand_scorers(scorers)
    points: list[dict[str, Any]] = []
    sec_names = sorted(merged_sections)
    for t in top_grid:
        for sec_combo in itertools.product(*(merged_sections[n] for n in sec_names)):
            for variant in variants:
                p = dict(t)
                p.update(dict(zip(sec_names, (dict(s) for s in sec_combo))))
                p["scorer"] = dict(variant)
                points.append(p)
    return points


def scorer_label(variant: Mapping[str, Any]) -> str:
    """A short human label: ``prism(threshold=0.9)``; ``label`` overrides it."""
    if variant.get("label"):
        return str(variant["label"])
    name = variant["scorer"]
    if name == BASELINE:
        return "dense"
    params = ", ".join(
        f"{k}={v}" for k, v in variant.items() if k not in ("scorer", "label", "match_knob")
    )
    return f"{name}({params})" if params else name


def scorer_params(variant: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters to build the scorer with (without ``scorer`` and the reserved keys)."""
    return {k: v for k, v in variant.items() if k != "scorer" and k not in RESERVED}


def point_key(point: Mapping[str, Any]) -> str:
    """Stable hash of everything that decides a point's result (for resume)."""
    metric = point["metric"]
    rel: dict[str, Any] = {
        "metric": metric,
        "length": point["length"],
        "scorer": {k: v for k, v in point["scorer"].items() if k != "label"},
    }
    for sec in _RELEVANT[metric]:
        sec_val = dict(point[sec])
        if sec == "recall":
            sec_val = {k: sec_val[k] for k in _RECALL_KEY_FIELDS}
        if sec == "model":
            sec_val.pop("threads", None)
        rel[sec] = sec_val
    if metric == "ruler":
        rel["seed"] = point["seed"]
        rel["data"] = point["data"] if point["ruler"]["haystack"] == "pydoc" else None
    blob = json.dumps(rel, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def load_experiment(
    source: str | Path | Mapping[str, Any] | None, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Load a YAML experiment (or mapping), apply ``key=value`` overrides, validate, return a dict.

    A bare name resolves to ``configs/experiments/<name>.yaml``.
    """
    from ..config import load_config, resolve_config_path

    if isinstance(source, (str, Path)):
        source = resolve_config_path(source, group="experiments")
    cfg = load_config(source, overrides)
    validate(cfg)
    return cfg
