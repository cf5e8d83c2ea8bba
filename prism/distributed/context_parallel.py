"""Context-parallel block-sparse causal attention over torch.distributed (issue 13).

The sequence is zig-zag sharded (:class:`~prism.distributed.ZigZagSharding`): rank ``r`` holds
chunks ``r`` and ``2W - 1 - r`` of Q, K and V. :func:`context_parallel_attention` then

1. **scores** the rank's query blocks against the whole causal K, giving exactly the rows of the
   single-process selection for those blocks (``score_mode``):

   * ``"gather"``: all-gather Q and K, run the scorer on the full sequence, keep the local rows.
     Exact for *every* scorer (also those with global statistics: Prism's energy calibration,
     FlexPrefill's and MInference's last-query probes) and bitwise equal to the single-process
     selection, at the price of moving Q and K and scoring the whole sequence on every rank;
   * ``"rows"``: all-gather K only, score each local chunk against the keys before its end (a
     cached-prefix call of the scorer). Exact for *row-local* scorers, whose row ``i`` depends
     only on query block ``i`` and the keys it may see: ``meanpool``, ``probe`` (not its
     ``shared`` placement, which reads block ``i − 1``'s last row: ``gather``), ``xattn``,
     ``window``, ``dense``, ``prism`` with ``calibrate=False`` and unions / intersections of
     these (:func:`scorer_is_row_local`); other scorers are refused;
   * ``"summaries"``: all-gather only the pooled block means (``meanpool``, ``prism``): k̄, plus
     q̄ when Prism calibrates (its temperatures are per-head statistics over *all* blocks). The
     rows are computed with the scorers' own PyTorch formulas on the full pooled tensors; for
     ``prism`` this is the selection of ``impl="torch"`` (the fused CUDA estimator makes the
     same selection up to its documented tie handling). Moves ``~1/BS`` of the bytes of K;
   * ``"local"``: no communication, for selections that depend on the shapes only (``dense``,
     ``window``): the scorer sees a zero-stride stand-in for K;
   * ``"auto"`` (default): ``local`` for ``dense`` / ``window``, ``summaries`` where supported,
     else ``rows`` for a row-local scorer, else ``gather``;

2. **attends** with the local queries over the selected KV blocks only (``kv_mode``), merging the
   partial results of disjoint key sets by log-sum-exp:

   * ``"allgather"``: all-gather K and V once (reusing K from scoring), one call; the simplest
     and the dense-CP baseline's transport;
   * ``"ring"``: ``W - 1`` ring steps (``batch_isend_irecv``) pass the K/V shards around; the
     shard in hand is attended only on its selected blocks (a step with none is skipped) while
     the next one is in flight. Bytes as dense; only the compute is sparse;
   * ``"fetch"`` (default): each rank asks every owner for exactly the ``(batch, KV head, block)``
     units its selection needs (``all_to_all_single`` of the counts, of the indices, then of the
     K/V blocks, asynchronous), attends its own shard meanwhile, then the fetched blocks. Bytes
     scale with the *union* of the selected remote blocks over the rank's query blocks and the
     query heads of a KV group, not with the density itself: with many query blocks per rank
     that union can approach every remote block (then it moves about what ``ring`` does).

The ``rows`` and ``summaries`` paths run the scorer's formulas on row subsets / a different key
length, so they are identical to the single-process selection up to float rounding at a rule's
boundary (identical in every CPU test); ``gather`` is identical by construction.

Every byte sent / received goes through :class:`~prism.distributed.comm.CountingComm` and is
reported in :class:`CPStats`. Math: the CPU path runs in float32 (``impl="torch"``); on CUDA
(``impl="auto"``) each part runs compiled FlexAttention with the log-sum-exp returned, and the
merge is float32. Output dtype: q's.

Scope: causal self-attention pre-fill (Sq = Sk = S, no cached prefix across the shards), the
same ``S`` and block grid on every rank, ``BS`` = the scorer's block size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._checks import check_qkv
from ..masks import apply_rule, block_causal, masked_softmax
from ..scorers import Scorer, build_scorer
from ..scorers._pooling import gqa_scores, inv_sqrt, pool_blocks
from ..scorers.combine import DenseScorer, IntersectionScorer, UnionScorer, WindowScorer
from ..scorers.meanpool import MeanPoolScorer
from ..scorers.prism import PrismScorer, _rms, band_dims
from ..scorers.probe import ProbeScorer
from ..scorers.xattn import XAttnScorer
from .comm import CountingComm
from .local_attention import INVALID_POS, block_attention_lse, merge_partials
from .sharding import ZigZagSharding

__all__ = [
    "KV_MODES",
    "SCORE_MODES",
    "CPStats",
    "ContextParallelAttention",
    "context_parallel_attention",
    "gather_sequence",
    "resolve_score_mode",
    "scorer_is_row_local",
]

SCORE_MODES = ("auto", "gather", "rows", "summaries", "local")
KV_MODES = ("allgather", "ring", "fetch")


# -- which scoring path is exact for which scorer --------------------------------------------
def scorer_is_row_local(scorer: Scorer) -> bool:
    """True when row ``i`` of the scorer's selection depends only on query block ``i`` and the
    keys it may see (so scoring a chunk against its causal key prefix gives the global rows)."""
    if isinstance(scorer, PrismScorer):
        return not scorer.config.calibrate
    if isinstance(scorer, (UnionScorer, IntersectionScorer)):
        return scorer.config.threshold >= 1.0 or all(
            scorer_is_row_local(c) for c in scorer.children
        )
    if isinstance(scorer, ProbeScorer):  # ``shared`` reads the previous block's last row
        return scorer.config.placement != "shared" or scorer.config.probes == 1
    return isinstance(scorer, (MeanPoolScorer, XAttnScorer, WindowScorer, DenseScorer))


def _data_independent(scorer: Scorer) -> bool:
    """Selections that depend on the shapes only (``dense``, ``window``)."""
    return isinstance(scorer, (DenseScorer, WindowScorer))


def _has_summaries(scorer: Scorer) -> bool:
    return type(scorer) is MeanPoolScorer or isinstance(scorer, PrismScorer)


def resolve_score_mode(scorer: Scorer, score_mode: str = "auto") -> str:
    """The scoring path :func:`context_parallel_attention` takes (see the module docstring);
    raises ``ValueError`` for a path that would not be exact for this scorer."""
    if score_mode not in SCORE_MODES:
        raise ValueError(f"unknown score_mode {score_mode!r}; valid: {list(SCORE_MODES)}")
    if score_mode == "auto":
        if _data_independent(scorer):
            return "local"
        if _has_summaries(scorer):
            return "summaries"
        return "rows" if scorer_is_row_local(scorer) else "gather"
    if score_mode == "rows" and not scorer_is_row_local(scorer):
        raise ValueError(
            f"score_mode='rows' is exact only for row-local scorers (meanpool, probe except "
            f"placement='shared', xattn, window, dense, prism with calibrate=False, and their "
            f"unions); {scorer.name!r} with this config reads rows or statistics outside the "
            f"query block: use score_mode='gather' (or 'auto')"
        )
    if score_mode == "local" and not _data_independent(scorer):
        raise ValueError(
            f"score_mode='local' (no communication) is only for data-independent scorers "
            f"('dense', 'window'), not {scorer.name!r}"
        )
    if score_mode == "summaries" and not _has_summaries(scorer):
        raise ValueError(
            f"score_mode='summaries' is implemented for 'meanpool' and 'prism', not "
            f"{scorer.name!r}: use 'rows', 'gather' or 'auto'"
        )
    return score_mode


# -- stats ------------------------------------------------------------------------------------
@dataclass
class CPStats:
    """What one rank did in one :func:`context_parallel_attention` call.

    selection: bool [B, Hq, NBl, NKB], this rank's rows of the global block selection (local
        block ``m`` = global query block ``query_blocks[m]``; columns are global KV blocks).
    query_blocks: int64 [NBl].
    bytes_sent / bytes_recv: everything this rank sent / received (see ``comm.py`` for the
        counting rule); ``traffic`` splits them by phase (``score``, ``kv``).
    kv_units_moved: ``(batch, KV head, block)`` units of K/V this rank received from others
        (``fetch``: the selected remote ones; ``ring`` / ``allgather``: every remote one).
    kv_units_remote: the remote units in total (what a dense transport receives).
    attended_blocks: selected (query block, KV block) pairs this rank computed, summed over
        batch and query heads; ``ring_steps_skipped``: ring steps with nothing selected.
    """

    rank: int
    world_size: int
    score_mode: str
    kv_mode: str
    selection: torch.Tensor
    query_blocks: torch.Tensor
    bytes_sent: int = 0
    bytes_recv: int = 0
    traffic: dict[str, Any] = field(default_factory=dict)
    kv_units_moved: int = 0
    kv_units_remote: int = 0
    attended_blocks: int = 0
    ring_steps_skipped: int = 0

    @property
    def density(self) -> float:
        """Selected / causal blocks over this rank's rows."""
        nkb = self.selection.shape[-1]
        qb = self.query_blocks.to(self.selection.device)
        visible = torch.arange(nkb, device=self.selection.device)[None, :] <= qb[:, None]
        per = self.selection.shape[0] * self.selection.shape[1]
        return float(self.selection.sum()) / max(1, int(visible.sum()) * per)


