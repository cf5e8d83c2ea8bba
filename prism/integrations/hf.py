"""Hugging Face transformers integration: Prism as an attention implementation.

Importing this module registers ``"prism"`` in ``transformers.AttentionInterface`` (the attention
function) and in ``AttentionMaskInterface`` (the mask builder), so both work::

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="prism")
    prism.patch_model(model, scorer="prism", threshold=0.95)      # or config="configs/hf/x.yaml"

What runs where (per attention call; q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] as the model passes
them: after q/k norms and RoPE, K/V not expanded for GQA, Sk - Sq = the cached prefix P):

* pre-fill (``Sq >= min_query_len``, ``Sk >= min_len``): the layer's scorer picks the blocks,
  the backend computes attention over them (``Sk > Sq``: chunked pre-fill, same geometry with the
  offset P);
* decode (``Sq == 1``), short inputs, dense layers, non-causal modules: dense SDPA, exactly as
  ``attn_implementation="sdpa"``;
* explicit masks. A padded batch (eager): every row runs sparse on its own unpadded span, as if
  alone. Masks made of one causal key span per query row -- packed sequences, binding sliding
  windows, padding under ``torch.compile`` -- run sparse with the span applied token by token in
  the kernel (flex backends). Anything else (static caches, other masks, other backends) runs
  exact dense SDPA with the model's mask, with a one-time warning.
* ``torch.compile(model, fullgraph=True)``: one graph, no breaks. Without a KV cache,
  transformers cannot rule out packed sequences while tracing and passes an explicit mask; the
  span path above keeps that sparse and exact (a mask that is not one span per row stops with
  an error rather than running wrong).

The policy lives on the patched modules (``module._prism_policy``); a model loaded with
``attn_implementation="prism"`` and never patched uses the process-wide default policy
(:func:`set_default_policy`).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask

from ..kernels import get_backend
from ..masks import BlockSelection, block_causal, bool_to_block_lists
from ..scorers import Scorer, build_scorer

try:  # transformers is an optional dependency (pip install "prism-sparse[hf]")
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import (
        AttentionMaskInterface,
        causal_mask_function,
        prepare_padding_mask,
        sdpa_mask,
    )
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "prism.integrations.hf needs transformers: pip install 'prism-sparse[hf]' "
        "(or pip install transformers accelerate)"
    ) from exc

ATTN_NAME = "prism"

#: keys of a policy config that are not scorer parameters
POLICY_KEYS = ("backend", "min_len", "min_query_len", "dense_layers", "layers", "padding")
PADDING_MODES = ("sparse", "dense")


# --------------------------------------------------------------------------------------------
# policy
# --------------------------------------------------------------------------------------------
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
        min_len: keys below this many tokens (Sk) run dense; default two blocks.
        min_query_len: fewer new queries (Sq) than this run dense; default 2, i.e. decode is dense.
        dense_layers: an int N (the first N layers run dense) or a list of layer indices.
        layers: per-layer overrides ``{layer: {...}}``; a key is an index, ``"a-b"`` or
            ``"a,b"``; a value holds scorer parameters merged into the base ones (e.g.
            ``{"threshold": 0.98}``), optionally ``scorer`` (another scorer) or ``dense: true``.
        padding: ``"sparse"`` (each padded row sparse on its own span, eager mode) or ``"dense"``.
        **params: scorer parameters (``threshold``, ``block_size``, ...).
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
        self.min_len = 2 * self.block_size if min_len is None else int(min_len)
        if self.min_len < 1:
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
        self.stats: PrismStats | None = None

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
            cfg = {"block_size": self.base_config.get("block_size", self.block_size)}
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
        ``padding``. ``overrides`` are ``key=value`` strings, ``params`` keyword overrides."""
        from ..config import load_config

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

    def scorer_for(self, layer_idx: int | None) -> Scorer | None:
        """The scorer of layer ``layer_idx`` (``None``: that layer runs dense)."""
        if layer_idx is None:
            return self.scorer
        return self._layer_scorers.get(layer_idx, self.scorer)

    @property
    def max_layer(self) -> int | None:
        """The highest layer index the policy names (None if it names none)."""
        named = set(self.dense_layers) | set(self.layer_overrides)
        return max(named) if named else None

    def describe(self) -> str:
        """One line: the scorer's main knobs, the backend and the per-layer control."""
        c = self.scorer.config
        parts = [f"{self.scorer.name} threshold={getattr(c, 'threshold', '-')}"]
        parts.append(f"block={self.block_size} backend={self.backend} min_len={self.min_len}")
        if self.dense_layers:
            parts.append(f"dense layers {sorted(self.dense_layers)}")
        if self.layers_spec:
            parts.append(f"overrides {self.layers_spec}")
        return ", ".join(parts)

    def __repr__(self) -> str:
        parts = [f"scorer={self.scorer!r}", f"backend={self.backend!r}", f"min_len={self.min_len}"]
        if self.dense_layers:
            parts.append(f"dense_layers={sorted(self.dense_layers)}")
        if self.layers_spec:
            parts.append(f"layers={self.layers_spec}")
        return f"PrismPolicy({', '.join(parts)})"


