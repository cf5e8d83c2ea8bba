"""Fused probe estimator, host side: resolved parameters, support checks and the launchers.

The exact probe-query scorer (``prism.scorers.probe``, issue 11) as two Triton launches
(:mod:`.probe_kernels`):

1. **block log-masses** — tiles of ``M`` probe rows (the G query heads of a KV head x P probes
   x 8 query blocks; K is read once for the whole GQA group) against the causal KV blocks: per
   128-key block one ``tl.dot``, the block-local max ``m`` and sum ``l = Σ 2^(s - m)`` (base-2
   logits), written as one number ``m + log2 l`` per (probe row, KV block) — for top-p and
   min-prob from 512 KV blocks on against a fixed per-row reference instead (the probe's own score + 32: no per-block
   max; a repair pass redoes the rows where a block sum overflows). By default one
   program per (pair of KV blocks, b, KV head) holds those K blocks and walks the query tiles
   that see them (K-stationary, ``schedule="k"``); ``schedule="q"`` runs one program per query
   tile over its KV blocks (same entries, same arithmetic). Nothing of size ``[Sq, Sk]`` exists.
2. **select** — one program per tile of (query head, query block) rows holding the whole row of
   KV blocks in registers: per probe the block-causal softmax of its log-masses (this is the exact
   normalisation: ``Σ_j 2^(lm_j - max)`` is the probe's full softmax denominator), the weighted
   average over the probes, then the rule (top-p by the same threshold search as the Prism
   kernel), the forced sink / diagonal blocks and the two BlockMask block lists.

With ``pooled_mix`` > 0 two more launches (:mod:`.pooled_kernels`: the key-block means, then the
pooled-key estimate into a float32 ``[B, Hq, NQB, NKB]`` scratch) run before launch 2, which
mixes that estimate into the probes' before the rule.

Scratch: the log-masses, float32 ``[B, Hq, NQB, P, NKB]`` (P / BS of an ``[Sq, Sk]`` score
matrix: 256 MiB at 128K tokens with Hq = 32, P = 2). Triton is imported only when a kernel runs.
Nothing here imports ``prism.scorers``: the scorer passes the probe layout (rows and weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .op import MAX_BLOCK_N, RULE_CODES, _next_pow2, check_device_runnable, qk_reason

__all__ = [
    "ProbeKernelParams",
    "probe_block_log_masses",
    "probe_block_probs_fused",
    "probe_check_runnable",
    "probe_select_block_lists",
    "probe_unsupported_reason",
    "pick_reference",
    "pooled_key_probs_fused",
]

MAX_HEAD_DIM = 256
# ``reference="auto"``: the fixed reference from this many KV blocks on (64K tokens at BS = 128).
# H200, Hq = 32, Hkv = 8, D = 128, bf16 (``probe_estimator_s10_h200.md``): launch 1 fixed vs
# block max 0.041 vs 0.030 ms at 8K (its two extra small launches), 0.165 vs 0.163 at 32K,
# 1.55 vs 1.72 ms at 128K.
FIXED_MIN_BLOCKS = 512
# min-prob floors below this could keep a block the fixed reference may drop (< 2^-67 ~ 7e-21)
FIXED_MIN_PROB = 1e-12


@dataclass(frozen=True)
class ProbeKernelParams:
    """The probe scorer's knobs as the kernels need them.

    block_size: BS.  rule: ``top_p`` | ``top_k`` | ``min_prob``; threshold / top_k / min_prob its
    parameter.  force_sink / force_diagonal: always keep KV block 0 / the partial blocks.
    pooled_mix / pooled_stride: α and s of the pooled-key mixture (α = 0: the probes alone; α > 0:
    the two launches of :func:`.pooled_kernels.launch_pooled_probs`, mixed in by launch 2).
    """

    block_size: int
    threshold: float = 0.95
    rule: str = "top_p"
    top_k: int = 16
    min_prob: float = 0.01
    force_sink: bool = True
    force_diagonal: bool = True
    pooled_mix: float = 0.0
    pooled_stride: int = 8

    def __post_init__(self) -> None:
        if self.rule not in RULE_CODES:
            raise ValueError(f"unknown rule {self.rule!r}; valid rules: {list(RULE_CODES)}")
        if int(self.block_size) < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not 0.0 <= float(self.pooled_mix) < 1.0:
            raise ValueError(f"pooled_mix must be in [0, 1), got {self.pooled_mix}")
        if self.pooled_mix > 0:
            _check_stride("pooled_stride", self.pooled_stride, self.block_size)


def _check_stride(name: str, stride: int, block_size: int) -> None:
    if not 1 <= int(stride) <= int(block_size):
        raise ValueError(f"{name} must be in [1, block_size={block_size}], got {stride}")


def probe_unsupported_reason(q: torch.Tensor, k: torch.Tensor, block_size: int) -> str | None:
    """Why the fused probe estimator cannot take these inputs (``None``: it can)."""
    why = qk_reason(q, k)
    if why is not None:
        return why
    if q.shape[3] > MAX_HEAD_DIM:
        return f"head dim D={q.shape[3]} > {MAX_HEAD_DIM}"
    if block_size > 256:
        return f"block_size={block_size} > 256"
    nkb = math.ceil(k.shape[2] / block_size)
    if _next_pow2(nkb) > MAX_BLOCK_N:
        return f"NKB={nkb} KV blocks (at most {MAX_BLOCK_N} in one register row)"
    return None


def probe_check_runnable(q: torch.Tensor, k: torch.Tensor, block_size: int) -> None:
    """Raise a clear error where the fused probe estimator cannot run on these inputs."""
    why = probe_unsupported_reason(q, k, block_size)
    if why is not None:
        raise ValueError(f"the fused probe estimator does not support these inputs: {why}")
    check_device_runnable(q, "probe")


def _check_layout(rows: torch.Tensor, weights: torch.Tensor, nqb: int, sq: int, bs: int) -> int:
    if rows.dim() != 2 or rows.shape[0] != nqb or weights.shape != rows.shape:
        raise ValueError(
            f"rows / weights must be [NQB={nqb}, P], got {tuple(rows.shape)} / "
            f"{tuple(weights.shape)}"
        )
    return rows.shape[1]


def pick_reference(params: ProbeKernelParams, nkb: int) -> str:
    """Launch 1's reference for ``reference="auto"``: ``"fixed"`` for top-p, and for min-prob
    with a floor >= :data:`FIXED_MIN_PROB`, from :data:`FIXED_MIN_BLOCKS` KV blocks on (where it
    is faster); ``"block_max"`` otherwise (top-k may have to rank blocks below 2^-67)."""
    if nkb < FIXED_MIN_BLOCKS or params.rule == "top_k":
        return "block_max"
    if params.rule == "min_prob" and float(params.min_prob) < FIXED_MIN_PROB:
        return "block_max"
    return "fixed"


def probe_block_log_masses(
    q: torch.Tensor,
    k: torch.Tensor,
    rows: torch.Tensor,
    block_size: int,
    *,
    block_m: int | None = None,
    num_warps: int | None = None,
    first_slot: int = 0,
    reference: str = "block_max",
) -> torch.Tensor:
    """Launch 1: float32 ``[B, Hq, NQB, P, NKB]`` base-2 block log-masses of the probes
    (of the slots ``rows[:, first_slot:]``). ``reference``: ``"block_max"`` (every entry exact)
    or ``"fixed"`` (faster; entries far below the probe's own-key weight may be low or ``-inf``,
    see :func:`.probe_kernels.launch_log_masses`).

    q [B, Hq, Sq, D], k [B, Hkv, Sk, D] (any strides); rows int [NQB, P] query-local probe rows
    (``prism.scorers.probe.probe_layout``). Entry (b, h, i, p, j) is
    ``log2 Σ_{c in block j, c <= a} 2^(log2(e) q_a·k_c / sqrt(D))`` for the probe at absolute
    position ``a = Sk - Sq + rows[i, p]`` (``-inf`` where the probe sees no key of block j);
    entries past the last KV block the query block can see are not written.
    """
    probe_check_runnable(q, k, block_size)
    from .probe_kernels import launch_log_masses

    b, hq, sq, d = q.shape
    nqb = math.ceil(sq / block_size)
    _check_layout(rows, rows, nqb, sq, block_size)
    return launch_log_masses(
        q,
        k,
        rows,
        block_size,
        block_m=block_m,
        num_warps=num_warps,
        first_slot=first_slot,
        reference=reference,
    )


def probe_block_probs_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    rows: torch.Tensor,
    weights: torch.Tensor,
    block_size: int,
    shared: bool = False,
    reference: str = "fixed",
) -> torch.Tensor:
    """The probes' block-mass estimate float32 ``[B, Hq, NQB, NKB]`` from launch 1 (plus a
    PyTorch normalisation; for tests and studies — :func:`probe_select_block_lists` never
    materialises it). ``shared`` as there: launch 1 runs on slots 1.. only and slot 0 of block i
    is block i − 1's last probe. ``reference`` as :func:`probe_block_log_masses` (default
    ``"fixed"``, the one the selection takes at long rows: the probabilities are the same to
    float rounding, or below 2^-67)."""
    sq, sk = q.shape[2], k.shape[2]
    lm = probe_block_log_masses(q, k, rows, block_size, first_slot=int(shared), reference=reference)
    nqb, nkb = lm.shape[2], lm.shape[4]
    i = torch.arange(nqb, device=q.device)
    last = (sk - sq) + torch.clamp((i + 1) * block_size, max=sq) - 1
    cols = torch.arange(nkb, device=q.device)[None, :]
    vis = cols <= (last // block_size)[:, None]
    lm = lm.masked_fill(~vis[:, None, :], float("-inf"))
    if shared:  # block i's slot 0: block i - 1's last probe (block 0: any finite row, weight 0)
        prev = torch.cat([lm[:, :, :1, 0], lm[:, :, :-1, -1]], dim=2)  # [B, Hq, NQB, NKB]
        seen = cols <= ((sk - sq + i * block_size - 1) // block_size)[:, None]
        seen[0] = cols[0] == 0
        prev = prev.masked_fill(~seen, float("-inf"))
        lm = torch.cat([prev[:, :, :, None], lm], dim=3)
    p = torch.softmax(lm * math.log(2.0), dim=-1)  # [B, Hq, NQB, P, NKB]
    return (p * weights.to(p.device, torch.float32)[:, :, None]).sum(3)


def pooled_key_probs_fused(
    q: torch.Tensor, k: torch.Tensor, block_size: int, stride: int = 8
) -> torch.Tensor:
    """The pooled-key estimate (``prism.scorers.probe.pooled_key_block_probs``) in two Triton
    launches (:mod:`.pooled_kernels`): float32 ``[B, Hq, NQB, NKB]``, rows summing to 1, zero past
    each query block's visible KV blocks. q [B, Hq, Sq, D], k [B, Hkv, Sk, D] (Sk >= Sq)."""
    probe_check_runnable(q, k, block_size)
    _check_stride("stride", stride, block_size)
    from .pooled_kernels import launch_pooled_probs

    return launch_pooled_probs(q, k, block_size, stride)


