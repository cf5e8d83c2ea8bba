"""Where a sparse attention call's time goes on the GPU: host (Python + launches) vs device.

On the Q/K/V that the embedded SmolLM2-135M produces on real text (captured from a dense
forward, every layer), per (length, policy, backend):

* ``host_ms``: wall time to *enqueue* the 30 layers' ``scorer -> BlockMask -> backend`` calls
  (the GPU keeps running behind; no synchronisation inside the loop), split into the scorer, the
  BlockMask build and the backend call;
* ``wall_ms``: the same loop until the GPU is done (what the model pays when the host is the
  bottleneck); ``graph_ms``: the loop captured once in a CUDA graph and replayed (pure device
  time; ``capture failed`` says why when it cannot be captured);
* a cProfile of the loop (top functions by own time) in ``<out>_cprofile_<length>.txt``.

Then the whole model (``prism.compile_regions``, dense and each policy): eager pre-fill time and
the pre-fill captured in a CUDA graph (``prism.CUDAGraphPrefill``), outputs compared.

    python benchmarks/profile_host.py gguf=PATH lengths=[8192,32768] out=benchmarks/results/host
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_model as bm  # noqa: E402

import prism  # noqa: E402
from prism.kernels import get_backend  # noqa: E402


@dataclass
class Defaults:
    gguf: str = ""
    model: str = "default"
    lengths: list = field(default_factory=lambda: [8192, 32768])
    policies: list = field(default_factory=lambda: ["prism"])
    backends: list = field(default_factory=lambda: ["flex", "flex_triton", "triton"])
    reps: int = 5
    whole_model: bool = True
    graphs: bool = True
    out: str = "benchmarks/results/host_h200"


def _sync_ms(fn, reps: int) -> float:
    """Median wall ms of ``fn()`` until the GPU is idle."""
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(1e3 * (time.perf_counter() - t0))
    return sorted(ts)[len(ts) // 2]


def _host_ms(fn, reps: int) -> float:
    """Median wall ms to enqueue ``fn()`` (GPU idle at the start, not waited for at the end)."""
    fn()
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        ts.append(1e3 * (time.perf_counter() - t0))
    torch.cuda.synchronize()
    return sorted(ts)[len(ts) // 2]


def _graph_ms(fn, reps: int):
    """(``bench_model.graph_ms``, None), or (nan, why) where the loop cannot be captured."""
    try:
        return bm.graph_ms(fn, reps), None
    except Exception as exc:  # report why, keep going
        torch.cuda.synchronize()
        return float("nan"), f"{type(exc).__name__}: {exc!s:.160}"


def layer_loop(model, captured, pol: str, backend: str, length: int, cfg, say, out) -> dict:
    kw = bm.policy_kwargs(pol, length, bm.Defaults(backend=backend))
    prism.patch_model(model, **kw)
    policy = bm.hf_policy(model)
    scorers = [policy.scorer_for(i) for i in range(len(captured))]
    be = get_backend(backend)
    scale = captured[0][0].shape[-1] ** -0.5

    def full():
        for sc, (q, k, v) in zip(scorers, captured):
            be(q, k, v, sc(q, k).block_mask(), scale=scale)

    def scorer_only():
        for sc, (q, k, _) in zip(scorers, captured):
            sc(q, k)

    sels = [sc(q, k) for sc, (q, k, _) in zip(scorers, captured)]

    def mask_only():
        for s in sels:
            s._block_mask = None
            s.block_mask()

    bms = [s.block_mask() for s in sels]

    def backend_only():
        for (q, k, v), b in zip(captured, bms):
            be(q, k, v, b, scale=scale)

    row = {"length": length, "policy": pol, "backend": backend}
    row["host_ms"] = _host_ms(full, cfg.reps)
    row["host_scorer_ms"] = _host_ms(scorer_only, cfg.reps)
    row["host_mask_ms"] = _host_ms(mask_only, cfg.reps)
    row["host_backend_ms"] = _host_ms(backend_only, cfg.reps)
    row["wall_ms"] = _sync_ms(full, cfg.reps)
    row["wall_backend_ms"] = _sync_ms(backend_only, cfg.reps)
    if cfg.graphs:
        row["graph_ms"], why = _graph_ms(full, cfg.reps)
        if why:
            row["graph_error"] = why
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(3):
        full()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
    with open(f"{out}_cprofile_{length}.txt", "a") as fh:
        fh.write(f"\n######## {pol} / {backend} at {length}: 3 loops of {len(captured)} layers\n")
        fh.write(buf.getvalue())
    prism.unpatch_model(model)
    say(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
    return row


def whole_model(model, ids, pol: str, backend: str, cfg, say) -> dict:
    length = ids.shape[1]
    kw = bm.policy_kwargs(pol, length, bm.Defaults(backend=backend))
    if kw is not None:
        prism.patch_model(model, **kw)
    row = {"length": length, "policy": pol, "backend": backend if kw else "sdpa"}
    try:
        row["prefill_ms"] = bm.cuda_time(lambda: bm.prefill(model, ids), cfg.reps, 2)
        if cfg.graphs:
            runner = prism.CUDAGraphPrefill(lambda x: bm.prefill(model, x)[0])
            ref = bm.prefill(model, ids)[0]
            got = runner(ids)
            row["graph_err"] = float((got.float() - ref.float()).abs().max())
            row["graph_ms"] = bm.cuda_time(lambda: runner(ids), cfg.reps, 2)
            del runner
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc!s:.200}"
    if kw is not None:
        prism.unpatch_model(model)
    say(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
    return row


@torch.no_grad()
def main(argv=None) -> None:
    from prism.cli import parse_cli

    cfg = parse_cli(Defaults, argv, description=__doc__)
    out = cfg.out
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    log = open(f"{out}.log", "a")

    def say(msg):
        print(msg, flush=True)
        log.write(msg + "\n")
        log.flush()

    say(f"# profile_host {time.strftime('%Y-%m-%d %H:%M:%S')} {cfg}")
    say(f"torch {torch.__version__}, FA4 {prism.kernels.flex.flash_available()}")
    bcfg = bm.Defaults(model=cfg.model, gguf=cfg.gguf)
    bm.register_helpers()
    model, tok = bm.load(bcfg, max(cfg.lengths))
    prism.compile_regions(model)
    ids_all = bm.token_ids(tok, max(cfg.lengths), model.config.vocab_size).cuda()
    for length in cfg.lengths:
        bm.set_rope(model, length)
        ids = ids_all[None, :length]
        bm._CAPTURED.clear()
        with bm.attn_impl(model, "bench_capture"):
            bm.prefill(model, ids)
        captured = list(bm._CAPTURED)
        bm._CAPTURED.clear()
        for pol in cfg.policies:
            for backend in cfg.backends:
                try:
                    layer_loop(model, captured, pol, backend, length, cfg, say, out)
                except Exception as exc:
                    prism.unpatch_model(model)
                    say(
                        f"layer loop {pol}/{backend} at {length}: {type(exc).__name__}: {exc!s:.200}"
                    )
        del captured
        if cfg.whole_model:
            whole_model(model, ids, "dense", "sdpa", cfg, say)
            for pol in cfg.policies:
                for backend in cfg.backends:
                    whole_model(model, ids, pol, backend, cfg, say)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
