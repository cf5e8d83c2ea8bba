"""Estimator cost of every registered scorer, beside dense attention (DESIGN.md §7-§8, issue 3).

    python benchmarks/bench_estimators.py out=benchmarks/results [tag=estimators_h200]
        [lengths=[8192,16384,32768,65536,131072]] [scorers=[prism,meanpool,xattn]]
        [scorers=[meanpool,meanpool:impl=torch,meanpool:rule=top_k+top_k=205]]  # with knobs
    python benchmarks/bench_estimators.py smoke=true out=/tmp/x     # CPU, tiny sizes, seconds

(omegaconf ``key=value`` overrides through :func:`prism.cli.parse_cli`; the older
``--lengths 8192 16384`` / ``--smoke`` spellings still work; ``-h`` lists the keys.)

Shape (GPU): Hq=32, Hkv=8, D=128, bf16, batch 1, causal; RoPE'd text-like inputs made on the
device (:func:`prism.synthetic.synthetic_qkv`, topic segments of 512 tokens). For each length and each scorer built with its defaults (scorers that need arguments,
e.g. ``union``, are skipped and listed):

* estimation time: ``scorer(q, k)`` (scoring + selection, up to the BlockSelection), the median of
  ``triton.testing.do_bench``; with ``graph=true`` also the call captured once in a CUDA graph
  and replayed (device time without the host's launch overhead, which dominates sub-0.3 ms
  calls; scorers that cannot be captured get a note);
* extra peak memory: ``torch.cuda.max_memory_allocated()`` during one call minus the memory
  allocated before it (inputs excluded, the returned selection included);
* density of the selection (selected / causal blocks), for context only (synthetic inputs);
* dense causal attention with the SDPA cuDNN backend (``is_causal=True``, GQA via
  ``enable_gqa``; repeated K/V if this build refuses it, timed without the repeat).

Prints markdown tables and writes ``<tag>.csv``, ``<tag>.md`` and ``<tag>_cmd.txt`` under ``--out``.
Imports torch and prism (with omegaconf, a core dependency, for the options); triton only for
``do_bench`` on CUDA.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))  # bench_model's graph capture, for graph=true

import prism  # noqa: E402
from prism.cli import parse_cli  # noqa: E402
from prism.synthetic import synthetic_qkv  # noqa: E402
from prism.utils.tables import fmt_cell, markdown_table  # noqa: E402

GPU_SHAPE = {"hq": 32, "hkv": 8, "d": 128, "dtype": torch.bfloat16}
SMOKE_SHAPE = {"hq": 4, "hkv": 2, "d": 64, "dtype": torch.float32}
GPU_LENGTHS = [8192, 16384, 32768, 65536, 131072]
SMOKE_LENGTHS = [256, 640]
DENSE_ROW = "sdpa_dense"  # CSV name of the dense attention row (not a scorer)


# -- inputs ---------------------------------------------------------------------------------------
def make_inputs(length, hq, hkv, d, dtype, device, seed=0, segment=512):
    """Text-like q [1, Hq, S, D], k, v [1, Hkv, S, D] after RoPE (:func:`prism.synthetic.synthetic_qkv`:
    segments share a topic direction, each query looks at its own segment's topic or at a random
    earlier one), made on ``device`` in float32 and then cast to ``dtype``."""
    return synthetic_qkv(
        batch=1, q_heads=hq, kv_heads=hkv, length=length, head_dim=d, segment=segment,
        seed=seed, dtype=dtype, device=device,
    )  # fmt: skip


# -- timing ---------------------------------------------------------------------------------------
def time_ms(fn, device, rep_ms):
    """Median milliseconds of fn(): triton.testing.do_bench on CUDA, a perf_counter loop on CPU."""
    if device.type == "cuda":
        import triton

        fn()
        torch.cuda.synchronize()
        return float(
            triton.testing.do_bench(
                fn, warmup=max(25, rep_ms // 4), rep=rep_ms, return_mode="median"
            )
        )
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_time_ms(fn, rep_ms):
    """Median ms of ``fn()`` replayed from a CUDA graph (``bench_model.capture_graph``), or NaN
    where the call cannot be captured (a host sync inside it)."""
    from bench_model import capture_graph

    try:
        replay = capture_graph(fn)
    except RuntimeError as e:
        print(f"[bench] not capturable: {str(e).splitlines()[0][:80]}")
        return math.nan
    return time_ms(replay, torch.device("cuda"), rep_ms)


def extra_peak_mb(fn, device):
    """MB allocated at the peak of one fn() call beyond what was allocated before (CUDA only)."""
    if device.type != "cuda":
        return math.nan, fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20, out


def dense_fn(q, k, v, device):
    """Dense causal attention: SDPA cuDNN on CUDA (GQA natively if this build allows it), the
    default SDPA on CPU. Returns (callable, label)."""
    import torch.nn.functional as F

    if device.type != "cuda":
        g = q.shape[1] // k.shape[1]
        kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        return (lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True)), "SDPA (cpu)"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def cudnn(qq, kk, vv, **kw):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, **kw)

    try:
        cudnn(q, k, v, enable_gqa=True)
        torch.cuda.synchronize()
        return (lambda: cudnn(q, k, v, enable_gqa=True)), "dense SDPA cuDNN (enable_gqa)"
    except RuntimeError as e:
        print(f"[bench] cuDNN SDPA refused enable_gqa ({str(e).splitlines()[0]}); repeating K/V")
    g = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return (lambda: cudnn(q, kr, vr)), "dense SDPA cuDNN (repeated K/V)"


# -- main -----------------------------------------------------------------------------------------
def parse_spec(spec: str) -> tuple[str, dict]:
    """``scorer`` or ``scorer:key=val+key=val`` (values JSON where they parse, else strings; ``+``
    separates the knobs, since a comma separates list items on the command line)."""
    name, _, rest = spec.partition(":")
    params = {}
    for item in filter(None, rest.split("+")):
        key, val = item.split("=", 1)
        try:
            params[key] = json.loads(val)
        except ValueError:
            params[key] = val
    return name, params


def build_scorers(specs):
    built, skipped = {}, {}
    for spec in specs:
        name, params = parse_spec(spec)
        try:
            built[spec] = prism.build_scorer(name, **params)
        except (TypeError, ValueError) as e:
            skipped[spec] = str(e).splitlines()[0]
    return built, skipped


def fmt(x, digits=2):
    return fmt_cell(float(x) if isinstance(x, int) else x, digits)


def label(n):
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def markdown(rows, lengths, names, dense_label, header):
    lines = [header, ""]
    cols = ["scorer", *(label(n) for n in lengths)]
    by = {(r["name"], r["length"]): r for r in rows}
    for title, key, digits in (
        ("Estimation time (ms, median)", "time_ms", 2),
        ("Estimation time, CUDA graph replay (ms, median)", "graph_ms", 3),
        ("Extra peak memory (MB)", "extra_mb", 0),
        ("Density (selected / causal blocks; synthetic inputs)", "density", 3),
    ):
        table = []
        if key == "graph_ms" and not any(r.get("graph_ms") is not None for r in rows):
            continue
        for name in ([DENSE_ROW] if key == "time_ms" else []) + names:
            cells = []
            for n in lengths:
                r = by.get((name, n))
                cells.append(r["note"] if r and r["note"] else fmt(r[key] if r else None, digits))
            table.append([dense_label if name == DENSE_ROW else name, *cells])
        lines += [f"### {title}", "", markdown_table(cols, table), ""]
    table = []
    for name in names:
        cells = []
        for n in lengths:
            r, dense = by.get((name, n)), by.get((DENSE_ROW, n))
            ok = r and dense and dense["time_ms"] > 0
            cells.append(fmt(100 * r["time_ms"] / dense["time_ms"], 1) if ok else "–")
        table.append([name, *cells])
    lines += ["### Estimation time / dense attention time (%)", "", markdown_table(cols, table), ""]
    return "\n".join(lines)


@dataclasses.dataclass
class Args:
    out: str = str(REPO / "benchmarks" / "results")
    tag: str | None = dataclasses.field(
        default=None, metadata={"help": "file name stem (default estimators_<device>)"}
    )
    lengths: list[int] | None = None
    scorers: list[str] | None = dataclasses.field(
        default=None,
        metadata={"help": "default: every registered one; scorer:key=val+key=val sets knobs"},
    )
    rep_ms: int = dataclasses.field(default=200, metadata={"help": "do_bench time per case"})
    smoke: bool = dataclasses.field(
        default=False, metadata={"help": "CPU, tiny shapes: checks the script"}
    )
    graph: bool = dataclasses.field(
        default=False, metadata={"help": "CUDA: also time each call replayed from a CUDA graph"}
    )


def main(argv=None):
    args = parse_cli(Args, argv, description=__doc__, prog="benchmarks/bench_estimators.py")

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        print("[bench] no CUDA device: CPU timings are not the product (use --smoke to check)")
    shape = SMOKE_SHAPE if args.smoke else GPU_SHAPE
    lengths = args.lengths or (SMOKE_LENGTHS if args.smoke else GPU_LENGTHS)
    names = args.scorers or prism.available_scorers()
    unknown = sorted({parse_spec(n)[0] for n in names} - set(prism.available_scorers()))
    if unknown:
        sys.exit(f"error: unknown scorers {unknown}; valid: {prism.available_scorers()}")
    scorers, skipped = build_scorers(names)
    names = list(scorers)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    tag = args.tag or ("estimators_smoke" if args.smoke else f"estimators_{device.type}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows, dense_label = [], "dense"
    for length in lengths:
        q, k, v = make_inputs(
            length, shape["hq"], shape["hkv"], shape["d"], shape["dtype"], device, seed=length
        )
        fn, dense_label = dense_fn(q, k, v, device)
        try:
            t = time_ms(fn, device, args.rep_ms)
            note = ""
        except RuntimeError as e:  # e.g. no cuDNN kernel for this shape
            t, note = math.nan, f"error: {str(e).splitlines()[0][:40]}"
        rows.append(dict(length=length, name=DENSE_ROW, time_ms=t, extra_mb=math.nan,
                         density=1.0, note=note))  # fmt: skip
        print(f"[{label(length)}] {dense_label}: {fmt(t)} ms", flush=True)
        for name, scorer in scorers.items():
            row = dict(length=length, name=name, time_ms=math.nan, extra_mb=math.nan,
                       density=math.nan, note="", graph_ms=None)  # fmt: skip
            try:
                call = functools.partial(scorer, q, k)
                row["extra_mb"], sel = extra_peak_mb(call, device)
                row["density"] = sel.density
                del sel
                row["time_ms"] = time_ms(call, device, args.rep_ms)
                if args.graph and device.type == "cuda":
                    row["graph_ms"] = graph_time_ms(call, args.rep_ms)
                del call
            except torch.cuda.OutOfMemoryError:
                row["note"] = "OOM"
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            graphed = "" if row["graph_ms"] is None else f" (graph {fmt(row['graph_ms'], 3)} ms)"
            print(
                f"[{label(length)}] {name}: {fmt(row['time_ms'])} ms{graphed}, "
                f"{fmt(row['extra_mb'], 0)} MB, density {fmt(row['density'], 3)} {row['note']}",
                flush=True,
            )
        del q, k, v, fn

    header = (
        f"## Estimator cost — {dev_name}, torch {torch.__version__}, "
        f"Hq={shape['hq']}, Hkv={shape['hkv']}, D={shape['d']}, "
        f"{str(shape['dtype']).replace('torch.', '')}, batch 1, causal"
    )
    if skipped:
        header += "\n\nSkipped (need arguments): " + "; ".join(
            f"`{n}` ({why})" for n, why in skipped.items()
        )
    md = markdown(rows, lengths, names, dense_label, header)
    print("\n" + md)
    with open(out / f"{tag}.csv", "w", newline="") as f:
        w = csv.DictWriter(
            f, fieldnames=["length", "name", "time_ms", "graph_ms", "extra_mb", "density", "note"]
        )
        w.writeheader()
        w.writerows(rows)
    (out / f"{tag}.md").write_text(md + "\n")
    cmd = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    (out / f"{tag}_cmd.txt").write_text(cmd + "\n")
    print(f"\nwrote {out / (tag + '.csv')}, {tag}.md, {tag}_cmd.txt")
    return rows


if __name__ == "__main__":
    main()