def _as_policy(
    policy: PrismPolicy | None,
    config: str | Path | Mapping[str, Any] | None,
    scorer: Any,
    backend: str | None,
    params: dict[str, Any],
) -> PrismPolicy:
    if policy is not None:
        if config is not None or params or backend is not None:
            raise ValueError("pass either policy= or scorer/config parameters, not both")
        return policy
    if config is not None:
        extra = dict(params)
        if backend is not None:
            extra["backend"] = backend
        if scorer is not None:
            extra["scorer"] = scorer
        return PrismPolicy.from_config(config, **extra)
    return PrismPolicy(
        "prism" if scorer is None else scorer, "flex" if backend is None else backend, **params
    )


_DEFAULT_POLICY: PrismPolicy | None = None


def default_policy() -> PrismPolicy:
    """The policy of models loaded with ``attn_implementation="prism"`` and never patched."""
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
    """Set the process-wide default policy (same arguments as :func:`patch_model`)."""
    global _DEFAULT_POLICY
    _DEFAULT_POLICY = _as_policy(policy, config, scorer, backend, params)
    return _DEFAULT_POLICY


# --------------------------------------------------------------------------------------------
# statistics (collected only while a PrismStats is attached: the default path pays nothing)
# --------------------------------------------------------------------------------------------
@dataclass
class LayerStats:
    """Per-layer counters. ``density`` = selected / causal blocks over every sparse call, batch
    row and head; ``recall`` = mean share of the true attention mass inside the selection."""

    calls: int = 0
    sparse_calls: int = 0
    dense_calls: Counter = field(default_factory=Counter)
    selected_blocks: int = 0
    causal_blocks: int = 0
    recall_sum: float = 0.0
    recall_calls: int = 0

    @property
    def density(self) -> float | None:
        return self.selected_blocks / self.causal_blocks if self.causal_blocks else None

    @property
    def recall(self) -> float | None:
        return self.recall_sum / self.recall_calls if self.recall_calls else None


