"""Scorers whose selection the fused Prism estimator computes (``prism``, ``meanpool``).

The fused estimator (:mod:`prism.kernels.estimation`: block means, per-band pooled scores,
softmax, the rule, forced blocks, BlockMask lists) takes resolved :class:`PrismKernelParams`.
Mean pooling is the special case of one band spanning every dim without calibration, so both
scorers share this routing: a subclass defines :meth:`kernel_params` (its knobs resolved for a
head dim) and :meth:`select_torch` (the PyTorch definition the kernel is tested against), and
its config carries ``impl`` (``auto`` | ``torch`` | ``triton``).
"""

from __future__ import annotations

import torch

from ..kernels.estimation.op import PrismKernelParams, prism_select_block_lists, supports
from ..masks import BlockSelection
from ._fused_ops import auto_takes_fused, config_key
from .base import Scorer

IMPLS = ("auto", "torch", "triton")


class FusedPooledScorer(Scorer):
    """Routing between the fused Triton estimator and the PyTorch path (``config.impl``);
    ``last_path`` records which one the last eager call ran (``"triton"`` or ``"torch"``).
    Both paths support rectangular blocks (``q_block_size``)."""

    rect_blocks = True

    last_path: str | None = None

    def __init__(self, config=None, **params) -> None:
        super().__init__(config, **params)
        # the fused op's key, a plain string (Dynamo reads it as a constant of the graph); the
        # config is read here once, as everywhere a scorer is used: build a new scorer to change it
        self.op_key = config_key(self.config, self.alias_of or self.name)

    def kernel_params(self, d: int) -> PrismKernelParams:  # pragma: no cover - abstract
        raise NotImplementedError

    def select_torch(self, q: torch.Tensor, k: torch.Tensor) -> BlockSelection:  # pragma: no cover
        raise NotImplementedError

    def _cached_params(self, d: int, make) -> PrismKernelParams:
        """``make()`` once per head dim ``d`` (the config is read-only once built, and this is on
        the per-call host path)."""
        cached = self.__dict__.get("_kernel_params")
        if cached is not None and cached[0] == d:
            return cached[1]
        params = make()
        self._kernel_params = (d, params)
        return params

    def select_triton(
        self, q: torch.Tensor, k: torch.Tensor, params: PrismKernelParams | None = None
    ) -> BlockSelection:
        """The fused estimator: a list-stored selection (its ``block_mask()`` wraps the lists the
        kernel wrote). Raises where the kernel cannot run (no Triton, CPU without the
        interpreter, unsupported inputs). ``params``: :meth:`kernel_params` if already made."""
        if torch.compiler.is_compiling():  # Dynamo cannot trace the launcher: the opaque op
            lists = torch.ops.prism.prism_select_lists(q, k, self.op_key)
        else:
            lists = prism_select_block_lists(q, k, params or self.kernel_params(q.shape[-1]))
        return BlockSelection.from_lists(lists, q.shape[2], k.shape[2], self.block_size)

    def _route(self, q: torch.Tensor, k: torch.Tensor) -> tuple[str, PrismKernelParams | None]:
        impl = self.config.impl
        if impl != "auto":
            return impl, None
        if auto_takes_fused(q) and q.shape[-1] % 2 == 0:
            params = self.kernel_params(q.shape[-1])
            if supports(q, k, params):
                return "triton", params
        return "torch", None

    def resolve_impl(self, q: torch.Tensor, k: torch.Tensor) -> str:
        """``"triton"`` or ``"torch"``: the path :meth:`select` takes for these inputs."""
        return self._route(q, k)[0]

    def select(self, q: torch.Tensor, k: torch.Tensor) -> BlockSelection:
        path, params = self._route(q, k)
        if path == "triton":
            sel = self.select_triton(q, k, params)
        else:
            sel = self.select_torch(q, k)
        if not torch.compiler.is_compiling():
            self.last_path = path
        return sel
