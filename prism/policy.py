"""What a Prism-patched model runs: :class:`PrismPolicy` (a scorer per layer, a backend, switches).

Framework-neutral (no transformers import): the Hugging Face integration and any other engine
integration read the same policy. The process-wide default policy (:func:`default_policy`) is what
modules without a policy of their own use (``attn_implementation="prism"`` and never patched).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .kernels import get_backend
from .masks.geometry import block_dims
from .scorers import Scorer, build_scorer

if TYPE_CHECKING:
    import torch

    from .stats import PrismStats

#: the default ``min_len`` on CUDA: the measured crossover of benchmarks/bench_model.py on the
#: H200 (benchmarks/results/model_h200.md): the patched embedded model (SmolLM2-135M, Prism,
#: flex backend with FA4) was 0.50x dense at 8K and 0.62x at 16K, 2.0x at 32K and 3.0x at 64K
CUDA_MIN_LEN = 32768
#: the default ``min_len`` on CUDA inside :class:`prism.CUDAGraphPrefill` (its warm-up and
#: capture): the graph removes the per-call host overhead, so the crossover is much shorter
#: (benchmarks/results/model_graph_short_h200.log, compile_regions + graphs on both sides:
#: Prism 0.93x of dense at 2K, 1.10x at 4K, 1.38x at 8K)
CUDA_GRAPH_MIN_LEN = 4096

#: keys of a policy config that are not scorer parameters

POLICY_KEYS = (
    "backend",
    "min_len",
    "min_query_len",
    "dense_layers",
    "layers",
    "padding",
    "by_length",
)
#: the policy keys a ``by_length`` bucket may set (besides scorer parameters): what is chosen per
#: layer; routing (backend, min_len, padding) stays the policy's own
BUCKET_KEYS = ("dense_layers", "layers")
PADDING_MODES = ("sparse", "dense")


def _parse_layer_key(key: Any) -> list[int]:
    """``3`` -> [3]; ``"4-7"`` -> [4, 5, 6, 7]; ``"1,3"`` -> [1, 3]."""
    if isinstance(key, bool):
        raise TypeError(f"bad layer key {key!r}")
    if isinstance(key, int):
        if key < 0:
            raise ValueError(f"layer indices must be >= 0, got {key}")
        return [key]
    if isinstance(key, str):
        out: list[int] = []
        for part in key.split(","):
            part = part.strip()
            m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if hi < lo:
                    raise ValueError(f"empty layer range {part!r}")
                out.extend(range(lo, hi + 1))
            elif part.isdigit():
                out.append(int(part))
            else:
                raise ValueError(f"bad layer key {key!r}: use 3, '4-7' or '1,3,5'")
        return out
    raise TypeError(f"bad layer key {key!r}: use an int, 'a-b' or 'a,b,c'")


class PrismPolicy:
    """What a patched model runs: a scorer per layer (``None`` = dense), a backend, the switches.

    Args:
        scorer: registered scorer name, a scorer config mapping (``{"scorer": "prism", ...}``) or
            a built :class:`~prism.Scorer`.
        backend: attention backend for the sparse pre-fill (``"flex"``, ``"reference"``,
            ``"triton"``, ...).
        min_len: keys below this many tokens (Sk) run dense. Default (None): on a CUDA device
            the measured whole-model crossover :data:`CUDA_MIN_LEN` (below it the estimator and
            the per-call overhead cost more than sparse attention saves, see
            ``benchmarks/results/model_h200.md``), :data:`CUDA_GRAPH_MIN_LEN` inside
            :class:`prism.CUDAGraphPrefill` (no per-call host overhead); on a CPU two blocks.
        min_query_len: fewer new queries (Sq) than this run dense; default 2, i.e. decode is dense.
        dense_layers: an int N (the first N layers run dense) or a list of layer indices.
        layers: per-layer overrides ``{layer: {...}}``; a key is an index, ``"a-b"`` or
            ``"a,b"``; a value holds scorer parameters merged into the base ones (e.g.
            ``{"threshold": 0.98}``), optionally ``scorer`` (another scorer) or ``dense: true``.
        padding: ``"sparse"`` (each padded row sparse on its own span, eager mode) or ``"dense"``.
        by_length: length buckets ``{L: {...}}``: a call over ``Sk >= L`` keys takes its layers'
            scorers from the bucket with the largest such ``L`` (a bucket holds scorer parameters,
            ``layers`` and ``dense_layers``, as a policy does; it inherits this policy's scorer
            parameters and per-layer overrides, its own ``layers`` entries winning, and this
            policy's ``dense_layers`` unless it names its own). E.g. higher thresholds for short prompts, lower ones from
            32K tokens on, where the same threshold loses less. Backend, ``min_len`` and padding
            are this policy's for every length; the KV block (``block_size``) must be the same
            everywhere, the query block may differ per bucket (``q_block_size``, e.g. 192-row
            blocks from 128K keys on for FA4 on Hopper: ``configs/policies/prism_fa4_hopper.yaml``).
        **params: scorer parameters (``threshold``, ``block_size``, ...).

    ``stats``: the :class:`~prism.stats.PrismStats` being collected (``None``: nothing is
    recorded); set by :func:`prism.stats.collect_stats`.
    """

    def __init__(
        self,
        scorer: str | Mapping[str, Any] | Scorer = "prism",
        backend: str = "flex",
        *,
        min_len: int | None = None,
        min_query_len: int = 2,
        dense_layers: int | Sequence[int] = 0,
        layers: Mapping[Any, Mapping[str, Any]] | None = None,
        padding: str = "sparse",
        by_length: Mapping[int, Mapping[str, Any]] | None = None,
        **params: Any,
    ) -> None:
        get_backend(backend)  # fail early on a typo
        if padding not in PADDING_MODES:
            raise ValueError(f"padding must be one of {list(PADDING_MODES)}, got {padding!r}")
        if int(min_query_len) < 2:
            raise ValueError("min_query_len must be >= 2 (decode, Sq == 1, always runs dense)")
        self.backend = backend
        self.padding = padding
        self.min_query_len = int(min_query_len)
        if isinstance(scorer, Scorer):
            self.base_config: dict[str, Any] | None = None
            self.scorer = build_scorer(scorer, **params)
        else:
            base = dict(scorer) if isinstance(scorer, Mapping) else {"scorer": scorer}
            base.update(params)
            self.base_config = base
            self.scorer = build_scorer(base)
        self.block_size = self.scorer.block_size
        self._min_len = None if min_len is None else int(min_len)
        if self._min_len is not None and self._min_len < 1:
            raise ValueError(f"min_len must be >= 1, got {min_len}")

        if isinstance(dense_layers, bool):
            raise TypeError("dense_layers must be an int (first N layers) or a list of indices")
        if isinstance(dense_layers, int):
            if dense_layers < 0:
                raise ValueError(f"dense_layers must be >= 0, got {dense_layers}")
            dense = set(range(dense_layers))
        else:
            dense = set()
            for key in dense_layers:
                dense.update(_parse_layer_key(key))
        self.dense_layers: frozenset[int] = frozenset(dense)
        self.layers_spec = {k: dict(v) for k, v in (layers or {}).items()}
        self.layer_overrides: dict[int, dict[str, Any]] = {}
        self._layer_scorers: dict[int, Scorer | None] = {i: None for i in dense}
        for key, spec in (layers or {}).items():
            if not isinstance(spec, Mapping):
                raise TypeError(f"layers[{key!r}] must be a mapping, got {type(spec).__name__}")
            spec = dict(spec)
            for idx in _parse_layer_key(key):
                self.layer_overrides[idx] = spec
                self._layer_scorers[idx] = self._build_layer(idx, spec)
        self.by_length: dict[int, PrismPolicy] = self._build_buckets(by_length or {})
        self._bucket_keys = sorted(self.by_length, reverse=True)
        self.stats: PrismStats | None = None

    def _build_buckets(self, spec: Mapping[Any, Mapping[str, Any]]) -> dict[int, PrismPolicy]:
        if spec and self.base_config is None:
            raise ValueError("by_length needs the policy's scorer given by name or config")
        out: dict[int, PrismPolicy] = {}
        for key, bucket in spec.items():
            if isinstance(key, bool) or not str(key).isdigit() or int(key) < 1:
                raise ValueError(f"by_length keys are key lengths (ints >= 1), got {key!r}")
            if not isinstance(bucket, Mapping):
                raise TypeError(
                    f"by_length[{key!r}] must be a mapping, got {type(bucket).__name__}"
                )
            bucket = dict(bucket)
            bad = sorted(k for k in bucket if k in POLICY_KEYS and k not in BUCKET_KEYS)
            if bad:
                raise ValueError(
                    f"by_length[{key!r}] sets {bad}: a bucket may set scorer parameters and "
                    f"{list(BUCKET_KEYS)}; backend, min_len, min_query_len and padding are the "
                    "policy's own"
                )
            cfg = dict(self.base_config)
            if "scorer" in bucket and bucket["scorer"] != cfg.get("scorer"):
                cfg = self._grid_keys(cfg)
            # inherited: the policy's per-layer overrides (the bucket's own entries win) and its
            # dense layers (unless the bucket names its own)
            cfg["layers"] = {**self.layers_spec, **dict(bucket.pop("layers", None) or {})}
            cfg["dense_layers"] = bucket.pop("dense_layers", sorted(self.dense_layers))
            cfg.update(bucket)
            sub = PrismPolicy.from_dict({**cfg, "backend": self.backend, "padding": self.padding})
            if sub.kv_block_size != self.kv_block_size:
                raise ValueError(
                    f"by_length[{key!r}] has KV block {sub.kv_block_size}, the policy "
                    f"{self.kv_block_size}: one block_size (KV block) for every length; a "
                    "bucket may set its own q_block_size"
                )
            out[int(key)] = sub
        return out

    def _grid_keys(self, base: Mapping[str, Any]) -> dict[str, Any]:
        """The block-grid keys another scorer inherits from the policy's (``block_size`` and,
        where set, ``q_block_size``): one grid for every layer of a length bucket."""
        out = {"block_size": base.get("block_size", self.kv_block_size)}
        if base.get("q_block_size"):
            out["q_block_size"] = base["q_block_size"]
        return out

    @property
    def kv_block_size(self) -> int:
        """BSK: the KV block (``block_size`` is BS or, with ``q_block_size``, ``(BSQ, BSK)``)."""
        return block_dims(self.block_size)[1]

    @property
    def min_len(self) -> int:
        """The explicit ``min_len``, or the CPU default (two blocks) when none was given."""
        return 2 * self.kv_block_size if self._min_len is None else self._min_len

    def min_len_for(self, device: torch.device) -> int:
        """Keys below this many tokens run dense on ``device`` (see ``min_len``)."""
        if self._min_len is not None:
            return self._min_len
        if device.type != "cuda":
            return 2 * self.kv_block_size
        from .graphs import plain_prefill_assumed

        return CUDA_GRAPH_MIN_LEN if plain_prefill_assumed() else CUDA_MIN_LEN

    def _build_layer(self, idx: int, spec: dict[str, Any]) -> Scorer | None:
        spec = dict(spec)
        if spec.pop("dense", False) or idx in self.dense_layers:
            return None
        if not spec:
            return self.scorer
        if self.base_config is None:
            raise ValueError(
                "per-layer scorer parameters need the policy's scorer given by name or config, "
                "not as a built Scorer"
            )
        if "scorer" in spec and spec["scorer"] != self.base_config.get("scorer"):
            cfg = self._grid_keys(self.base_config)
        else:
            cfg = dict(self.base_config)
        cfg.update(spec)
        return build_scorer(cfg)

    @classmethod
    def from_config(
        cls, source: str | Path | Mapping[str, Any], overrides: Sequence[str] = (), **params: Any
    ) -> PrismPolicy:
        """A policy from a YAML file or mapping (``configs/hf/*.yaml``): scorer keys plus the
        policy keys ``backend``, ``min_len``, ``min_query_len``, ``dense_layers``, ``layers``,
        ``padding``, ``by_length``. ``overrides`` are ``key=value`` strings, ``params`` keyword overrides."""
        from .config import load_config

        cfg = load_config(source, overrides)
        cfg.update(params)
        return cls.from_dict(cfg)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> PrismPolicy:
        cfg = dict(cfg)
        kw = {k: cfg.pop(k) for k in POLICY_KEYS if k in cfg}
        if "scorer" not in cfg:
            cfg["scorer"] = "prism"
        return cls(cfg, **kw)

    def for_length(self, kv_len: int | None) -> PrismPolicy:
        """The policy whose layers run a call over ``kv_len`` keys: the ``by_length`` bucket of
        the largest length <= ``kv_len``, else this policy."""
        if kv_len is not None:
            for key in self._bucket_keys:
                if kv_len >= key:
                    return self.by_length[key]
        return self

    def scorer_for(self, layer_idx: int | None, kv_len: int | None = None) -> Scorer | None:
        """The scorer of layer ``layer_idx`` for a call over ``kv_len`` keys (``None``: that layer
        runs dense; ``kv_len`` None: the base, length-independent choice)."""
        if kv_len is not None and self._bucket_keys:
            return self.for_length(kv_len).scorer_for(layer_idx)
        if layer_idx is None:
            return self.scorer
        return self._layer_scorers.get(layer_idx, self.scorer)

    @property
    def max_layer(self) -> int | None:
        """The highest layer index the policy names (None if it names none)."""
        named = set(self.dense_layers) | set(self.layer_overrides)
        for sub in self.by_length.values():
            if sub.max_layer is not None:
                named.add(sub.max_layer)
        return max(named) if named else None

    def describe(self, routing: bool = True) -> str:
        """One line: the scorer's main knobs, the backend and the per-layer control
        (``routing=False``: without backend and ``min_len``, as a ``by_length`` bucket)."""
        c = self.scorer.config
        parts = [f"{self.scorer.name} threshold={getattr(c, 'threshold', '-')}"]
        if routing:
            ml = "auto" if self._min_len is None else self._min_len
            parts.append(f"block={self.block_size} backend={self.backend} min_len={ml}")
        else:
            parts.append(f"block={self.block_size}")
        if self.dense_layers:
            parts.append(f"dense layers {sorted(self.dense_layers)}")
        if self.layers_spec:
            parts.append(f"overrides {self.layers_spec}")
        for key in sorted(self.by_length):
            sub = self.by_length[key]
            # a bucket routes as its policy does: its part leaves out backend and min_len
            parts.append(f"from {key} keys: [{sub.describe(routing=False)}]")
        return ", ".join(parts)

    def __repr__(self) -> str:
        parts = [f"scorer={self.scorer!r}", f"backend={self.backend!r}", f"min_len={self.min_len}"]
        if self.dense_layers:
            parts.append(f"dense_layers={sorted(self.dense_layers)}")
        if self.layers_spec:
            parts.append(f"layers={self.layers_spec}")
        if self.by_length:
            parts.append(f"by_length={sorted(self.by_length)}")
        return f"PrismPolicy({', '.join(parts)})"


def as_policy(
    policy: PrismPolicy | None = None,
    config: str | Path | Mapping[str, Any] | None = None,
    scorer: Any = None,
    backend: str | None = None,
    params: Mapping[str, Any] | None = None,
) -> PrismPolicy:
    """One policy from the ways :func:`prism.patch_model` accepts one: a built ``policy``, a
    ``config`` (file or mapping; ``scorer`` / ``backend`` / ``params`` override it), or a scorer
    and its parameters (defaults ``"prism"`` on ``"flex"``)."""
    params = dict(params or {})
    if policy is not None:
        if config is not None or params or backend is not None:
            raise ValueError("pass either policy= or scorer/config parameters, not both")
        return policy
    if config is not None:
        if backend is not None:
            params["backend"] = backend
        if scorer is not None:
            params["scorer"] = scorer
        return PrismPolicy.from_config(config, **params)
    return PrismPolicy(
        "prism" if scorer is None else scorer, "flex" if backend is None else backend, **params
    )


_DEFAULT_POLICY: PrismPolicy | None = None


def default_policy() -> PrismPolicy:
    """The policy of modules that carry none (models loaded with ``attn_implementation="prism"``
    and never patched); built on first use."""
    global _DEFAULT_POLICY
    if _DEFAULT_POLICY is None:
        _DEFAULT_POLICY = PrismPolicy()
    return _DEFAULT_POLICY


def set_default_policy(
    scorer: Any = None,
    backend: str | None = None,
    *,
    config: str | Path | Mapping[str, Any] | None = None,
    policy: PrismPolicy | None = None,
    **params: Any,
) -> PrismPolicy:
    """Set the process-wide default policy (same arguments as :func:`prism.patch_model`)."""
    global _DEFAULT_POLICY
    _DEFAULT_POLICY = as_policy(policy, config, scorer, backend, params)
    return _DEFAULT_POLICY


def reset_default_policy() -> None:
    """Forget the default policy: the next :func:`default_policy` builds ``PrismPolicy()``."""
    global _DEFAULT_POLICY
    _DEFAULT_POLICY = None


__all__ = [
    "BUCKET_KEYS",
    "CUDA_GRAPH_MIN_LEN",
    "CUDA_MIN_LEN",
    "PADDING_MODES",
    "POLICY_KEYS",
    "PrismPolicy",
    "as_policy",
    "default_policy",
    "reset_default_policy",
    "set_default_policy",
]