class PrismStats:
    """Per-layer density (and optional attention recall) of the sparse pre-fill calls.

    ``recall``: False, True (every layer: costs a dense fp32 attention per layer) or a list of
    layer indices. ``defer_recall``: keep copies of those layers' q/k and compute the recall
    when it is first read, so that a timed forward pass does not pay for it. Collected in eager
    mode only (not inside a compiled graph).
    """

    def __init__(self, recall: bool | Sequence[int] = False, defer_recall: bool = False) -> None:
        self.recall_layers: bool | frozenset[int] = (
            recall if isinstance(recall, bool) else frozenset(int(i) for i in recall)
        )
        self.defer_recall = defer_recall
        self.layers: dict[int, LayerStats] = {}
        self._pending: list[tuple] = []

    def _layer(self, idx: int | None) -> LayerStats:
        key = -1 if idx is None else int(idx)
        if key not in self.layers:
            self.layers[key] = LayerStats()
        return self.layers[key]

    def wants_recall(self, idx: int | None) -> bool:
        if isinstance(self.recall_layers, bool):
            return self.recall_layers
        return idx is not None and idx in self.recall_layers

    def record_dense(self, idx: int | None, reason: str) -> None:
        st = self._layer(idx)
        st.calls += 1
        st.dense_calls[reason] += 1

    def record_sparse(
        self,
        idx: int | None,
        sel: BlockSelection,
        q: torch.Tensor,
        k: torch.Tensor,
        scale: float | None,
        new_call: bool = True,
    ) -> None:
        st = self._layer(idx)
        if new_call:
            st.calls += 1
            st.sparse_calls += 1
        visible, _ = sel.causal()
        n_vis = int(visible.sum())
        per_head = sel.density_per_head()  # [B, Hq]; never expands a list-form selection
        st.selected_blocks += round(float(per_head.sum()) * n_vis)
        st.causal_blocks += n_vis * per_head.numel()
        if self.wants_recall(idx):
            if self.defer_recall:
                self._pending.append((st, sel, q.detach().clone(), k.detach().clone(), scale))
            else:
                self._add_recall(st, sel, q, k, scale)

    @staticmethod
    def _add_recall(st: LayerStats, sel: BlockSelection, q, k, scale) -> None:
        from ..metrics import attention_recall, block_attention_mass

        mass = block_attention_mass(q, k, sel.block_size, scale)
        st.recall_sum += float(attention_recall(mass, sel).mean())
        st.recall_calls += 1

    def compute_pending(self) -> None:
        """Compute the deferred recalls (done automatically when ``recall`` is read)."""
        while self._pending:
            self._add_recall(*self._pending.pop(0))

    # -- views ------------------------------------------------------------------------------
    @property
    def density(self) -> dict[int, float]:
        """{layer: density} over the layers that ran sparse."""
        return {i: s.density for i, s in sorted(self.layers.items()) if s.density is not None}

    @property
    def recall(self) -> dict[int, float]:
        """{layer: mean attention recall} over the layers it was asked for."""
        self.compute_pending()
        return {i: s.recall for i, s in sorted(self.layers.items()) if s.recall is not None}

    @property
    def overall_density(self) -> float | None:
        """Selected / causal blocks over every sparse layer (dense layers not counted)."""
        sel = sum(s.selected_blocks for s in self.layers.values())
        tot = sum(s.causal_blocks for s in self.layers.values())
        return sel / tot if tot else None

    def summary(self) -> str:
        """A small per-layer table."""
        self.compute_pending()
        lines = [f"{'layer':>5} {'calls':>5} {'sparse':>6} {'density':>8} {'recall':>7}  dense"]
        for i, s in sorted(self.layers.items()):
            d = "-" if s.density is None else f"{s.density:.3f}"
            r = "-" if s.recall is None else f"{s.recall:.3f}"
            why = ", ".join(f"{k}:{v}" for k, v in sorted(s.dense_calls.items()))
            lines.append(f"{i:>5} {s.calls:>5} {s.sparse_calls:>6} {d:>8} {r:>7}  {why}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        od = self.overall_density
        return f"PrismStats(layers={len(self.layers)}, overall_density={od})"


# --------------------------------------------------------------------------------------------
# the mask builder registered in AttentionMaskInterface
# --------------------------------------------------------------------------------------------
def _compiling() -> bool:
    return torch.compiler.is_compiling()


def prism_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    **kwargs: Any,
) -> torch.Tensor | None:
    """Mask builder for ``attn_implementation="prism"``.

    Returns ``None`` when the attention is plain causal over the keys the model passes (the
    queries are the last ``q_length`` keys) and nothing is padded: the attention function then
    applies causal attention with the cached-prefix offset itself. Otherwise it returns the 4D
    boolean mask SDPA would get; for "plain causal + padding" the 2D padding mask rides along as
    ``mask._prism_padding`` so that the rows can run sparse on their own spans.
    """
    plain = (
        allow_is_causal_skip
        and (
            mask_function is causal_mask_function
            or (local_size is not None and kv_length <= local_size)
        )
        and not isinstance(q_offset, torch.Tensor)
        and kv_offset == 0
        and q_offset + q_length == kv_length
    )
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is not None and padding.shape[-1] > kv_length:
        padding = padding[:, kv_offset : kv_offset + kv_length]
    if plain and padding is None:
        return None
    compiling = _compiling()
    if plain and not compiling and bool(padding.all()):
        return None
    kwargs.pop("allow_is_bidirectional_skip", None)
    mask = sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        local_size=local_size,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
        **kwargs,
    )
    if plain and not compiling and mask is not None:
        mask._prism_padding = padding.to(torch.bool)
    return mask


