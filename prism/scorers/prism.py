"""Prism: dual-band spectral block scorer with energy calibration (DESIGN.md §4).

Mean pooling over a block attenuates RoPE pair j by ~|sin(BS·θ_j/2) / (BS·sin(θ_j/2))|: the fast
(high-frequency, positional) pairs vanish from q̄·k̄. Prism scores the high and the low band
separately, rescales each band by a calibrated temperature that restores its lost energy, selects
per band with top-p and keeps the union, plus the sink and the diagonal blocks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .._checks import check_threshold
from ..kernels.estimation.op import PrismKernelParams
from ..masks import BlockSelection, apply_rule, block_causal, block_dims, masked_softmax
from ._fused_pooled import IMPLS, FusedPooledScorer
from .base import ProbScorerConfig, register_scorer
from .pooling import gqa_scores, pool_blocks

ROPE_LAYOUTS = ("half", "interleaved")


@dataclass
class PrismConfig(ProbScorerConfig):
    """Prism knobs.

    high_dims / low_dims: width of the high / low band in dims (default D/2 and 3D/4: 64 and 96 at
        D=128; the bands overlap, as published).
    threshold_high / threshold_low: per-band top-p overrides of ``threshold``.
    calibrate: energy calibration (per (b, h) temperature); off means τ = 1.
    rope_layout: "half" (HF rotate_half: pair j = dims j, j + D/2) or "interleaved" (2j, 2j + 1).
    impl: which implementation computes the selection (the same selection either way):
        ``"auto"`` — the fused Triton estimator (prism/kernels/estimation, writes the BlockMask
        lists directly; inside torch.compile an opaque custom op) on CUDA tensors where Triton is
        installed and the inputs are supported, the plain PyTorch path otherwise; ``"triton"`` — always the fused
        kernel (also on CPU tensors under Triton's interpreter, ``TRITON_INTERPRET=1``), a clear
        error where it cannot run; ``"torch"`` — always the PyTorch path.
    fused: deprecated alias of ``impl``: ``fused=False`` means ``impl="torch"``, ``fused=True``
        the default ``impl="auto"``. Normalised to None after construction.
    """

    high_dims: int | None = None
    low_dims: int | None = None
    threshold_high: float | None = None
    threshold_low: float | None = None
    calibrate: bool = True
    rope_layout: str = "half"
    impl: str = "auto"
    fused: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("threshold_high", "threshold_low"):
            if getattr(self, name) is not None:
                check_threshold(name, getattr(self, name))
        if self.rope_layout not in ROPE_LAYOUTS:
            raise ValueError(
                f"unknown rope_layout {self.rope_layout!r}; valid: {list(ROPE_LAYOUTS)}"
            )
        for name in ("high_dims", "low_dims"):
            v = getattr(self, name)
            if v is not None and (v <= 0 or v % 2):
                raise ValueError(f"{name} must be a positive even number of dims, got {v}")
        if self.impl not in IMPLS:
            raise ValueError(f"unknown impl {self.impl!r}; valid: {list(IMPLS)}")
        if self.fused is not None:
            warnings.warn(
                "PrismConfig.fused is deprecated: use impl='auto' (fused=True) or "
                "impl='torch' (fused=False)",
                DeprecationWarning,
                stacklevel=3,
            )
            if not self.fused:
                if self.impl == "triton":
                    raise ValueError("fused=False contradicts impl='triton'")
                self.impl = "torch"
            self.fused = None


def band_dims(d: int, width: int, band: str, layout: str = "half") -> torch.Tensor:
    """Dim indices (int64 [width]) of the ``high`` (fastest pairs) or ``low`` (slowest) band."""
    if width > d or width % 2:
        raise ValueError(f"band width {width} must be even and <= D={d}")
    half, npairs = d // 2, width // 2
    pairs = torch.arange(npairs) if band == "high" else torch.arange(half - npairs, half)
    if layout == "half":
        return torch.cat([pairs, pairs + half])
    return torch.stack([2 * pairs, 2 * pairs + 1], dim=1).flatten()


def _rms(x: torch.Tensor) -> torch.Tensor:
    """RMS over (blocks, dims): [B, H, N, d] -> [B, H], clamped at 1e-6."""
    return x.pow(2).mean(dim=(-2, -1)).sqrt().clamp_min(1e-6)


@register_scorer("prism")
class PrismScorer(FusedPooledScorer):
    """Prism (DESIGN.md §4). ``config.impl`` picks the implementation (see :class:`PrismConfig`);
    ``last_path`` records which one the last call ran (``"triton"`` or ``"torch"``)."""

    Config = PrismConfig

    # -- resolved knobs -----------------------------------------------------------------------
    def band_widths(self, d: int) -> tuple[int, int]:
        c = self.config
        high = c.high_dims if c.high_dims is not None else d // 2
        low = c.low_dims if c.low_dims is not None else (3 * d) // 4
        for name, w in (("high_dims", high), ("low_dims", low)):
            if w > d:
                raise ValueError(f"{name}={w} exceeds the head dim D={d}")
        return high, low

    def band_thresholds(self) -> tuple[float, float]:
        """(high band, low band) target of the rule: ``threshold`` unless overridden per band."""
        c = self.config
        p_high = c.threshold if c.threshold_high is None else c.threshold_high
        p_low = c.threshold if c.threshold_low is None else c.threshold_low
        return p_high, p_low

    def kernel_params(self, d: int) -> PrismKernelParams:
        """This config resolved for head dim ``d``: the fused estimator's parameters."""
        c = self.config

        def make() -> PrismKernelParams:
            (w_hi, w_lo), (p_hi, p_lo) = self.band_widths(d), self.band_thresholds()
            return PrismKernelParams(
                block_size=c.block_size,
                q_block_size=c.q_block_size or c.block_size,
                high_dims=w_hi,
                low_dims=w_lo,
                threshold_high=p_hi,
                threshold_low=p_lo,
                rule=c.rule,
                top_k=int(c.top_k),
                min_prob=c.min_prob,
                calibrate=c.calibrate,
                rope_layout=c.rope_layout,
                force_sink=c.force_sink,
                force_diagonal=c.force_diagonal,
            )

        return self._cached_params(d, make)

    # -- the PyTorch path ---------------------------------------------------------------------
    def band_probs(self, q: torch.Tensor, k: torch.Tensor) -> Iterator[torch.Tensor]:
        """Yield per-band block-causal probabilities (high, then low), float32 [B, Hq, NQB, NKB].

        A generator, so that only one band's probabilities live at a time."""
        c = self.config
        d = q.shape[-1]
        bq, bk = block_dims(self.block_size)
        hq, hkv = q.shape[1], k.shape[1]
        visible, _ = block_causal(q.shape[2], k.shape[2], self.block_size, q.device)
        qp, kp = pool_blocks(q, bq), pool_blocks(k, bk)
        if c.calibrate:
            rq, rk = _rms(qp), _rms(kp)  # [B, Hq], [B, Hkv]
        for band, width in zip(("high", "low"), self.band_widths(d)):
            idx = band_dims(d, width, band, c.rope_layout).to(q.device)
            qb, kb = qp.index_select(-1, idx), kp.index_select(-1, idx)
            logits = gqa_scores(qb, kb) / math.sqrt(width)
            if c.calibrate:
                ratio_k = (_rms(kb) / rk).repeat_interleave(hq // hkv, dim=1)
                tau = math.sqrt(width / d) * (_rms(qb) / rq) * ratio_k  # [B, Hq]
                logits = logits / tau[:, :, None, None]
            yield masked_softmax(logits, visible)

    def select_torch(self, q: torch.Tensor, k: torch.Tensor) -> BlockSelection:
        """The plain PyTorch path (the definition the fused kernel is tested against)."""
        c = self.config
        sq, sk = q.shape[2], k.shape[2]
        visible, _ = block_causal(sq, sk, self.block_size, q.device)
        keep = None
        for probs, p in zip(self.band_probs(q, k), self.band_thresholds()):
            sel = apply_rule(probs, visible, c.rule, p, c.top_k, c.min_prob)
            keep = sel if keep is None else keep | sel
        return self.finalize(keep, sq, sk)