def probe_select_block_lists(
    q: torch.Tensor,
    k: torch.Tensor,
    rows: torch.Tensor,
    weights: torch.Tensor,
    params: ProbeKernelParams,
    shared: bool = False,
    reference: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The probe selection of ``q [B, Hq, Sq, D]``, ``k [B, Hkv, Sk, D]`` as BlockMask lists.

    ``rows`` int [NQB, P] / ``weights`` float32 [NQB, P]: the probe layout
    (``prism.scorers.probe.probe_layout``, on q's device). ``shared`` (the ``shared`` placement,
    P >= 2): slot 0 of block i >= 1 is row ``i·BS − 1``, block i − 1's last slot, so launch 1
    runs on slots 1..P − 1 only and launch 2 reads that row's log-masses again (P − 1 probe
    softmaxes per block instead of P). Returns ``(kv_num, kv_idx, full_num, full_idx)`` int32
    ``[B, Hq, NQB]`` / ``[B, Hq, NQB, NKB]``, laid out as ``prism.masks.bool_to_block_lists``
    (selected blocks ascending, then the unselected ones).

    ``reference`` (launch 1's, see :func:`probe_block_log_masses`): ``"auto"`` is
    :func:`pick_reference` — the fixed reference for top-p and min-prob (they never keep a block
    below 2^-67 of a probe's softmax, where the fixed reference may be inexact) from
    :data:`FIXED_MIN_BLOCKS` KV blocks on, the block max for top-k (which may have to rank such
    blocks) and for shorter rows.

    ``params.pooled_mix`` > 0: the pooled-key estimate (:func:`pooled_key_probs_fused`'s two
    launches, written into a scratch ``[B, Hq, NQB, NKB]`` float32) is mixed into the probes'
    inside launch 2, before the rule.
    """
    if not isinstance(params, ProbeKernelParams):
        raise TypeError(f"params must be ProbeKernelParams, got {type(params).__name__}")
    bs = int(params.block_size)
    probe_check_runnable(q, k, bs)
    nqb = math.ceil(q.shape[2] / bs)
    _check_layout(rows, weights, nqb, q.shape[2], bs)
    from .probe_kernels import launch_log_masses, launch_select

    if shared and rows.shape[1] < 2:
        raise ValueError("shared=True needs at least 2 probe slots (slot 0 is the shared one)")
    if reference == "auto":
        reference = pick_reference(params, math.ceil(k.shape[2] / bs))
    elif reference not in ("block_max", "fixed"):
        raise ValueError(f"unknown reference {reference!r}; valid: ['auto', 'block_max', 'fixed']")
    lm = launch_log_masses(q, k, rows, bs, first_slot=int(shared), reference=reference)
    pooled, alpha = None, float(params.pooled_mix)
    if alpha > 0:  # launch 2 reads only the visible entries: no zero fill needed
        from .pooled_kernels import launch_pooled_probs

        nqb, nkb = lm.shape[2], lm.shape[4]
        buf = torch.empty(q.shape[0], q.shape[1], nqb, nkb, device=q.device, dtype=torch.float32)
        pooled = launch_pooled_probs(q, k, bs, int(params.pooled_stride), out=buf)
    return launch_select(
        lm, weights, q.shape[2], k.shape[2], k.shape[1], params, shared=shared,
        pooled=pooled, alpha=alpha,
    )  # fmt: skip