# --------------------------------------------------------------------------------------------
# the attention function registered in AttentionInterface
# --------------------------------------------------------------------------------------------
_WARNED: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key in _WARNED or _compiling():
        return
    _WARNED.add(key)
    warnings.warn(msg, stacklevel=3)


def reset_warnings() -> None:
    """Forget which one-time warnings were shown (for tests)."""
    _WARNED.clear()


def _dense(module, q, k, v, mask, dropout, scaling, causal, kwargs):
    """Exactly what ``attn_implementation="sdpa"`` does, plus the cached-prefix causal mask when
    the mask builder returned None for a chunked pre-fill (SDPA's is_causal is top-left)."""
    sq, sk = q.shape[2], k.shape[2]
    if mask is None and causal and 1 < sq < sk:
        qpos = torch.arange(sq, device=q.device) + (sk - sq)
        mask = (qpos[:, None] >= torch.arange(sk, device=q.device)[None, :])[None, None]
    return sdpa_attention_forward(
        module, q, k, v, mask, dropout=dropout, scaling=scaling, is_causal=causal, **kwargs
    )


def _sparse(policy: PrismPolicy, scorer: Scorer, q, k, v, scaling):
    sel = scorer(q, k)
    out = get_backend(policy.backend)(q, k, v, sel.block_mask(), scale=scaling)
    return out, sel


def _route(policy: PrismPolicy, scorer: Scorer | None, sq: int, sk: int) -> str | None:
    """Why this call runs dense (None: it runs sparse)."""
    if sq < 2:
        return "decode"
    if sq < policy.min_query_len:
        return "short_query"
    if sk < policy.min_len:
        return "short"
    if scorer is None:
        return "dense_layer"
    return None


def _padded_rows(module, policy, scorer, layer, q, k, v, mask, padding, dropout, scaling, kwargs):
    """Padded batch: every row runs on its own valid span (sparse where long enough)."""
    b, hq, sq, d = q.shape
    sk = k.shape[2]
    prefix = sk - sq
    out = q.new_zeros(b, hq, sq, v.shape[-1])
    stats = policy.stats
    for row in range(b):
        idx = padding[row].nonzero().flatten()
        if idx.numel() == 0:
            continue  # an all-padding row: its outputs are never used
        s, e = int(idx[0]), int(idx[-1]) + 1
        qs = max(prefix, s)
        if e - s != idx.numel() or qs >= e:
            # not one contiguous span (or no valid query): dense with the model's mask
            o, _ = _dense(
                module,
                q[row : row + 1],
                k[row : row + 1],
                v[row : row + 1],
                mask[row : row + 1],
                dropout,
                scaling,
                True,
                kwargs,
            )
            out[row] = o[0].transpose(0, 1)
            continue
        qr = q[row : row + 1, :, qs - prefix : e - prefix]
        kr, vr = k[row : row + 1, :, s:e], v[row : row + 1, :, s:e]
        why = _route(policy, scorer, qr.shape[2], kr.shape[2])
        if why is None:
            o, sel = _sparse(policy, scorer, qr, kr, vr, scaling)
            if stats is not None:
                stats.record_sparse(layer, sel, qr, kr, scaling, new_call=False)
            out[row, :, qs - prefix : e - prefix] = o[0]
        else:
            o, _ = _dense(module, qr, kr, vr, None, dropout, scaling, True, kwargs)
            out[row, :, qs - prefix : e - prefix] = o[0].transpose(0, 1)
    return out.transpose(1, 2).contiguous()


