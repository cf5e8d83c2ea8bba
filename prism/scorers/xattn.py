"""XAttention: antidiagonal block scoring (Xu et al., arXiv 2503.16428; DESIGN.md §5).

With stride S, query group i is queries ``[iS, iS + S)`` of the query-local grid and key group j is
keys ``[jS, jS + S)`` of the absolute grid (S divides BS, so groups nest in blocks). The score of
(i, j) is the sum over the antidiagonal of their S×S tile,

    x[i, j] = Σ_t q[iS + S − 1 − t] · k[jS + t] / (sqrt(D) · S),

computed as one matmul by regrouping: every S consecutive keys are laid side by side in the feature
dimension (a free view of K), and every S consecutive queries likewise but in reverse order. Rows
of x get a causal mask in the reduced space (group j is visible to group i iff ``jS <=`` the
absolute position of i's last real query, the same rule as the block geometry of §3), a float32
softmax over their visible key groups, and the probabilities are summed into BS×BS blocks
((BS/S)² entries each) and normalised per block row, giving ``A [B, Hq, NQB, NKB]`` whose rows sum
to 1.

Per (head, query block) the selection counts the forced blocks first (the sink and the partial /
diagonal blocks, as configured), then adds the remaining visible blocks in descending ``A`` while
the mass strictly before a block is ``< threshold ×`` the row total (the minimal set reaching τ;
:func:`prism.masks.select.cover`, equal scores ordered by KV block index).

Choices where the published method leaves freedom (documented, mirrored by the test reference):

* Ragged lengths: groups and blocks are zero-padded (a partial group's antidiagonal simply misses
  the padded terms, like the published zero padding); reduced rows that hold no real query are
  dropped, and a block row's normalisation counts only its real rows.
* Cached prefix: query groups live on the query-local grid (so they nest in query blocks), key
  groups on the absolute grid; the causal rule above then covers any ``P = Sk − Sq``.
* ``threshold >= 1`` keeps every visible block (dense).

Cost ≈ 1/S of the QKᵀ FLOPs. The work is chunked over queries (``chunk_size`` tokens, a multiple of
BS): a chunk only meets the key groups visible to it, its rows are selected as soon as they are
scored, and its memory is ``B · Hq · (chunk/S) · (Sk/S)`` logits (input dtype) plus as many
float32 probabilities — never S×S, and nothing of size [B, Hq, NQB, NKB] but the output mask.
Dot products run in the input dtype with fp32 accumulation; softmax and sums are float32. K is
copied only when it is not contiguous or Sk is not a multiple of BS (zero padding).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..masks import BlockSelection, block_causal
from ..masks.select import cover
from ._validate import check_int
from .base import Scorer, ScorerConfig, register_scorer

__all__ = ["XAttnConfig", "XAttnScorer", "cover"]  # cover: old import path of the masks rule


@dataclass
class XAttnConfig(ScorerConfig):
    """XAttention knobs (published defaults).

    threshold: τ, the share of each block row's estimated mass to cover (default 0.9).
    stride: S, the antidiagonal stride (8 published; 16 also published); must divide block_size.
    chunk_size: query tokens scored per step (a multiple of block_size); bounds the memory.
    """

    threshold: float = 0.9
    stride: int = 8
    chunk_size: int = 2048

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("stride", self.stride, 1)
        if self.block_size % self.stride:
            raise ValueError(
                f"stride {self.stride} must divide block_size {self.block_size} (8 and 16 are the "
                "published strides)"
            )
        check_int("chunk_size", self.chunk_size, 1)
        if self.chunk_size % self.block_size:
            raise ValueError(
                f"chunk_size {self.chunk_size} must be a multiple of block_size {self.block_size}"
            )


@register_scorer("xattn")
class XAttnScorer(Scorer):
    """XAttention antidiagonal scorer; see the module docstring for the exact definition."""

    Config = XAttnConfig

    def _chunks(self, q: torch.Tensor, k: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(first query block, A rows)`` per query chunk: the antidiagonal block scores
        float32 [B, Hq, rows, NKB_c] of the chunk's query blocks against the NKB_c key blocks
        visible to it; each row sums to 1."""
        c = self.config
        b, hq, sq, d = q.shape
        hkv, sk = k.shape[1], k.shape[2]
        g = hq // hkv
        bs, st = c.block_size, c.stride
        gpb = bs // st  # groups per block
        nkb = -(-sk // bs)
        prefix = sk - sq
        dev = q.device

        kpad = nkb * bs - sk
        kk = F.pad(k, (0, 0, 0, kpad)) if kpad else k
        # k_red[j] = k[jS], k[jS + 1], ..., k[jS + S − 1] side by side: a view of contiguous K
        k_red = kk.reshape(b, hkv, nkb * gpb, st * d)
        scale = 1.0 / (math.sqrt(d) * st)

        for q0 in range(0, sq, c.chunk_size):
            q1 = min(q0 + c.chunk_size, sq)
            n = q1 - q0
            npad = -(-n // bs) * bs - n
            qc = q[:, :, q0:q1]
            if npad:
                qc = F.pad(qc, (0, 0, 0, npad))
            rows = (n + npad) // st
            # q_red[i] = q[iS + S − 1], ..., q[iS] side by side (reversed), pre-scaled
            q_red = (qc.unflatten(2, (rows, st)).flip(3) * scale).reshape(b, hkv, g * rows, st * d)
            nkb_c = (prefix + q1 - 1) // bs + 1  # key blocks visible to this chunk
            ncols = nkb_c * gpb
            logits = torch.matmul(q_red, k_red[:, :, :ncols].transpose(-1, -2))
            logits = logits.view(b, hq, rows, ncols)
            del q_red

            grow = q0 // st + torch.arange(rows, device=dev)  # global reduced row index
            row_last = prefix + torch.clamp((grow + 1) * st, max=sq) - 1  # last real query (abs)
            # only columns at or right of the first row's causal frontier can be hidden
            first_hidden = (prefix + min(q0 + st, sq) - 1) // st + 1
            if first_hidden < ncols:
                cols = torch.arange(first_hidden, ncols, device=dev)
                hidden = cols[None, :] * st > row_last[:, None]
                logits[..., first_hidden:].masked_fill_(hidden, float("-inf"))
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            del logits
            real = grow * st < sq  # rows holding at least one real query
            if npad >= st:
                probs.masked_fill_(~real[:, None], 0.0)
            blk = probs.view(b, hq, rows // gpb, gpb, nkb_c, gpb).sum(dim=(3, 5))
            del probs
            n_real = real.view(rows // gpb, gpb).sum(1, dtype=torch.float32)
            yield q0 // bs, blk / n_real[:, None]

    def block_scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Antidiagonal block scores ``A``: float32 [B, Hq, NQB, NKB], each row sums to 1 over its
        visible blocks (0 elsewhere). Chunked over queries; see the module docstring."""
        b, hq, sq, _ = q.shape
        bs = self.block_size
        out = q.new_zeros((b, hq, -(-sq // bs), -(-k.shape[2] // bs)), dtype=torch.float32)
        for i0, blk in self._chunks(q, k):
            out[:, :, i0 : i0 + blk.shape[2], : blk.shape[3]] = blk
        return out

    def select(self, q: torch.Tensor, k: torch.Tensor) -> BlockSelection:
        c = self.config
        b, hq, sq, _ = q.shape
        sk = k.shape[2]
        visible, partial = block_causal(sq, sk, c.block_size, q.device)
        if c.threshold >= 1.0:
            return self.finalize(visible.expand(b, hq, *visible.shape), sq, sk)
        nkb = visible.shape[1]
        forced = torch.zeros_like(visible)
        if c.force_sink:
            forced = forced | (torch.arange(nkb, device=q.device) == 0)
        if c.force_diagonal:
            forced = forced | partial
        forced = forced & visible
        # select each chunk's rows as soon as they are scored: memory stays O(chunk)
        parts = []
        for i0, blk in self._chunks(q, k):
            rows = blk.shape[2]
            blk = F.pad(blk, (0, nkb - blk.shape[3]))
            f = forced[i0 : i0 + rows]
            start = torch.where(f, blk, 0.0).sum(-1)
            cand = visible[i0 : i0 + rows] & ~f
            parts.append(cover(blk, c.threshold, cand, start=start, accumulate=torch.float32) | f)
        return self.finalize(torch.cat(parts, dim=2), sq, sk)
