"""Exact probe-query scorer (issue 11): a few real queries per block, exact softmax, block sums.

For every query block i (rows ``[i·BS, min((i+1)·BS, Sq))``, L_i of them) the scorer picks
``P' = min(P, L_i)`` distinct *real* query rows (``P = probes``; the last block may be short), at
offsets r inside the block given by ``placement``:

* ``ends``    — evenly spaced from the first to the last row, both included
  (``r_t = round(t·(L−1)/(P'−1))``; P' = 1 is the last row);
* ``middle``  — P' consecutive rows centred in the block (``(L−P')//2 …``);
* ``uniform`` — the centres of P' equal slices (``r_t = floor((t+½)·L/P')``);
* ``last``    — the last P' rows (FlexPrefill's probe position, per block);
* ``shared``  — ``ends`` over the span from the *previous* block's last row to this block's last
  row (``r_t = round(t·L/(P'−1)) − 1``, P' = min(P, L + 1)): the first probe of block i is the
  last probe of block i − 1, so the fused estimator computes P − 1 probe softmaxes per block,
  not P (block 0 has no previous row and keeps its P' − 1 own probes; P = 1 is the last row).
  With P = 2 it is first + last shifted one token back, at the cost of one probe. A call with a
  cached prefix (chunked pre-fill) has no previous query row for its first block, which then
  uses its P − 1 own probes: estimates differ slightly from one whole-prompt call there.

Probe query t (absolute position ``a = P_prefix + i·BS + r_t``, ``P_prefix = Sk − Sq``) gets the
exact causal softmax of ``q_t · k / sqrt(D)`` over all keys ``c <= a`` of its KV head (GQA: query
head h uses KV head h // G; the probes are viewed as ``[B, Hkv, G·rows, D]``, K is never
repeated), in float32. Its probabilities are summed into the NKB key blocks and the P' probes of
the block are averaged, giving block probabilities ``[B, Hq, NQB, NKB]`` whose rows sum to 1
(the mass estimate of that query block). Then the standard rule (``top_p`` by default) and the
forced sink / diagonal blocks. With ``probes >= BS`` and ``ends`` every query is a probe and the
estimate is the exact block mass divided by the block's query count.

**Pooled-key mixture** (``pooled_mix`` = α > 0; off by default): the probe estimate is mixed
with a coarse one that looks at many more query rows, ``(1 − α)·probes + α·pooled``. ``pooled``:
every ``pooled_stride``-th row of the block (offsets ``s//2, s//2 + s, …``; a block of at most
``s//2`` rows uses its last row) against the *mean key* of every key block it can see (the whole
block's mean, the diagonal block's included, plus ``log n_j`` for a block of ``n_j`` real keys),
softmax over those blocks, averaged over the rows. It costs about 1/s of one probe per block
(``[rows, NKB]`` logits instead of ``[rows, Sk]``) and repairs the probes' sampling error far
from the diagonal, where 2 rows of 128 miss blocks that other rows attend to: on the embedded
model at 32K (YaRN), α = 0.3 with s = 8 halves the probes' recall gap to the top-p block oracle
(``benchmarks/results/probe_pooled_mix_recall.md``).

Memory: the scores of one chunk of query blocks, ``[B, Hq, blocks·P, Sk]`` float32, with as many
blocks per chunk as fit in ``chunk_mb`` MiB (at least one block) — never ``[Sq, Sk]``; each
chunk only scores the keys its last probe can see (about half of all keys on average without a
prefix). K is converted to float32 once when it is not float32 already. Cost ≈ P / BS of the
causal QKᵀ FLOPs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..kernels.estimation.probe_op import (
    ProbeKernelParams,
    pooled_key_probs_fused,
    probe_block_probs_fused,
    probe_select_block_lists,
    probe_unsupported_reason,
)
from ..masks import BlockSelection
from ._fused_ops import auto_takes_fused, config_key, probe_params_key
from ._validate import check_int
from .base import ProbScorerConfig, Scorer, register_scorer

PLACEMENTS = ("ends", "middle", "uniform", "last", "shared")
IMPLS = ("auto", "torch", "triton")


@dataclass
class ProbeConfig(ProbScorerConfig):
    """Probe-scorer knobs (plus the rule knobs of :class:`ProbScorerConfig`).

    probes: P, probe queries per query block, 1 <= P <= block_size (default 2).
    placement: where the probes sit in the block: ``ends`` | ``middle`` | ``uniform`` | ``last``
        | ``shared`` (see the module docstring).
    chunk_mb: MiB of float32 scores per step of the PyTorch path (query blocks are processed in
        chunks of that size).
    impl: ``auto`` (the fused Triton estimator on CUDA where it supports the inputs, else
        PyTorch), ``torch`` or ``triton`` (raises where it cannot run). The same selection up to
        float rounding at the rule's boundary (tested against each other and the float64 loop).
    pooled_mix: α in [0, 1), the weight of the pooled-key estimate (module docstring); 0 = the
        probes alone. With α > 0 the Triton path adds the pooled estimate's two launches
        (``prism.kernels.estimation.pooled_kernels``) and mixes it in inside the select launch.
    pooled_stride: s, every s-th query row enters the pooled-key estimate, 1 <= s <= block_size.
    """

    probes: int = 2
    placement: str = "shared"
    chunk_mb: int = 256
    impl: str = "auto"
    pooled_mix: float = 0.0
    pooled_stride: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("probes", self.probes, 1)
        if self.probes > self.block_size:
            raise ValueError(f"probes must be <= block_size ({self.block_size}), got {self.probes}")
        check_int("chunk_mb", self.chunk_mb, 1)
        check_int("pooled_stride", self.pooled_stride, 1)
        if self.pooled_stride > self.block_size:
            raise ValueError(
                f"pooled_stride must be <= block_size ({self.block_size}), got {self.pooled_stride}"
            )
        if isinstance(self.pooled_mix, bool) or not isinstance(self.pooled_mix, (int, float)):
            raise TypeError(f"pooled_mix must be a number in [0, 1), got {self.pooled_mix!r}")
        if not 0.0 <= float(self.pooled_mix) < 1.0:
            raise ValueError(f"pooled_mix must be in [0, 1), got {self.pooled_mix}")
        if self.impl not in IMPLS:
            raise ValueError(f"unknown impl {self.impl!r}; valid: {list(IMPLS)}")
        if self.placement not in PLACEMENTS:
            raise ValueError(
                f"unknown placement {self.placement!r}; valid placements: {list(PLACEMENTS)}"
            )


def probe_offsets(length: int, probes: int, placement: str, has_prev: bool = True) -> list[int]:
    """Distinct row offsets (ascending, in ``[0, length)``) of ``min(probes, length)`` probes in a
    query block of ``length`` rows. ``shared`` is the exception: its offsets lie in
    ``[-1, length)`` (-1 = the previous block's last row, present where ``has_prev``)."""
    if placement == "shared":
        if probes == 1:
            return [length - 1]
        n = min(probes, length + 1)
        offs = [(2 * t * length + (n - 1)) // (2 * (n - 1)) - 1 for t in range(n)]
        return offs if has_prev else offs[1:]
    n = min(probes, length)
    if placement == "ends":
        if n == 1:
            return [length - 1]
        # round(t·(L−1)/(n−1)), half up, in integers; the step is >= 1 so rows are distinct
        return [(2 * t * (length - 1) + (n - 1)) // (2 * (n - 1)) for t in range(n)]
    if placement == "middle":
        start = (length - n) // 2
        return list(range(start, start + n))
    if placement == "uniform":
        return [((2 * t + 1) * length) // (2 * n) for t in range(n)]
    if placement == "last":
        return list(range(length - n, length))
    raise ValueError(f"unknown placement {placement!r}; valid placements: {list(PLACEMENTS)}")


def shares_probes(placement: str, probes: int) -> bool:
    """Whether the layout's slot 0 is the previous block's last probe (``shared``, P >= 2)."""
    return placement == "shared" and probes > 1


def probe_layout(
    sq: int, block_size: int, probes: int, placement: str, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probe rows and weights of every query block.

    Returns ``rows`` int64 [NQB, P] (query-local row index of each probe slot) and ``weights``
    float32 [NQB, P] (1/P' on the block's P' distinct probes, 0 on the padding slots of a short
    last block, which repeat its last probe row). ``shared`` (P >= 2): slot 0 of block i >= 1 is
    row ``i·BS − 1``, the previous block's slot P − 1 (its last row); block 0's slot 0 repeats
    its slot 1 with weight 0. Cached per (Sq, BS, P, placement, device): the returned tensors
    are shared, do not modify them.
    """
    return _layout_cached(int(sq), int(block_size), int(probes), placement, str(device or "cpu"))


@functools.lru_cache(maxsize=256)
def _layout_cached(sq: int, block_size: int, probes: int, placement: str, device: str):
    nqb = -(-sq // block_size)
    rows = torch.empty(nqb, probes, dtype=torch.int64)
    weights = torch.zeros(nqb, probes, dtype=torch.float32)
    full = probe_offsets(block_size, probes, placement)
    for i in range(nqb):
        length = min(block_size, sq - i * block_size)
        if length == block_size and i > 0:
            offs = full
        else:
            offs = probe_offsets(length, probes, placement, has_prev=i > 0)
        n = len(offs)
        lead = int(len(offs) < probes and placement == "shared" and i == 0)  # the empty slot 0
        offs = offs[:1] * lead + offs + [offs[-1]] * (probes - n - lead)
        rows[i] = torch.tensor(offs) + i * block_size
        weights[i, lead : lead + n] = 1.0 / n
    return rows.to(device), weights.to(device)


def probe_block_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    probes: int,
    placement: str = "shared",
    chunk_mb: int = 256,
) -> torch.Tensor:
    """Probe estimate of the block attention mass: float32 [B, Hq, NQB, NKB], rows sum to 1.

    q [B, Hq, Sq, D], k [B, Hkv, Sk, D] (Sk >= Sq, post-RoPE). See the module docstring.
    """
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    bs = block_size
    dev = q.device
    nqb, nkb = -(-sq // bs), -(-sk // bs)
    prefix = sk - sq
    scale = d**-0.5
    rows_cpu, _ = probe_layout(sq, bs, probes, placement)
    rows, weights = probe_layout(sq, bs, probes, placement, dev)
    kt = (k if k.dtype == torch.float32 else k.float()).transpose(-1, -2)  # [B, Hkv, D, Sk]
    cols = torch.arange(sk, device=dev)
    row_bytes = b * hq * sk * 4
    per_chunk = max(1, (chunk_mb << 20) // (row_bytes * probes))
    out = torch.zeros(b, hq, nqb, nkb, dtype=torch.float32, device=dev)
    for i0 in range(0, nqb, per_chunk):
        i1 = min(i0 + per_chunk, nqb)
        r = rows[i0:i1].flatten()  # [n·P]
        n_rows = r.numel()
        # keys past the chunk's last probe are masked for every row: leave them out
        kc = prefix + int(rows_cpu[i1 - 1].max()) + 1
        n_full, nkb_c = kc // bs, -(-kc // bs)
        qp = q.index_select(2, r).float().view(b, hkv, g * n_rows, d)
        s = torch.matmul(qp, kt[..., :kc]).view(b, hq, n_rows, kc).mul_(scale)
        s.masked_fill_(cols[None, :kc] > (r + prefix)[:, None], float("-inf"))
        s.sub_(s.amax(dim=-1, keepdim=True)).exp_()
        s.div_(s.sum(dim=-1, keepdim=True))  # [B, Hq, n·P, kc]
        parts = []
        if n_full:
            parts.append(s[..., : n_full * bs].unflatten(-1, (n_full, bs)).sum(-1))
        if kc > n_full * bs:
            parts.append(s[..., n_full * bs :].sum(-1, keepdim=True))
        blk = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # [B, Hq, n·P, nkb_c]
        del s
        blk = blk.view(b, hq, i1 - i0, probes, nkb_c)
        out[:, :, i0:i1, :nkb_c] = (blk * weights[i0:i1, :, None]).sum(3)
    return out


def pooled_rows(length: int, stride: int) -> list[int]:
    """Offsets of the rows of a query block of ``length`` rows that enter the pooled-key
    estimate: ``stride//2, stride//2 + stride, ...`` (the last row when that is empty)."""
    first = stride // 2
    return list(range(first, length, stride)) if first < length else [length - 1]


@functools.lru_cache(maxsize=256)
def _pooled_layout(sq: int, bs: int, stride: int, device: str):
    """The pooled estimate's rows (int64, query-local), the query block owning each (int64) and
    its weight 1 / rows of that block (float32), cached per (Sq, BS, stride, device)."""
    rows, owner, weight = [], [], []
    for i in range(-(-sq // bs)):
        offs = pooled_rows(min(bs, sq - i * bs), stride)
        rows += [i * bs + o for o in offs]
        owner += [i] * len(offs)
        weight += [1.0 / len(offs)] * len(offs)
    return (
        torch.tensor(rows, device=device),
        torch.tensor(owner, device=device),
        torch.tensor(weight, dtype=torch.float32, device=device),
    )


def pooled_key_block_probs(
    q: torch.Tensor, k: torch.Tensor, block_size: int, stride: int = 8, chunk_mb: int = 256
) -> torch.Tensor:
    """Pooled-key block estimate: float32 [B, Hq, NQB, NKB], rows sum to 1 (module docstring).

    q [B, Hq, Sq, D], k [B, Hkv, Sk, D] (Sk >= Sq). Logits of the chosen query rows against the
    NKB mean keys ([B, Hkv, NKB, D] float32; GQA by viewing the rows as [B, Hkv, G·rows, D], K
    never repeated), chunked so that ``[rows, NKB]`` logits of ``chunk_mb`` MiB per step (about twice that with
    the softmax's output) live at once: block-level memory, never [Sq, Sk].
    """
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g, bs, dev = hq // hkv, block_size, q.device
    nqb, nkb = -(-sq // bs), -(-sk // bs)
    prefix = sk - sq
    kf = k if k.dtype == torch.float32 else k.float()
    ksum = torch.nn.functional.pad(kf, (0, 0, 0, nkb * bs - sk)).view(b, hkv, nkb, bs, d).sum(3)
    count = torch.full((nkb,), float(bs), device=dev)
    count[-1] = float(sk - (nkb - 1) * bs)
    kmean_t = (ksum / count[:, None]).transpose(-1, -2)  # [B, Hkv, D, NKB]
    log_count = count.log()
    rows_t, owner_t, weight_t = _pooled_layout(int(sq), bs, int(stride), str(dev))
    cols = torch.arange(nkb, device=dev)
    out = torch.zeros(b, hq, nqb, nkb, dtype=torch.float32, device=dev)
    per_chunk = max(1, (chunk_mb << 20) // (b * hq * nkb * 4))  # query rows per step
    for r0 in range(0, rows_t.numel(), per_chunk):
        r = rows_t[r0 : r0 + per_chunk]
        n = r.numel()
        qr = q.index_select(2, r).float().view(b, hkv, g * n, d)
        z = torch.matmul(qr, kmean_t).view(b, hq, n, nkb).mul_(d**-0.5).add_(log_count)
        z.masked_fill_(cols[None, :] > ((r + prefix) // bs)[:, None], float("-inf"))
        p = torch.softmax(z, dim=-1).mul_(weight_t[r0 : r0 + n, None])
        out.index_add_(2, owner_t[r0 : r0 + n], p)
    return out


@register_scorer("probe")
class ProbeScorer(Scorer):
    """Exact probe queries per block; see the module docstring for the exact definition."""

    Config = ProbeConfig
    last_path: str | None = None

    def __init__(self, config: ProbeConfig | None = None, **params) -> None:
        super().__init__(config, **params)
        c = self.config
        self._kernel_params = ProbeKernelParams(
            block_size=c.block_size,
            threshold=float(c.threshold),
            rule=c.rule,
            top_k=int(c.top_k),
            min_prob=float(c.min_prob),
            force_sink=bool(c.force_sink),
            force_diagonal=bool(c.force_diagonal),
            pooled_mix=float(c.pooled_mix),
            pooled_stride=int(c.pooled_stride),
        )
        # the fused op's key, a plain string (Dynamo reads it as a constant of the graph)
        self.op_key = probe_params_key(self._kernel_params, c.probes, c.placement)
        # the block-probability op's key (pooled_mix > 0 only: the JSON needs plain field values)
        self.config_key = config_key(c, "probe") if c.pooled_mix > 0 else None

    def block_probs(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """float32 [B, Hq, NQB, NKB]: the block-mass estimate (rows sum to 1): the probes',
        mixed with the pooled-key estimate when ``pooled_mix`` > 0. With ``pooled_mix`` > 0 the
        probes and the pooled estimate come from the fused launches where :meth:`resolve_impl`
        says ``"triton"`` (inside ``torch.compile`` through the opaque
        ``prism::probe_block_probs`` op); the selection itself (:meth:`select`) never
        materialises this tensor on that path."""
        c = self.config
        if c.pooled_mix == 0:
            return probe_block_probs(q, k, c.block_size, c.probes, c.placement, c.chunk_mb)
        fused = self.resolve_impl(q, k) == "triton"
        if fused and torch.compiler.is_compiling():  # Dynamo cannot trace launch 1: opaque op
            return torch.ops.prism.probe_block_probs(q, k, self.config_key)
        if fused:
            rows, weights = probe_layout(q.shape[2], c.block_size, c.probes, c.placement, q.device)
            shared = shares_probes(c.placement, c.probes)
            probs = probe_block_probs_fused(q, k, rows, weights, c.block_size, shared)
            pooled = pooled_key_probs_fused(q, k, c.block_size, c.pooled_stride)
        else:
            probs = probe_block_probs(q, k, c.block_size, c.probes, c.placement, c.chunk_mb)
            pooled = pooled_key_block_probs(q, k, c.block_size, c.pooled_stride, c.chunk_mb)
        return probs.mul_(1.0 - c.pooled_mix).add_(pooled, alpha=c.pooled_mix)

    def kernel_params(self) -> ProbeKernelParams:
        """The resolved knobs of the fused estimator (made once: the config is read-only)."""
        return self._kernel_params

    def resolve_impl(self, q: torch.Tensor, k: torch.Tensor) -> str:
        """``"triton"`` or ``"torch"``: the path :meth:`select` takes for these inputs."""
        impl = self.config.impl
        if impl != "auto":
            return impl
        if auto_takes_fused(q) and probe_unsupported_reason(q, k, self.config.block_size) is None:
            return "triton"
        return "torch"

    def select_triton(self, q: torch.Tensor, k: torch.Tensor) -> BlockSelection:
        """The fused estimator (two Triton launches, :mod:`prism.kernels.estimation.probe_op`):
        a list-stored selection. Raises where the kernels cannot run."""
        c = self.config
        sq, sk = q.shape[2], k.shape[2]
        if torch.compiler.is_compiling():  # Dynamo cannot trace the launchers: the opaque op
            lists = torch.ops.prism.probe_select_lists(q, k, self.op_key)
        else:
            rows, weights = probe_layout(sq, c.block_size, c.probes, c.placement, q.device)
            shared = shares_probes(c.placement, c.probes)
            lists = probe_select_block_lists(q, k, rows, weights, self.kernel_params(), shared)
        return BlockSelection.from_lists(lists, sq, sk, c.block_size)

    def select_torch(self, q: torch.Tensor, k: torch.Tensor) -> BlockSelection:
        """The PyTorch path (chunked exact probe softmax, then ``masks.select``'s rule)."""
        return self.select_by_rule(q, k)

    def select(self, q: torch.Tensor, k: torch.Tensor) -> BlockSelection:
        path = self.resolve_impl(q, k)
        if path == "triton":
            sel = self.select_triton(q, k)
        else:
            sel = self.select_torch(q, k)
        if not torch.compiler.is_compiling():
            self.last_path = path
        return sel