def _plain_causal(mask: torch.Tensor, sq: int, sk: int) -> torch.Tensor:
    """0-dim bool tensor: is this explicit mask just causal attention with the cached-prefix
    offset (every row of the batch, no padding, no window)? Boolean or additive masks."""
    allowed = mask if mask.dtype == torch.bool else mask == 0
    qpos = torch.arange(sq, device=mask.device) + (sk - sq)
    expected = qpos[:, None] >= torch.arange(sk, device=mask.device)[None, :]
    ok = (allowed == expected).all()
    if mask.dtype != torch.bool:
        ok = ok & ((mask == 0) | (mask <= torch.finfo(mask.dtype).min / 2)).all()
    return ok


def _mask_spans(mask: torch.Tensor, sq: int, sk: int):
    """Describe each query row of a 4D mask [B, 1, Sq, Sk] as one span of keys.

    Returns (start, count, ok): int [B, Sq] (row q allows keys start <= kv < start + count) and a
    0-dim bool tensor, True iff every row really is one span inside the causal frontier (true
    for causal masks with left/right padding, packed sequences and sliding windows). Both are
    reductions: FlexAttention's Inductor lowering takes them as mask_mod buffers.
    """
    allowed = (mask if mask.dtype == torch.bool else mask == 0)[:, 0]
    as_int = allowed.to(torch.int32)
    start = (as_int.cumsum(-1) == 0).sum(-1)  # leading masked keys = first allowed key
    count = as_int.sum(-1)
    trailing = (as_int.flip(-1).cumsum(-1) == 0).sum(-1)
    qpos = torch.arange(sq, device=mask.device) + (sk - sq)
    one_span = (count == 0) | (start + count + trailing == sk)
    causal = (count == 0) | (start + count - 1 <= qpos)
    return start, count, (one_span & causal).all()


def _span_sparse(policy: PrismPolicy, scorer: Scorer, q, k, v, mask, scaling):
    """Sparse attention under an explicit mask made of one key span per query row: the scorer's
    blocks, every one of them masked token by token to the row's span (exact)."""
    b, _, sq, _ = q.shape
    sk = k.shape[2]
    start, count, ok = _mask_spans(mask, sq, sk)
    if start.shape[0] != b:
        start, count = start.expand(b, -1).contiguous(), count.expand(b, -1).contiguous()
    sel = scorer(q, k)
    visible, _ = block_causal(sq, sk, sel.block_size, q.device)
    num, idx = bool_to_block_lists(sel.mask & visible)

    def span_mask_mod(bi, h, q_idx, kv_idx):
        s0 = start[bi, q_idx]
        return (kv_idx >= s0) & (kv_idx < s0 + count[bi, q_idx])

    bm = BlockMask.from_kv_blocks(
        num,
        idx,
        BLOCK_SIZE=sel.block_size,
        mask_mod=span_mask_mod,
        seq_lengths=(sq, sk),
        compute_q_blocks=False,
    )
    out = get_backend(policy.backend)(q, k, v, bm, scale=scaling)
    return out, sel, ok


def _sparse_out(policy, scorer, q, k, v, scaling) -> torch.Tensor:
    out, _ = _sparse(policy, scorer, q, k, v, scaling)
    return out.transpose(1, 2).contiguous()


