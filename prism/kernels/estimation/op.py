"""Fused Prism estimator, host side: resolved parameters, support checks and the launcher.

:func:`prism_select_block_lists` runs the Prism selection (DESIGN.md §4) as two Triton launches —
:mod:`.pool` (block means + calibration statistics) and :mod:`.select` (per-band scores, softmax,
threshold-search top-p, union, forced blocks, block lists) — and returns the FlexAttention
BlockMask block lists. It takes *resolved* scalars (:class:`PrismKernelParams`: band widths,
per-band thresholds, flags), not a scorer config: ``prism.scorers.prism.PrismScorer`` resolves its
config (``PrismScorer.kernel_params(D)``) and wraps the lists in
``prism.masks.BlockSelection.from_lists``. Nothing here imports ``prism.scorers``.

This module imports Triton only when a kernel is launched (or :func:`interpreter_on` is asked):
Triton's interpreter (``TRITON_INTERPRET=1``) must be switched on before Triton's first import.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch

__all__ = [
    "MAX_BLOCK_N",
    "PrismKernelParams",
    "block_lists_to_block_mask",
    "block_lists_to_selection",
    "check_runnable",
    "interpreter_on",
    "prism_select_block_lists",
    "supports",
    "triton_available",
    "unsupported_reason",
]

MAX_BLOCK_N = 4096  # NKB up to 4096 (512K tokens at BS=128) in one register row
RULE_CODES = {"top_p": 0, "top_k": 1, "min_prob": 2}
ROPE_LAYOUTS = ("half", "interleaved")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class PrismKernelParams:
    """The Prism knobs as the kernel needs them: every default already resolved.

    block_size: BS (the KV block; also the query block unless ``q_block_size`` is set).
    q_block_size: BSQ, the query rows of a block (0 = ``block_size``).
    high_dims / low_dims: band widths in dims (even, <= D).
    threshold_high / threshold_low: per-band target of ``rule`` (top-p mass; ``>= 1`` keeps every
    visible block of that band).  rule: ``top_p`` | ``top_k`` | ``min_prob``, with ``top_k`` /
    ``min_prob`` its parameter.  calibrate: energy calibration (per (b, h) band temperature).
    rope_layout: ``half`` (pair j = dims j, j + D/2) | ``interleaved`` (dims 2j, 2j + 1).
    force_sink / force_diagonal: always keep KV block 0 / the partial (diagonal) blocks.
    """

    block_size: int
    high_dims: int
    low_dims: int
    threshold_high: float
    threshold_low: float
    rule: str = "top_p"
    top_k: int = 16
    min_prob: float = 0.01
    calibrate: bool = True
    rope_layout: str = "half"
    force_sink: bool = True
    force_diagonal: bool = True
    q_block_size: int = 0

    def __post_init__(self) -> None:
        for name in ("high_dims", "low_dims"):
            w = getattr(self, name)
            if not isinstance(w, int) or w <= 0 or w % 2:
                raise ValueError(f"{name} must be a positive even number of dims, got {w!r}")
        if self.rule not in RULE_CODES:
            raise ValueError(f"unknown rule {self.rule!r}; valid rules: {list(RULE_CODES)}")
        if self.rope_layout not in ROPE_LAYOUTS:
            raise ValueError(
                f"unknown rope_layout {self.rope_layout!r}; valid: {list(ROPE_LAYOUTS)}"
            )
        if int(self.block_size) < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if int(self.q_block_size) < 0:
            raise ValueError(f"q_block_size must be >= 0, got {self.q_block_size}")


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# looked up once at import (without importing Triton): a plain constant, also for Dynamo, which
# cannot trace importlib inside a compiled graph
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether Triton is installed (looked up once, when this module is imported)."""
    return _TRITON_INSTALLED


def interpreter_on() -> bool:
    """Whether the estimator's kernels were built for Triton's interpreter (CPU tensors).

    Imports Triton (and the kernels) if not yet imported; what counts is ``TRITON_INTERPRET`` at
    that first import, not its value now."""
    from . import select

    return type(select._select_kernel).__name__ == "InterpretedFunction"


