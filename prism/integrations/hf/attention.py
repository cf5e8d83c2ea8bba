"""The ``"prism"`` attention function (transformers' ``AttentionInterface``) and its routing.

Per call (q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] as the model passes them: post-RoPE, K/V not
expanded for GQA, Sk - Sq = the cached prefix P) one of:

* sparse: the layer's scorer picks the blocks, the policy's backend attends over them;
* dense: exactly ``attn_implementation="sdpa"`` (decode, short inputs, dense layers, dropout,
  non-causal modules, masks that cannot run sparse);
* an explicit mask (:mod:`.masks`): padded rows each sparse on their own span, or the scorer's
  blocks masked token by token to one key span per query row (backends that honour the
  BlockMask's ``mask_mod``), or dense with the mask.

Everything a path needs besides the tensors travels in one :class:`AttentionCall`.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ...graphs import stream_capturing
from ...kernels import Backend, get_backend
from ...masks import BlockSelection, block_causal, bool_to_block_lists
from ...masks.blockmask import span_block_mask
from ...policy import PrismPolicy, default_policy
from ...scorers import Scorer
from ...stats import PrismStats
from .masks import cached_fact, mask_spans, padding_of, plain_causal

logger = logging.getLogger("prism")


@dataclass
class AttentionCall:
    """One call of the attention function: what the dense and sparse paths need besides q/k/v.

    ``scorer`` is the layer's scorer (``None``: a dense layer); ``stats`` the statistics being
    collected (``None`` when off or while compiling); ``kwargs`` the extra keywords transformers
    passed (forwarded to SDPA on the dense path).
    """

    module: torch.nn.Module
    policy: PrismPolicy
    scorer: Scorer | None
    layer: int | None
    stats: PrismStats | None
    scaling: float | None
    dropout: float = 0.0
    causal: bool = True
    compiling: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def backend(self) -> Backend:
        return get_backend(self.policy.backend)


# --------------------------------------------------------------------------------------------
# one-time warnings
# --------------------------------------------------------------------------------------------
_WARNED: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key in _WARNED or torch.compiler.is_compiling():
        return
    _WARNED.add(key)
    warnings.warn(msg, stacklevel=3)


def reset_warnings() -> None:
    """Forget which one-time warnings were shown (for tests)."""
    _WARNED.clear()


# --------------------------------------------------------------------------------------------
# the paths
# --------------------------------------------------------------------------------------------
def _to_hf(out: torch.Tensor) -> torch.Tensor:
    """[B, Hq, Sq, D] (the backends' layout) -> [B, Sq, Hq, D] (what transformers expects)."""
    return out.transpose(1, 2).contiguous()


def _route(call: AttentionCall, sq: int, sk: int, device: torch.device) -> str | None:
    """Why a causal call of Sq queries over Sk keys runs dense (None: it runs sparse)."""
    if sq < 2:
        return "decode"
    if sq < call.policy.min_query_len:
        return "short_query"
    min_len = call.policy.min_len_for(device)
    if sk < min_len:
        _log_choice(call.policy, "dense", sk, min_len, device)
        return "short"
    if call.scorer is None:
        return "dense_layer"
    _log_choice(call.policy, "sparse", sk, min_len, device)
    return None


_LOGGED: set = set()


def _log_choice(policy, choice: str, sk: int, min_len: int, device: torch.device) -> None:
    """Log once per (policy, choice, device type, min_len) whether pre-fills run sparse or dense."""
    key = (id(policy), choice, device.type, min_len)
    if key in _LOGGED or torch.compiler.is_compiling():
        return
    _LOGGED.add(key)
    rel = ">=" if choice == "sparse" else "<"
    logger.info(
        "Prism: pre-fill of %d keys %s min_len %d on %s: %s (%s)",
        sk, rel, min_len, device.type, choice, policy.describe(),
    )  # fmt: skip


def _dense(call: AttentionCall, q, k, v, mask, causal: bool | None = None):
    """Exactly what ``attn_implementation="sdpa"`` does, plus the cached-prefix causal mask when
    the mask builder returned None for a chunked pre-fill (SDPA's is_causal is top-left).
    Returns what SDPA returns: (out [B, Sq, Hq, D], None)."""
    causal = call.causal if causal is None else causal
    sq, sk = q.shape[2], k.shape[2]
    if mask is None and causal and 1 < sq < sk:
        qpos = torch.arange(sq, device=q.device) + (sk - sq)
        mask = (qpos[:, None] >= torch.arange(sk, device=q.device)[None, :])[None, None]
    return sdpa_attention_forward(
        call.module,
        q,
        k,
        v,
        mask,
        dropout=call.dropout,
        scaling=call.scaling,
        is_causal=causal,
        **call.kwargs,
    )


def _sparse(call: AttentionCall, q, k, v) -> tuple[torch.Tensor, BlockSelection]:
    """Causal sparse attention over the scorer's blocks: (out [B, Hq, Sq, D], selection)."""
    sel = call.scorer(q, k)
    out = call.backend(q, k, v, sel.block_mask(), scale=call.scaling)
    return out, sel


def _span_sparse(call: AttentionCall, q, k, v, mask):
    """Sparse attention under an explicit mask [B|1, 1, Sq, Sk] made of one key span per query
    row: the scorer's blocks, every one of them masked token by token to the row's span (exact).
    Returns (out [B, Hq, Sq, D], selection, ok): ``ok`` a 0-dim bool tensor, False if the mask
    was not one causal span per row after all."""
    b, _, sq, _ = q.shape
    sk = k.shape[2]
    start, count, ok = mask_spans(mask, sq, sk)
    if start.shape[0] != b:
        start, count = start.expand(b, -1).contiguous(), count.expand(b, -1).contiguous()
    sel = call.scorer(q, k)
    visible, _ = block_causal(sq, sk, sel.block_size, q.device)
    num, idx = bool_to_block_lists(sel.mask & visible)
    bm = span_block_mask(num, idx, start, count, sq, sk, sel.block_size)
    out = call.backend(q, k, v, bm, scale=call.scaling)
    return out, sel, ok


def _padded_rows(call: AttentionCall, q, k, v, mask, padding) -> torch.Tensor:
    """Padded batch (``padding`` bool [B, Sk]): every row runs on its own valid span, sparse
    where long enough, as if alone. Returns out [B, Sq, Hq, D]."""
    b, hq, sq, d = q.shape
    sk = k.shape[2]
    prefix = sk - sq
    out = q.new_zeros(b, hq, sq, v.shape[-1])
    stats = call.stats
    for row in range(b):
        idx = padding[row].nonzero().flatten()
        if idx.numel() == 0:
            continue  # an all-padding row: its outputs are never used
        s, e = int(idx[0]), int(idx[-1]) + 1
        qs = max(prefix, s)
        rows = slice(row, row + 1)
        if e - s != idx.numel() or qs >= e:
            # not one contiguous span (or no valid query): dense with the model's mask
            o, _ = _dense(call, q[rows], k[rows], v[rows], mask[rows], causal=True)
            out[row] = o[0].transpose(0, 1)
            continue
        queries = slice(qs - prefix, e - prefix)
        qr = q[rows, :, queries]
        kr, vr = k[rows, :, s:e], v[rows, :, s:e]
        rc = call  # a length-bucketed policy (by_length) picks by the row's own key count
        if call.policy.by_length:
            rc = replace(call, scorer=call.policy.scorer_for(call.layer, kr.shape[2]))
        if _route(rc, qr.shape[2], kr.shape[2], qr.device) is None:
            o, sel = _sparse(rc, qr, kr, vr)
            if stats is not None:
                stats.record_sparse(call.layer, sel, qr, kr, call.scaling, new_call=False)
            out[row, :, queries] = o[0]
        else:
            o, _ = _dense(call, qr, kr, vr, None, causal=True)
            out[row, :, queries] = o[0].transpose(0, 1)
    return _to_hf(out)


def _masked_prefill(call: AttentionCall, q, k, v, mask) -> torch.Tensor | None:
    """A pre-fill that got an explicit mask: out [B, Sq, Hq, D], or None to run dense SDPA with
    the mask."""
    sq, sk = q.shape[2], k.shape[2]
    shaped = isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-2:] == (sq, sk)
    if not shaped:
        return None
    spans_ok = sq == sk and call.backend.honours_mask_mod
    sparse_padding = call.policy.padding == "sparse"
    if call.compiling:
        # transformers cannot read data while tracing, so it hands over explicit masks (its
        # packed-sequence guess when there is no cache, any padding mask): run sparse over each
        # row's key span, exactly; a mask that is not one span per row stops with an error
        if not (spans_ok and sparse_padding):
            return None
        out, _, ok = _span_sparse(call, q, k, v, mask)
        torch._assert_async(
            ok,
            "Prism under torch.compile: this attention mask is not one causal key span per "
            "query row; run it eagerly or with attn_implementation='sdpa'",
        )
        return _to_hf(out)

    padding = padding_of(mask)
    if padding is not None and sparse_padding:
        if call.stats is not None:
            call.stats.record_call(call.layer, sparse=True)
        return _padded_rows(call, q, k, v, mask, padding)
    if cached_fact(mask, "plain", lambda: plain_causal(mask, sq, sk)):
        out, sel = _sparse(call, q, k, v)
    elif (
        spans_ok
        and sparse_padding
        and padding is None
        and cached_fact(mask, "spans", lambda: mask_spans(mask, sq, sk)[2])
    ):
        out, sel, _ = _span_sparse(call, q, k, v, mask)
    else:
        _warn_once(
            "mask",
            "Prism: this pre-fill got an attention mask it cannot run sparse (padding with "
            "padding='dense', a static cache, a mask that is not one causal key span per row, "
            "or a backend that ignores mask_mod); running exact dense SDPA with the mask instead.",
        )
        return None
    if call.stats is not None:
        call.stats.record_sparse(call.layer, sel, q, k, call.scaling)
    return _to_hf(out)