def _masked_prefill(
    module, policy, scorer, layer, stats, compiling, q, k, v, mask, dropout, scaling, kwargs
):
    """A pre-fill that got an explicit mask. Returns (why dense, None) or (None, out)."""
    sq, sk = q.shape[2], k.shape[2]
    shaped = isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-2:] == (sq, sk)
    spans_ok = shaped and sq == sk and get_backend(policy.backend).honours_mask_mod
    if not shaped:
        return "mask", None
    if compiling:
        # transformers cannot read data while tracing, so it hands over explicit masks (its
        # packed-sequence guess when there is no cache, any padding mask): run sparse over each
        # row's key span, exactly; a mask that is not one span per row stops with an error
        if not (spans_ok and policy.padding == "sparse"):
            return "mask", None
        out, _, ok = _span_sparse(policy, scorer, q, k, v, mask, scaling)
        torch._assert_async(
            ok,
            "Prism under torch.compile: this attention mask is not one causal key span per "
            "query row; run it eagerly or with attn_implementation='sdpa'",
        )
        return None, out.transpose(1, 2).contiguous()

    padding = getattr(mask, "_prism_padding", None)
    if padding is not None and policy.padding == "sparse":
        if stats is not None:
            stats._layer(layer).calls += 1
            stats._layer(layer).sparse_calls += 1
        out = _padded_rows(
            module, policy, scorer, layer, q, k, v, mask, padding, dropout, scaling, kwargs
        )
        return None, out
    kind = getattr(mask, "_prism_kind", None)  # classified once: every layer gets this object
    if kind is None:
        if bool(_plain_causal(mask, sq, sk)):
            kind = "plain"
        elif spans_ok and padding is None and bool(_mask_spans(mask, sq, sk)[2]):
            kind = "spans"
        else:
            kind = "other"
        mask._prism_kind = kind
    if kind == "plain":
        out, sel = _sparse(policy, scorer, q, k, v, scaling)
    elif kind == "spans" and policy.padding == "sparse":
        out, sel, _ = _span_sparse(policy, scorer, q, k, v, mask, scaling)
    else:
        _warn_once(
            "mask",
            "Prism: this pre-fill got an attention mask it cannot run sparse (padding with "
            "padding='dense', a static cache, a mask that is not one causal key span per row, "
            "or a non-flex backend); running exact dense SDPA with the mask instead.",
        )
        return "mask", None
    if stats is not None:
        stats.record_sparse(layer, sel, q, k, scaling)
    return None, out.transpose(1, 2).contiguous()


