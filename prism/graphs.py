"""CUDA-graph pre-fill: capture a whole (sparse) forward once per input shape, then replay it.

Prism's sparse path never synchronises with the host (the estimator writes the BlockMask lists
on the GPU, the kernels read them there), so a patched model's pre-fill can be captured in one
CUDA graph. A replay launches every kernel of the forward at once: the per-layer host work
(Python, the compiled FlexAttention call's guards, the estimator's launches) is paid once at
capture instead of on every call, which is what limits a small model's speed-up at 8K-32K
tokens (``benchmarks/results/README.md``).

    run = prism.CUDAGraphPrefill(
        lambda ids: model.model(input_ids=ids, use_cache=False).last_hidden_state
    )
    h = run(ids)          # first call for this shape: warm-up + capture, then replay
    h = run(other_ids)    # same shape: replay only

What a graph can and cannot do (also in the README):

* one graph per distinct (shape, dtype, device) of the inputs, at most ``max_graphs`` kept
  (least recently used dropped); each holds the memory its forward needs (its private pool);
* the function must be free of host synchronisation and of Python decisions that read tensor
  data; inputs are copied into static buffers, outputs are the graph's static tensors (cloned
  unless ``clone_outputs=False``);
* inputs are one causal sequence per row: transformers' packed-sequence guess (it reads
  ``position_ids`` on the host) answers "not packed" while capturing; no cache. Masks that
  exist are still built and run without host reads (padding masks and sliding windows take the
  span-sparse path the compiled model takes; statistics are not collected under capture).
  Unpadded ``input_ids`` without ``attention_mask`` run the plain causal path (fastest);
* routing follows the default ``min_len`` inside a graph, ``prism.policy.CUDA_GRAPH_MIN_LEN``
  (the eager default is longer), so with the default a 4K-32K replay runs sparse where the eager
  forward runs dense; pass ``min_len`` to the policy to make both route alike.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["CUDAGraphPrefill", "capturing_plain_prefill", "stream_capturing"]

_STATE = threading.local()  # per thread: inside capturing_plain_prefill()
_GUESS_PATCHED = [False]


def plain_prefill_assumed() -> bool:
    """True inside :func:`capturing_plain_prefill` in this thread."""
    return getattr(_STATE, "active", False)


def stream_capturing() -> bool:
    """True while the current CUDA stream is being captured into a graph (no host reads then)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _neutralise_packed_guess() -> None:
    """Make transformers' packed-sequence guess (``find_packed_sequence_indices``, which reads
    ``position_ids`` on the host, or under capture returns a tensor that turns every mask into an
    explicit one) answer "one sequence per row" inside :func:`capturing_plain_prefill` only.
    Installed once; outside the context (and in other threads) the original runs."""
    if _GUESS_PATCHED[0]:
        return
    _GUESS_PATCHED[0] = True
    try:
        import transformers.masking_utils as mu
    except Exception:  # transformers is optional
        return
    original = getattr(mu, "find_packed_sequence_indices", None)
    if original is None:
        return

    def find_packed_sequence_indices(position_ids):
        return None if plain_prefill_assumed() else original(position_ids)

    find_packed_sequence_indices.__wrapped__ = original
    mu.find_packed_sequence_indices = find_packed_sequence_indices


@contextlib.contextmanager
def capturing_plain_prefill():
    """While active (this thread): transformers' packed-sequence guess answers "one unpadded
    sequence per row" (the contract of :class:`CUDAGraphPrefill`: its rows are plain causal
    sequences), and the default CUDA ``min_len`` is ``prism.policy.CUDA_GRAPH_MIN_LEN``. Every
    other mask (padding, sliding windows, custom mask functions) is still built."""
    _neutralise_packed_guess()
    before = plain_prefill_assumed()
    _STATE.active = True
    try:
        yield
    finally:
        _STATE.active = before


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
    items = [_map(o, fn) for o in out]
    return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)  # namedtuples


class _Graph:
    def __init__(self, fn: Callable, args: tuple, warmup: int) -> None:
        dev = args[0].device
        self.inputs = [a.clone() for a in args]
        with torch.cuda.device(dev):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with capturing_plain_prefill(), torch.cuda.stream(stream):
                for _ in range(warmup):  # compiles, caches, lazy inits: outside the graph
                    fn(*self.inputs)
            torch.cuda.current_stream().wait_stream(stream)
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