def qk_reason(q: torch.Tensor, k: torch.Tensor) -> str | None:
    """The input rules every fused estimator shares (rank, shapes, GQA, Sq <= Sk, dtype,
    device): why ``q`` / ``k`` cannot be taken, or ``None``."""
    if q.dim() != 4 or k.dim() != 4:
        return "q and k must be [B, H, S, D]"
    b, hq, sq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or k.shape[1] == 0 or hq % k.shape[1]:
        return f"incompatible q {tuple(q.shape)} / k {tuple(k.shape)}"
    if sq < 1 or sq > k.shape[2]:
        return f"needs 1 <= Sq <= Sk, got Sq={sq}, Sk={k.shape[2]}"
    if q.dtype != k.dtype or q.device != k.device:
        return "q and k must share dtype and device"
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype} (supported: float16, bfloat16, float32)"
    return None


def check_device_runnable(q: torch.Tensor, what: str) -> None:
    """Raise a clear error where a fused estimator (``what``) cannot run on ``q``'s device:
    no Triton, CPU tensors without the interpreter, or a device other than CUDA / CPU."""
    if not triton_available():
        raise RuntimeError(f"the fused {what} estimator needs Triton (pip install triton)")
    if q.device.type == "cpu":
        if not interpreter_on():
            raise RuntimeError(
                f"the fused {what} estimator runs on CPU tensors only under Triton's interpreter: "
                "set TRITON_INTERPRET=1 before Triton is first imported (or use impl='torch')"
            )
    elif q.device.type != "cuda":
        raise RuntimeError(f"the fused {what} estimator runs on CUDA (or CPU), not {q.device}")


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, params: PrismKernelParams) -> str | None:
    """Why the fused estimator cannot take these inputs (``None``: it can). Shapes / dtypes /
    params only; where it can *run* (device, Triton, interpreter) is :func:`check_runnable`'s."""
    why = qk_reason(q, k)
    if why is not None:
        return why
    d = q.shape[3]
    if d % 2:
        return f"odd head dim D={d}"
    for name in ("high_dims", "low_dims"):
        if getattr(params, name) > d:
            return f"{name}={getattr(params, name)} exceeds the head dim D={d}"
    nkb = math.ceil(k.shape[2] / params.block_size)
    if _next_pow2(nkb) > MAX_BLOCK_N:
        return f"NKB={nkb} KV blocks (at most {MAX_BLOCK_N} in one register row)"
    return None


def supports(q: torch.Tensor, k: torch.Tensor, params: PrismKernelParams) -> bool:
    """Whether the fused path handles these inputs / params (else use the PyTorch path)."""
    return unsupported_reason(q, k, params) is None


def check_runnable(q: torch.Tensor, k: torch.Tensor, params: PrismKernelParams) -> None:
    """Raise a clear error where the fused estimator cannot run on these inputs."""
    if not isinstance(params, PrismKernelParams):
        raise TypeError(
            "prism_select_block_lists takes resolved PrismKernelParams, got "
            f"{type(params).__name__}; from a PrismConfig: PrismScorer(config).kernel_params(D)"
        )
    why = unsupported_reason(q, k, params)
    if why is not None:
        raise ValueError(f"the fused Prism estimator does not support these inputs: {why}")
    check_device_runnable(q, "Prism")