# --------------------------------------------------------------------------------------------
# the attention function registered in AttentionInterface
# --------------------------------------------------------------------------------------------
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
    (out [B, Sq, Hq, D], None). See :mod:`prism.integrations.hf` for what runs sparse.
    """
    compiling = torch.compiler.is_compiling()
    if compiling and getattr(module, "_prism_eager_region", False):  # patch.compile_regions
        return _eager_region_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    # a CUDA-graph capture (prism.CUDAGraphPrefill) cannot read tensor data either: take the
    # compiled paths (explicit masks as key spans, no statistics)
    compiling = compiling or stream_capturing()
    policy: PrismPolicy = getattr(module, "_prism_policy", None) or default_policy()
    layer = getattr(module, "layer_idx", None)
    call = AttentionCall(
        module=module,
        policy=policy,
        scorer=policy.scorer_for(layer, key.shape[2]),
        layer=layer,
        stats=None if compiling else policy.stats,
        scaling=scaling,
        dropout=dropout,
        causal=is_causal if is_causal is not None else getattr(module, "is_causal", True),
        compiling=compiling,
        kwargs=kwargs,
    )
    if kwargs.get("softcap") is not None:
        raise NotImplementedError(
            "Prism attention does not support attention logit soft-capping; "
            "load this model with attn_implementation='eager'"
        )

    if not call.causal:
        why = "non_causal"
    elif dropout > 0.0:
        why = "dropout"
        _warn_once("dropout", "Prism: attention dropout is on (training mode); running dense.")
    else:
        why = _route(call, query.shape[2], key.shape[2], query.device)

    if why is None and attention_mask is not None:
        out = _masked_prefill(call, query, key, value, attention_mask)
        if out is not None:
            return out, None
        why = "mask"

    if why is not None:
        if call.stats is not None:
            call.stats.record_dense(layer, why)
        return _dense(call, query, key, value, attention_mask)

    out, sel = _sparse(call, query, key, value)
    if call.stats is not None:
        call.stats.record_sparse(layer, sel, query, key, call.scaling)
    return _to_hf(out), None


# compile_regions: the compiled decoder layer calls the attention function through this wrapper,
# which Dynamo does not trace (a graph break): the call then runs exactly as in an eager model
_eager_region_forward = torch.compiler.disable(prism_attention_forward, recursive=True)
