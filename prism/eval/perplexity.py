"""Perplexity on long real text, dense vs sparse pre-fill.

Each window of ``length`` tokens is one full pre-fill (the sparse policy applies to every layer);
the next-token negative log-likelihood is summed over all positions of the window and, separately,
over its last ``tail`` fraction (where causal rows are long, so sparsity matters most). The LM
head runs in position chunks, so an 8K × 49K logits matrix never exists at once.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


def _decoder_and_head(model):
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return decoder, head


@torch.no_grad()
def hidden_losses(head, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 1024):
    """Per-token NLL, float64 [N], of ``hidden`` [N, H] (through the output ``head``, ``chunk``
    rows at a time, so the logits never exceed chunk x vocabulary) against ``targets`` [N]."""
    losses = torch.empty(hidden.shape[0], dtype=torch.float64, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        stop = min(start + chunk, hidden.shape[0])
        logits = head(hidden[start:stop]).float()
        losses[start:stop] = F.cross_entropy(logits, targets[start:stop], reduction="none").double()
    return losses


@torch.no_grad()
def window_nll(
    model, input_ids: torch.Tensor, tail: float = 0.5, chunk: int = 1024
) -> dict[str, float]:
    """Summed next-token NLL of one window ``input_ids [1, S]``: totals and the tail's."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, S], got {tuple(input_ids.shape)}")
    s = input_ids.shape[1]
    if s < 2:
        raise ValueError("a window needs at least 2 tokens")
    decoder, head = _decoder_and_head(model)
    targets = input_ids[0, 1:]
    if decoder is not None and head is not None:
        hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state[0]
        losses = hidden_losses(head, hidden[:-1], targets, chunk).cpu()
    else:
        logits = model(input_ids=input_ids, use_cache=False).logits[0, :-1].float()
        losses = F.cross_entropy(logits, targets, reduction="none").double().cpu()
    n_tail = max(1, int(round((s - 1) * tail))) if tail > 0 else 0
    return {
        "nll_sum": float(losses.sum()),
        "tokens": s - 1,
        "nll_tail_sum": float(losses[-n_tail:].sum()) if n_tail else 0.0,
        "tail_tokens": n_tail,
    }


def windows(tokens: torch.Tensor, length: int, count: int, offset: int = 0) -> list[torch.Tensor]:
    """``count`` non-overlapping windows [1, length] of ``tokens`` from ``offset`` on."""
    need = offset + count * length
    if need > tokens.numel():
        raise ValueError(
            f"the corpus has {tokens.numel()} tokens; {count} window(s) of {length} from offset "
            f"{offset} need {need}"
        )
    return [tokens[offset + i * length : offset + (i + 1) * length][None] for i in range(count)]


def perplexity(
    model,
    tokens: torch.Tensor,
    length: int,
    count: int = 1,
    offset: int = 0,
    tail: float = 0.5,
    chunk: int = 1024,
    scorer: Any = None,
    backend: str = "flex",
    progress: Any = None,
) -> dict[str, float]:
    """PPL of ``count`` windows of ``length`` tokens, with ``scorer`` patched in (None = dense).

    ``scorer`` is a :class:`prism.Scorer`, a scorer mapping, or None. Returns ``ppl``,
    ``ppl_tail``, ``nll`` (mean per token), ``tokens`` and the selection density when the patch
    reports it.
    """
    from .modeling import sparse_model

    tot = {"nll_sum": 0.0, "tokens": 0, "nll_tail_sum": 0.0, "tail_tokens": 0}
    density = None
    with sparse_model(model, scorer, backend) as handle:
        for w in windows(tokens, length, count, offset):
            r = window_nll(model, w, tail, chunk)
            for key in tot:
                tot[key] += r[key]
            if progress is not None:
                progress()
        density = _handle_density(handle)
    nll = tot["nll_sum"] / tot["tokens"]
    out = {"nll": nll, "ppl": math.exp(nll), "tokens": tot["tokens"]}
    if tot["tail_tokens"]:
        nll_t = tot["nll_tail_sum"] / tot["tail_tokens"]
        out.update(nll_tail=nll_t, ppl_tail=math.exp(nll_t))
    if density is not None:
        out["density"] = density
    return out


def _handle_density(stats: Any) -> float | None:
    """Mean selection density over the sparse layers (from the integration's statistics)."""
    val = getattr(stats, "overall_density", None) if stats is not None else None
    return float(val) if isinstance(val, (int, float)) else None
