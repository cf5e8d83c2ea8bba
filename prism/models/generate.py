"""Greedy decoding with a KV cache: one pre-fill (sparse when the model is patched), then one
token per step (q_len = 1: dense). Shared by the demo, the RULER-style harness and the tests."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Greedy", "cache_kwargs", "eos_ids", "greedy_decode", "greedy_generate"]


def cache_kwargs(model) -> dict[str, Any]:
    """``{<cache keyword>: DynamicCache(...), "use_cache": True}`` for ``model.forward``: the
    keyword is ``cache`` from transformers 5.2x, ``past_key_values`` before. The cache object is
    filled in place by each forward."""
    import inspect

    from transformers import DynamicCache

    params = inspect.signature(model.forward).parameters
    name = "cache" if "cache" in params else "past_key_values"
    return {name: DynamicCache(config=model.config), "use_cache": True}


def eos_ids(tokenizer, model=None) -> set[int]:
    """The end-of-sequence ids named by the model's generation config, its config and the
    tokenizer (any of them may give one id or a list)."""
    ids: set[int] = set()
    sources = (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer)
    for src in sources:
        e = getattr(src, "eos_token_id", None)
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    return ids


@dataclass
class Greedy:
    """The result of :func:`greedy_decode`: new token ids (stop token excluded) and the wall time
    of the pre-fill forward."""

    tokens: list[int] = field(default_factory=list)
    prefill_s: float = 0.0


@torch.no_grad()
def greedy_decode(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    should_stop: Callable[[list[int]], bool] | None = None,
    prefill_context: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> Greedy:
    """Greedy continuation of ``input_ids [1, S]``.

    One pre-fill forward (logits of the last position only; run inside ``prefill_context()``
    when given, e.g. to time the attention), then one token per step against the KV cache.
    Stops after ``max_new_tokens``, on a token in ``stop_ids`` (not included), or when
    ``should_stop(tokens)`` says so.
    """
    kw = cache_kwargs(model)
    ctx = prefill_context() if prefill_context is not None else contextlib.nullcontext()
    with ctx:
        t0 = time.perf_counter()
        out = model(input_ids=input_ids, logits_to_keep=1, **kw)
        prefill = time.perf_counter() - t0
    stop = {int(s) for s in stop_ids}
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(out.logits[0, -1].argmax())
        if nxt in stop:
            break
        tokens.append(nxt)
        if len(tokens) == max_new_tokens or (should_stop is not None and should_stop(tokens)):
            break
        step = torch.tensor([[nxt]], device=input_ids.device)
        out = model(input_ids=step, logits_to_keep=1, **kw)
    return Greedy(tokens, prefill)


def greedy_generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    should_stop: Callable[[list[int]], bool] | None = None,
) -> list[int]:
    """The token ids of :func:`greedy_decode` (the harness's and the tests' entry point)."""
    return greedy_decode(model, input_ids, max_new_tokens, stop_ids, should_stop).tokens