# -- helpers ----------------------------------------------------------------------------------
def _pad_dim2(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[2] == length:
        return x
    pad = x.new_zeros(*x.shape[:2], length - x.shape[2], *x.shape[3:])
    return torch.cat([x, pad], dim=2)


def _pad_cols(m: torch.Tensor, width: int) -> torch.Tensor:
    """Pad a bool block map [..., NKB'] with False columns to ``width``."""
    if m.shape[-1] == width:
        return m
    return torch.cat([m, m.new_zeros(*m.shape[:-1], width - m.shape[-1])], dim=-1)


def _gather_tokens(x, plan: ZigZagSharding, comm: CountingComm, phase: str) -> torch.Tensor:
    """All-gather a token-level shard [B, H, Sl, D] -> the full sequence [B, H, S, D]."""
    parts = comm.all_gather(_pad_dim2(x, plan.max_local_len), phase)
    return plan.unshard([p[:, :, : plan.local_len(r)] for r, p in enumerate(parts)])


def _gather_blocks(x, plan: ZigZagSharding, comm: CountingComm, phase: str) -> torch.Tensor:
    """All-gather a block-level shard [B, H, NBl, D] -> [B, H, NB, D] in global block order."""
    parts = comm.all_gather(_pad_dim2(x, plan.max_local_blocks), phase)
    return plan.unshard_blocks([p[:, :, : plan.local_blocks(r)] for r, p in enumerate(parts)])


def gather_sequence(x: torch.Tensor, plan: ZigZagSharding, group=None) -> torch.Tensor:
    """All-gather every rank's shard of ``x`` ([B, H, Sl, D], dim 2 sharded as by
    :meth:`ZigZagSharding.shard`) and return the full-sequence tensor [B, H, S, D] on every
    rank (e.g. to assemble the attention output)."""
    return _gather_tokens(x, plan, CountingComm(group), "gather")


def _finalize_rows(scorer: Scorer, keep, vis, par):
    c = scorer.config
    if c.force_diagonal:
        keep = keep | par
    if c.force_sink:
        keep = keep.clone()
        keep[..., 0] = True
    return keep & vis


def _summary_rows(scorer, q, k, plan, comm, rank):
    """Rows of the meanpool / prism (PyTorch formula) selection from all-gathered pooled
    summaries; see the module docstring."""
    bs, d, s = plan.block_size, q.shape[-1], plan.seq_len
    hq, hkv = q.shape[1], k.shape[1]
    qb = plan.query_blocks(rank, device=q.device)
    visible, partial = block_causal(s, s, bs, q.device)
    vis, par = visible[qb], partial[qb]
    qp = pool_blocks(q, bs)  # float32 [B, Hq, NBl, D]
    kp = _gather_blocks(pool_blocks(k, bs), plan, comm, "score")  # [B, Hkv, NB, D]
    c = scorer.config
    if type(scorer) is MeanPoolScorer:
        logits = gqa_scores(qp, kp) * inv_sqrt(d)
        keep = apply_rule(
            masked_softmax(logits, vis), vis, c.rule, c.threshold, c.top_k, c.min_prob
        )
        return _finalize_rows(scorer, keep, vis, par)
    # prism: the same steps as PrismScorer.band_probs / select_torch, on the local rows
    if c.calibrate:
        qp_all = _gather_blocks(qp, plan, comm, "score")  # for the per-head RMS statistics
        rq, rk = _rms(qp_all), _rms(kp)
    keep = None
    widths, thresholds = scorer.band_widths(d), scorer.band_thresholds()
    for band, width, p in zip(("high", "low"), widths, thresholds):
        idx = band_dims(d, width, band, c.rope_layout).to(q.device)
        qband, kband = qp.index_select(-1, idx), kp.index_select(-1, idx)
        logits = gqa_scores(qband, kband) / math.sqrt(width)
        if c.calibrate:
            ratio_k = (_rms(kband) / rk).repeat_interleave(hq // hkv, dim=1)
            tau = math.sqrt(width / d) * (_rms(qp_all.index_select(-1, idx)) / rq) * ratio_k
            logits = logits / tau[:, :, None, None]
        sel = apply_rule(masked_softmax(logits, vis), vis, c.rule, p, c.top_k, c.min_prob)
        keep = sel if keep is None else keep | sel
    return _finalize_rows(scorer, keep, vis, par)


def _score(scorer, mode, q, k, plan, comm, rank):
    """-> (selection rows bool [B, Hq, NBl, NKB], full K or None)."""
    nkb = plan.num_blocks
    if mode == "summaries":
        return _summary_rows(scorer, q, k, plan, comm, rank), None
    if mode == "local":  # the scorer reads only the shapes: a zero-stride K stand-in
        k_full = k.new_zeros(()).expand(k.shape[0], k.shape[1], plan.seq_len, k.shape[3])
    else:
        k_full = _gather_tokens(k, plan, comm, "score")
    if mode == "gather":
        q_full = _gather_tokens(q, plan, comm, "score")
        sel = scorer(q_full, k_full)
        return sel.mask[:, :, plan.query_blocks(rank, device=q.device)], k_full
    rows, off = [], 0
    for start, stop in plan.rank_ranges(rank):
        n = stop - start
        m = scorer(q[:, :, off : off + n], k_full[:, :, :stop]).mask
        rows.append(_pad_cols(m, nkb))
        off += n
    return torch.cat(rows, dim=2), (None if mode == "local" else k_full)


def _kv_positions(plan: ZigZagSharding, rank: int, length: int, device) -> torch.Tensor:
    pos = plan.positions(rank, device=device)
    if pos.numel() < length:
        pos = torch.cat([pos, pos.new_full((length - pos.numel(),), INVALID_POS)])
    return pos


def _accumulate(acc, part):
    if acc is None:
        return part
    return merge_partials(acc[0], acc[1], part[0], part[1])


# -- the op -----------------------------------------------------------------------------------
def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: ZigZagSharding,
    scorer: str | Scorer = "prism",
    *,
    kv_mode: str = "fetch",
    score_mode: str = "auto",
    scale: float | None = None,
    impl: str = "auto",
    group=None,
    **scorer_params: Any,
) -> tuple[torch.Tensor, CPStats]:
    """Context-parallel causal block-sparse attention of this rank's zig-zag shard.

    Args:
        q: [B, Hq, Sl, D], k: [B, Hkv, Sl, D], v: [B, Hkv, Sl, Dv]: this rank's shard
            (``plan.shard(x, rank)``; ``Sl = plan.local_len(rank)``), post-RoPE.
        plan: the :class:`ZigZagSharding` of the whole sequence (same on every rank); its
            ``world_size`` must be the group's and its ``block_size`` the scorer's.
        scorer: a registered scorer name (built with ``scorer_params``) or a built scorer.
        kv_mode: ``"fetch"`` | ``"ring"`` | ``"allgather"``; score_mode: ``"auto"`` |
            ``"summaries"`` | ``"rows"`` | ``"gather"`` (module docstring).
        scale: softmax scale, default ``D ** -0.5``.  impl: local attention implementation,
            ``"auto"`` (FlexAttention on CUDA, float32 torch elsewhere), ``"torch"``, ``"flex"``.
        group: the torch.distributed process group (default: the world).

    Returns ``(out [B, Hq, Sl, Dv] in q's dtype, CPStats)``. Every rank of the group must call
    it with the same plan, scorer and modes (it runs collectives).
    """
    if kv_mode not in KV_MODES:
        raise ValueError(f"unknown kv_mode {kv_mode!r}; valid: {list(KV_MODES)}")
    if not isinstance(plan, ZigZagSharding):
        raise TypeError(f"plan must be a ZigZagSharding, got {type(plan).__name__}")
    scorer = build_scorer(scorer, **scorer_params)
    check_qkv(q, k, v)
    comm = CountingComm(group)
    rank, w = comm.rank, comm.world_size
    if plan.world_size != w:
        raise ValueError(f"plan is for W={plan.world_size} ranks, the process group has {w}")
    if scorer.block_size != plan.block_size:
        raise ValueError(
            f"plan block_size {plan.block_size} != scorer block_size {scorer.block_size}"
        )
    sl = plan.local_len(rank)
    if q.shape[2] != sl or k.shape[2] != sl:
        raise ValueError(
            f"rank {rank} holds {sl} tokens of S={plan.seq_len} (plan.shard), got Sq={q.shape[2]}, "
            f"Sk={k.shape[2]}; context-parallel attention has no cached prefix (Sq must equal Sk)"
        )
    mode = resolve_score_mode(scorer, score_mode)
    b, hq, _, _ = q.shape
    hkv, bs = k.shape[1], plan.block_size
    dev = q.device
    q_pos = plan.positions(rank, device=dev)
    qblocks = plan.query_blocks(rank, device=dev)

    rows, k_full = _score(scorer, mode, q, k, plan, comm, rank)
    stats = CPStats(rank, w, mode, kv_mode, rows, qblocks)
    remote_blocks = plan.num_blocks - plan.local_blocks(rank)
    stats.kv_units_remote = b * hkv * remote_blocks
    acc = None

    if kv_mode == "allgather":
        if k_full is None:
            k_full = _gather_tokens(k, plan, comm, "kv")
        v_full = _gather_tokens(v, plan, comm, "kv")
        kv_pos = torch.arange(plan.seq_len, device=dev)
        acc = block_attention_lse(q, q_pos, k_full, v_full, kv_pos, rows, bs, scale, impl)
        stats.kv_units_moved = stats.kv_units_remote
        stats.attended_blocks = int(rows.sum())
    elif kv_mode == "ring":
        d = k.shape[-1]
        lmax, nbmax = plan.max_local_len, plan.max_local_blocks
        cur = _pad_dim2(torch.cat([k, v], dim=-1), lmax)
        for step in range(w):
            src = (rank - step) % w
            nxt = works = None
            if step < w - 1:
                nxt, works = comm.ring_shift(cur, "kv")
            cols = plan.query_blocks(src, device=dev)
            sel = _pad_cols(rows[..., cols], nbmax)
            n_sel = int(sel.sum())
            if n_sel:
                kv_pos = _kv_positions(plan, src, lmax, dev)
                part = block_attention_lse(
                    q, q_pos, cur[..., :d], cur[..., d:], kv_pos, sel, bs, scale, impl
                )
                acc = _accumulate(acc, part)
                stats.attended_blocks += n_sel
            else:
                stats.ring_steps_skipped += 1
            if works is not None:
                for wk in works:
                    wk.wait()
                cur = nxt
        stats.kv_units_moved = stats.kv_units_remote
    else:  # fetch
        acc = _fetch_attention(q, k, v, q_pos, rows, plan, comm, rank, scale, impl, stats)

    if acc is None:  # nothing selected at all (only without the forced diagonal)
        out = q.new_zeros(b, hq, sl, v.shape[-1], dtype=torch.float32)
    else:
        out = acc[0]
    stats.bytes_sent, stats.bytes_recv = comm.traffic.sent, comm.traffic.recv
    stats.traffic = comm.traffic.as_dict()
    return out.to(q.dtype), stats


def _fetch_attention(q, k, v, q_pos, rows, plan, comm, rank, scale, impl, stats):
    """``kv_mode="fetch"``: request exactly the selected remote (batch, KV head, block) units,
    attend the own shard while they travel, then the fetched blocks; merge by log-sum-exp."""
    b, hq = q.shape[:2]
    hkv, d, bs, w = k.shape[1], k.shape[-1], plan.block_size, comm.world_size
    g = hq // hkv
    dev = q.device
    nbmax = plan.max_local_blocks
    owner = plan.block_owner.to(dev)
    local_idx = plan.block_local_index.to(dev)
    qblocks = plan.query_blocks(rank, device=dev)

    # which remote units this rank needs: any query head of the group, any local query block
    need = rows.view(b, hkv, g, rows.shape[2], rows.shape[3]).any(dim=3).any(dim=2)
    need[..., qblocks] = False  # [B, Hkv, NB]
    nz = need.nonzero()  # [n, 3] (b, h, j), lexicographic
    own_of = owner[nz[:, 2]]
    order = torch.sort(own_of, stable=True).indices
    nz, own_of = nz[order], own_of[order]
    send_counts = torch.bincount(own_of, minlength=w).tolist()
    recv_counts = comm.exchange_counts(send_counts, dev, "kv")
    req = (nz[:, 0] * hkv + nz[:, 1]) * nbmax + local_idx[nz[:, 2]]
    incoming = comm.all_to_all(req, send_counts, recv_counts, "kv")

    # serve the others' requests (asynchronously) ...
    kv = _pad_dim2(torch.cat([k, v], dim=-1), nbmax * bs)
    units = kv.reshape(b * hkv * nbmax, bs, kv.shape[-1])
    payload = units.index_select(0, incoming)
    fetched, work = comm.all_to_all(payload, recv_counts, send_counts, "kv", async_op=True)

    # ... while attending the own shard
    own_sel = rows[..., qblocks]
    acc = block_attention_lse(q, q_pos, k, v, q_pos, own_sel, bs, scale, impl)
    stats.attended_blocks = int(own_sel.sum())
    work.wait()
    stats.kv_units_moved = int(nz.shape[0])

    if nz.shape[0]:
        blocks = torch.unique(nz[:, 2])  # sorted global KV block ids, NU
        slot = torch.searchsorted(blocks, nz[:, 2].contiguous())
        buf = kv.new_zeros(b, hkv, blocks.numel(), bs, kv.shape[-1])
        buf[nz[:, 0], nz[:, 1], slot] = fetched
        buf = buf.flatten(2, 3)
        kv_pos = (blocks[:, None] * bs + torch.arange(bs, device=dev)).flatten()
        kv_pos = torch.where(kv_pos < plan.seq_len, kv_pos, torch.full_like(kv_pos, INVALID_POS))
        rem_sel = rows[..., blocks]
        part = block_attention_lse(
            q, q_pos, buf[..., :d], buf[..., d:], kv_pos, rem_sel, bs, scale, impl
        )
        acc = merge_partials(*acc, *part)
        stats.attended_blocks += int(rem_sel.sum())
    return acc


class ContextParallelAttention(nn.Module):
    """``nn.Module`` form of :func:`context_parallel_attention`:
    ``ContextParallelAttention("prism", threshold=0.95)(q, k, v, plan)`` -> out; the last call's
    :class:`CPStats` is kept in ``last_stats``."""

    def __init__(
        self,
        scorer: str | Scorer = "prism",
        *,
        kv_mode: str = "fetch",
        score_mode: str = "auto",
        impl: str = "auto",
        group=None,
        **scorer_params: Any,
    ) -> None:
        super().__init__()
        self.scorer = build_scorer(scorer, **scorer_params)
        if kv_mode not in KV_MODES:
            raise ValueError(f"unknown kv_mode {kv_mode!r}; valid: {list(KV_MODES)}")
        self.kv_mode = kv_mode
        self.score_mode = resolve_score_mode(self.scorer, score_mode)
        self.impl, self.group = impl, group
        self.last_stats: CPStats | None = None

    def forward(self, q, k, v, plan: ZigZagSharding, scale: float | None = None) -> torch.Tensor:
        out, self.last_stats = context_parallel_attention(
            q,
            k,
            v,
            plan,
            self.scorer,
            kv_mode=self.kv_mode,
            score_mode=self.score_mode,
            scale=scale,
            impl=self.impl,
            group=self.group,
        )
        return out