class Plan:
    """Shapes and resolved scalar kernel arguments shared by the two launches."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, params: PrismKernelParams) -> None:
        check_runnable(q, k, params)
        b, hq, sq, d = q.shape
        hkv, sk = k.shape[1], k.shape[2]
        self.b, self.hq, self.sq, self.d, self.hkv, self.sk = b, hq, sq, d, hkv, sk
        self.params = params
        self.device_type = q.device.type
        self.bs = int(params.block_size)  # BSK
        self.bq = int(params.q_block_size) or self.bs  # BSQ
        self.g = hq // hkv
        self.nqb, self.nkb = math.ceil(sq / self.bq), math.ceil(sk / self.bs)
        self.nkb_p = max(16, _next_pow2(self.nkb))  # = BLOCK_N of the select kernel
        self.half = d // 2
        self.w_hi, self.w_lo = int(params.high_dims), int(params.low_dims)
        self.interleaved = params.rope_layout == "interleaved"
        # per band: the dims as (start of segment 0, start of segment 1, segment length)
        if self.interleaved:  # pair j = dims 2j, 2j+1: each band is one contiguous range
            self.hi_seg = (0, 0, self.w_hi)
            self.lo_seg = (2 * (self.half - self.w_lo // 2), 0, self.w_lo)
            self.n_segs = 1
        else:  # rotate_half: pair j = dims j, j + D/2
            self.hi_seg = (0, self.half, self.w_hi // 2)
            self.lo_seg = (self.half - self.w_lo // 2, d - self.w_lo // 2, self.w_lo // 2)
            self.n_segs = 2
        self.rule = RULE_CODES[params.rule]
        if self.rule == 0:
            self.tgt_hi, self.tgt_lo = float(params.threshold_high), float(params.threshold_low)
            self.all_hi, self.all_lo = self.tgt_hi >= 1.0, self.tgt_lo >= 1.0
        elif self.rule == 1:
            self.tgt_hi = self.tgt_lo = float(int(params.top_k))
            self.all_hi = self.all_lo = False
        else:
            self.tgt_hi = self.tgt_lo = float(params.min_prob)
            self.all_hi = self.all_lo = False
        # the two bands coincide (same dims, so the same scale and calibration, and the same
        # target): the select kernel scores one band (mean pooling, :mod:`prism.scorers.meanpool`)
        self.one_band = (
            self.hi_seg == self.lo_seg
            and self.w_hi == self.w_lo
            and (self.tgt_hi, self.all_hi) == (self.tgt_lo, self.all_lo)
        )


def prism_select_block_lists(
    q: torch.Tensor, k: torch.Tensor, params: PrismKernelParams, launch=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prism selection of ``q [B, Hq, Sq, D]``, ``k [B, Hkv, Sk, D]`` as BlockMask block lists.

    ``params``: the resolved knobs (:class:`PrismKernelParams`); ``launch``: a
    :class:`~prism.kernels.estimation.select.SelectConfig` (default
    :func:`~prism.kernels.estimation.select.pick_select_config`). Returns
    ``(kv_num, kv_idx, full_num, full_idx)``: int32 ``[B, Hq, NQB]`` and ``[B, Hq, NQB, NKB]`` —
    partial (causal-frontier) blocks and full blocks, selected indices first in ascending order,
    then the unselected ones ascending (the layout of ``prism.masks.bool_to_block_lists``).
    Runs on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1``; raises elsewhere.
    """
    plan = Plan(q, k, params)  # checks first: a clear error before Triton is imported
    from .pool import pool_blocks_fused
    from .select import select_from_pooled

    return select_from_pooled(pool_blocks_fused(q, k, plan), plan, launch)


def block_lists_to_block_mask(
    kv_num, kv_idx, full_num, full_idx, sq: int, sk: int, block_size: int
):
    """FlexAttention ``BlockMask`` (partial blocks with the causal ``mask_mod``, full blocks
    without) from the four lists, exactly as ``prism.masks.selection_to_block_mask`` builds it."""
    from ...masks.blockmask import lists_to_block_mask

    return lists_to_block_mask(kv_num, kv_idx, full_num, full_idx, sq, sk, block_size)


def block_lists_to_selection(lists, sq: int, sk: int, block_size: int, **info):
    """A list-stored :class:`prism.masks.BlockSelection` carrying the lists (its ``block_mask()``
    reuses them; its ``mask`` is expanded from them lazily)."""
    from ...masks.selection import BlockSelection

    return BlockSelection.from_lists(lists, sq, sk, block_size, info=dict(info))
