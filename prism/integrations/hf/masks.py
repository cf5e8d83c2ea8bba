"""The ``"prism"`` mask builder (transformers' ``AttentionMaskInterface``) and reading its masks.

The builder returns ``None`` for plain causal attention (the attention function then applies the
cached-prefix causal rule itself) and otherwise the 4D boolean mask SDPA would get. The attention
function reads an explicit mask [B, 1, Sq, Sk] as: plain causal (:func:`plain_causal`), one key
span per query row (:func:`mask_spans`: padding, packed sequences, sliding windows) or anything
else.

Notes on mask tensors. transformers builds the mask once per forward pass and hands the *same*
tensor to every layer's attention function; the builder cannot pass anything else along (no
keyword reaches the attention function). So what the builder knows (the 2D padding mask behind a
"causal + padding" mask) and what the first layer learns (is this mask plain causal, one span per
row?) ride on the mask tensor itself as a Python attribute: it is per forward pass, dies with the
mask, and costs every later layer nothing. :func:`_set_note` / :func:`_get_note` are the only two
places that touch those attributes; notes are written only in eager mode (a traced graph has no
Python attributes to carry).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

from ...graphs import stream_capturing

_NOTES = "_prism_notes"


def _set_note(mask: torch.Tensor, key: str, value: Any) -> None:
    """Attach ``value`` to this mask tensor under ``key`` (see the module docstring: why)."""
    notes = getattr(mask, _NOTES, None)
    if notes is None:
        notes = {}
        setattr(mask, _NOTES, notes)
    notes[key] = value


def _get_note(mask: torch.Tensor, key: str, default: Any = None) -> Any:
    """The value :func:`_set_note` attached to this mask tensor under ``key`` (else ``default``)."""
    return getattr(mask, _NOTES, {}).get(key, default)


def padding_of(mask: torch.Tensor) -> torch.Tensor | None:
    """The 2D padding mask bool [B, Sk] (True = a real token) behind a "plain causal + padding"
    mask made by :func:`prism_mask`; ``None`` for any other mask."""
    return _get_note(mask, "padding")


def cached_fact(mask: torch.Tensor, key: str, compute: Callable[[], bool]) -> bool:
    """``compute()`` once per mask tensor (every layer gets the same mask): later calls read the
    answer noted on the mask. Not cached under ``torch.compile``."""
    value = _get_note(mask, key)
    if value is None:
        value = bool(compute())
        if not torch.compiler.is_compiling():
            _set_note(mask, key, value)
    return value


def plain_causal(mask: torch.Tensor, sq: int, sk: int) -> torch.Tensor:
    """0-dim bool tensor: is this explicit mask [B, 1, Sq, Sk] just causal attention with the
    cached-prefix offset (every row of the batch, no padding, no window)? Boolean or additive."""
    allowed = mask if mask.dtype == torch.bool else mask == 0
    qpos = torch.arange(sq, device=mask.device) + (sk - sq)
    expected = qpos[:, None] >= torch.arange(sk, device=mask.device)[None, :]
    ok = (allowed == expected).all()
    if mask.dtype != torch.bool:
        ok = ok & ((mask == 0) | (mask <= torch.finfo(mask.dtype).min / 2)).all()
    return ok


def mask_spans(mask: torch.Tensor, sq: int, sk: int):
    """Describe each query row of a 4D mask [B, 1, Sq, Sk] as one span of keys.

    Returns (start, count, ok): int [B, Sq] (row q allows keys start <= kv < start + count) and a
    0-dim bool tensor, True iff every row really is one span inside the causal frontier (true
    for causal masks with left/right padding, packed sequences and sliding windows). All are
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
    boolean mask [B, 1, Sq, Sk] SDPA would get; for "plain causal + padding" (eager mode) the 2D
    padding mask rides along (:func:`padding_of`) so that the rows can run sparse on their own
    spans.
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
    compiling = torch.compiler.is_compiling() or stream_capturing()  # no host reads there
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
        _set_note(mask, "padding", padding.to(torch.bool))
    return mask
