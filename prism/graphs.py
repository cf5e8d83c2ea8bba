"""CUDA-graph pre-fill: capture a whole (sparse) forward once per input shape, then replay it.

Prism's sparse path never synchronises with the host (the estimator writes the BlockMask lists
on the GPU, the kernels read them there), so a patched model's pre-fill can be captured in one
CUDA graph. A replay launches every kernel of the forward at once: the per-layer host work
(Python, the compiled FlexAttention call's guards, the estimator's launches) is paid once at
capture instead of on every call, which is what limits a small model's speed-up at 8K-32K
tokens (``benchmarks/results/README.md``).

    run = prism.CUDAGraphPrefill(lambda ids: model.model(input_ids=ids).last_hidden_state)
    h = run(ids)          # first call for this shape: warm-up + capture, then replay
    h = run(other_ids)    # same shape: replay only

What a graph can and cannot do (also in the README):

* one graph per distinct (shape, dtype, device) of the inputs, at most ``max_graphs`` kept
  (least recently used dropped); each holds the memory its forward needs (its private pool);
* the function must be free of host synchronisation and of Python decisions that read tensor
  data; inputs are copied into static buffers, outputs are the graph's static tensors (cloned
  unless ``clone_outputs=False``);
* under capture, the ``"prism"`` mask builder takes every row as one unpadded causal sequence
  (transformers' packed-sequence guess from ``position_ids`` cannot be read on the host): pass
  unpadded ``input_ids`` only, no ``attention_mask``, no cache.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["CUDAGraphPrefill", "capturing_plain_prefill"]

_PLAIN_CAPTURE = [False]


def plain_prefill_assumed() -> bool:
    """True inside :func:`capturing_plain_prefill` (read by the ``"prism"`` mask builder)."""
    return _PLAIN_CAPTURE[0]


@contextlib.contextmanager
def capturing_plain_prefill():
    """While active, the ``"prism"`` mask builder treats a mask-less forward as plain causal
    attention over one unpadded sequence per row, without reading tensor data."""
    before = _PLAIN_CAPTURE[0]
    _PLAIN_CAPTURE[0] = True
    try:
        yield
    finally:
        _PLAIN_CAPTURE[0] = before


def _signature(args: tuple) -> tuple:
    sig = []
    for a in args:
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"CUDAGraphPrefill inputs must be tensors, got {type(a).__name__}")
        if a.device.type != "cuda":
            raise ValueError(
                f"CUDAGraphPrefill needs CUDA tensors (CUDA graphs), got a tensor on {a.device}"
            )
        sig.append((tuple(a.shape), a.dtype, a.device))
    return tuple(sig)


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    raise TypeError(
        f"CUDAGraphPrefill: the function must return a tensor or a tuple/list of tensors, "
        f"got {type(out).__name__}"
    )


def _map(out: Any, fn) -> Any:
    if isinstance(out, torch.Tensor):
        return fn(out)
    return type(out)(_map(o, fn) for o in out)


class _Graph:
    def __init__(self, fn: Callable, args: tuple, warmup: int) -> None:
        self.inputs = [a.clone() for a in args]
        stream = torch.cuda.Stream(device=args[0].device)
        stream.wait_stream(torch.cuda.current_stream(args[0].device))
        with capturing_plain_prefill(), torch.cuda.stream(stream):
            for _ in range(warmup):  # compiles, caches and lazy inits happen outside the graph
                fn(*self.inputs)
        torch.cuda.current_stream(args[0].device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with capturing_plain_prefill(), torch.cuda.graph(self.graph):
            self.output = fn(*self.inputs)
        _flatten(self.output)  # fail now on a non-tensor output

    def __call__(self, args: tuple, clone: bool) -> Any:
        for dst, src in zip(self.inputs, args):
            dst.copy_(src)
        self.graph.replay()
        return _map(self.output, torch.Tensor.clone) if clone else self.output


class CUDAGraphPrefill:
    """Call ``fn(*tensors)`` through a CUDA graph captured once per input signature.

    fn: a function of CUDA tensors (e.g. ``ids [B, S] -> hidden [B, S, H]``) returning a tensor
        or a tuple/list of tensors; no host synchronisation inside (Prism's sparse path has none).
    max_graphs: graphs kept (one per (shape, dtype, device) signature), least recently used first
        out.  warmup: eager calls on a side stream before each capture (compiles, lazy caches).
    clone_outputs: return copies (default) or the graph's static output tensors, which the next
        replay of the same graph overwrites.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        max_graphs: int = 4,
        warmup: int = 2,
        clone_outputs: bool = True,
    ) -> None:
        if int(max_graphs) < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        if int(warmup) < 1:
            raise ValueError(
                f"warmup must be >= 1 (compiles must not happen in a capture), got {warmup}"
            )
        self.fn = fn
        self.max_graphs = int(max_graphs)
        self.warmup = int(warmup)
        self.clone_outputs = clone_outputs
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()

    @property
    def num_graphs(self) -> int:
        """Graphs held now."""
        return len(self._graphs)

    def __call__(self, *args: torch.Tensor) -> Any:
        if not args:
            raise ValueError("CUDAGraphPrefill needs at least one input tensor")
        sig = _signature(args)
        graph = self._graphs.get(sig)
        if graph is None:
            while len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)
            with torch.no_grad():
                graph = _Graph(self.fn, args, self.warmup)
            self._graphs[sig] = graph
        else:
            self._graphs.move_to_end(sig)
        return graph(args, self.clone_outputs)

    def reset(self) -> None:
        """Drop every graph (and the memory it holds)."""
        self._graphs.clear()