def prism_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``"prism"`` attention function (transformers' AttentionInterface signature).

    query [B, Hq, Sq, D], key/value [B, Hkv, Sk, D] (Sk >= Sq, post-RoPE, unexpanded) ->
    (out [B, Sq, Hq, D], None). See the module docstring for what runs sparse.
    """
    policy: PrismPolicy = getattr(module, "_prism_policy", None) or default_policy()
    layer = getattr(module, "layer_idx", None)
    scorer = policy.scorer_for(layer)
    compiling = _compiling()
    stats = None if compiling else policy.stats
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    sq, sk = query.shape[2], key.shape[2]
    if kwargs.get("softcap") is not None:
        raise NotImplementedError(
            "Prism attention does not support attention logit soft-capping; "
            "load this model with attn_implementation='eager'"
        )

    if not causal:
        why = "non_causal"
    elif dropout > 0.0:
        why = "dropout"
        _warn_once("dropout", "Prism: attention dropout is on (training mode); running dense.")
    else:
        why = _route(policy, scorer, sq, sk)

    if why is None and attention_mask is not None:
        why, out = _masked_prefill(
            module, policy, scorer, layer, stats, compiling, query, key, value,
            attention_mask, dropout, scaling, kwargs,
        )  # fmt: skip
        if out is not None:
            return out, None

    if why is not None:
        if stats is not None:
            stats.record_dense(layer, why)
        return _dense(module, query, key, value, attention_mask, dropout, scaling, causal, kwargs)

    out, sel = _sparse(policy, scorer, query, key, value, scaling)
    if stats is not None:
        stats.record_sparse(layer, sel, query, key, scaling)
    return out.transpose(1, 2).contiguous(), None


def register(name: str = ATTN_NAME, fn=None) -> str:
    """Register ``fn`` (default :func:`prism_attention_forward`) and :func:`prism_mask` under
    ``name`` in transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(name, prism_attention_forward if fn is None else fn)
    AttentionMaskInterface.register(name, prism_mask)
    return name


register()


# --------------------------------------------------------------------------------------------
# patching models
# --------------------------------------------------------------------------------------------
def _policy_targets(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The modules the attention interface receives as ``module``: attention modules (by class
    name) and anything carrying a ``layer_idx``."""
    for mod in model.modules():
        if hasattr(mod, "layer_idx") or "attention" in type(mod).__name__.lower():
            yield mod


def get_policy(model: torch.nn.Module) -> PrismPolicy | None:
    """The policy ``patch_model`` attached to ``model`` (None if not patched)."""
    return getattr(model, "_prism_policy", None)


def patch_model(
    model: torch.nn.Module,
    scorer: str | Mapping[str, Any] | Scorer | None = None,
    backend: str | None = None,
    *,
    config: str | Path | Mapping[str, Any] | None = None,
    policy: PrismPolicy | None = None,
    **params: Any,
) -> torch.nn.Module:
    """Make a transformers model run Prism attention; returns the model (patched in place).

    ``prism.patch_model(model, scorer="prism", threshold=0.95)``, or from a YAML policy:
    ``prism.patch_model(model, config="configs/hf/smollm2.yaml")`` (keyword arguments override
    the file). Policy keywords: ``backend``, ``min_len``, ``min_query_len``, ``dense_layers``,
    ``layers``, ``padding`` (see :class:`PrismPolicy`); the rest go to the scorer. Calling it again
    replaces the policy; :func:`unpatch_model` undoes it.
    """
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        raise TypeError(
            f"patch_model expects a transformers PreTrainedModel, got {type(model).__name__}"
        )
    pol = _as_policy(policy, config, scorer, backend, params)
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if pol.max_layer is not None and isinstance(n_layers, int) and pol.max_layer >= n_layers:
        warnings.warn(
            f"Prism policy names layer {pol.max_layer} but the model has {n_layers} layers; "
            "the extra per-layer settings are unused",
            stacklevel=2,
        )
    register()
    if get_policy(model) is None:
        model._prism_previous_attn = model.config._attn_implementation
    if model.config._attn_implementation != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)
        if model.config._attn_implementation != ATTN_NAME:
            raise RuntimeError(
                f"{type(model).__name__} does not route attention through transformers' "
                "AttentionInterface, so Prism cannot be plugged in"
            )
    for mod in _policy_targets(model):
        mod._prism_policy = pol
    model._prism_policy = pol
    return model


def unpatch_model(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch_model`: restore the previous attention implementation (``sdpa`` if the
    model was loaded with ``attn_implementation="prism"``)."""
    if get_policy(model) is None and model.config._attn_implementation != ATTN_NAME:
        return model
    previous = getattr(model, "_prism_previous_attn", None)
    if previous in (None, ATTN_NAME):
        previous = "sdpa"
    model.set_attn_implementation(previous)
    for mod in _policy_targets(model):
        if "_prism_policy" in mod.__dict__:
            del mod.__dict__["_prism_policy"]
    for attr in ("_prism_policy", "_prism_previous_attn"):
        model.__dict__.pop(attr, None)
    return model


@contextlib.contextmanager
def patched(model: torch.nn.Module, scorer: Any = None, backend: str | None = None, **kwargs):
    """``with prism.patched(model, threshold=0.9): model.generate(...)`` -- restores the previous
    state (unpatched, or the previous policy) on exit."""
    before = get_policy(model)
    patch_model(model, scorer, backend, **kwargs)
    try:
        yield model
    finally:
        if before is None:
            unpatch_model(model)
        else:
            patch_model(model, policy=before)


@contextlib.contextmanager
def collect_stats(
    model: torch.nn.Module | None = None,
    recall: bool | Sequence[int] = False,
    defer_recall: bool = False,
):
    """``with prism.collect_stats(model, recall=[12]) as stats: model(ids)`` -> per-layer density
    (``stats.density``), recall on the chosen layers (``stats.recall``), ``stats.summary()``.
    ``model=None`` collects for the default policy (models loaded with
    ``attn_implementation="prism"`` and never patched). See :class:`PrismStats`."""
    pol = (get_policy(model) if model is not None else None) or default_policy()
    before = pol.stats
    stats = PrismStats(recall, defer_recall=defer_recall)
    pol.stats = stats
    try:
        yield stats
    finally:
        pol.stats = before


__all__ = [
    "ATTN_NAME",
    "LayerStats",
    "PrismPolicy",
    "PrismStats",
    "collect_stats",
    "default_policy",
    "get_policy",
    "patch_model",
    "patched",
    "prism_attention_forward",
    "prism_mask",
    "register",
    "set_default_policy",
    "unpatch_model",
]
