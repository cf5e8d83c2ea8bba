"""Estimator cost of every registered scorer, beside dense attention (DESIGN.md §7-§8, issue 3).

    python benchmarks/bench_estimators.py --out benchmarks/results [--tag estimators_h200]
        [--lengths 8192 16384 32768 65536 131072] [--scorers prism meanpool xattn ...]
    python benchmarks/bench_estimators.py --smoke --out /tmp/x     # CPU, tiny sizes, seconds

Shape (GPU): Hq=32, Hkv=8, D=128, bf16, batch 1, causal; RoPE'd text-like inputs made on the
device. For each length and each scorer built with its defaults (scorers that need arguments,
e.g. ``union``, are skipped and listed):

* estimation time: ``scorer(q, k)`` (scoring + selection, up to the BlockSelection), the median of
  ``triton.testing.do_bench``;
* extra peak memory: ``torch.cuda.max_memory_allocated()`` during one call minus the memory
  allocated before it (inputs excluded, the returned selection included);
* density of the selection (selected / causal blocks), for context only (synthetic inputs);
* dense causal attention with the SDPA cuDNN backend (``is_causal=True``, GQA via
  ``enable_gqa``; repeated K/V if this build refuses it, timed without the repeat).

Prints markdown tables and writes ``<tag>.csv``, ``<tag>.md`` and ``<tag>_cmd.txt`` under ``--out``.
Imports only torch and prism (omegaconf is not needed); triton only for ``do_bench`` on CUDA.
"""

from __future__ import annotations

import argparse
import csv
import functools
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

import prism  # noqa: E402

GPU_SHAPE = {"hq": 32, "hkv": 8, "d": 128, "dtype": torch.bfloat16}
SMOKE_SHAPE = {"hq": 4, "hkv": 2, "d": 64, "dtype": torch.float32}
GPU_LENGTHS = [8192, 16384, 32768, 65536, 131072]
SMOKE_LENGTHS = [256, 640]
DENSE_ROW = "sdpa_dense"  # CSV name of the dense attention row (not a scorer)


# -- inputs ---------------------------------------------------------------------------------------
def rope_(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate-half RoPE on [B, H, S, D] (positions 0..S-1), computed on x's device in float32."""
    s, d = x.shape[2], x.shape[3]
    half = d // 2
    theta = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) * 2 / d)
    ang = torch.arange(s, device=x.device, dtype=torch.float32)[:, None] * theta[None, :]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., :half].clone(), x[..., half:].clone()
    x[..., :half] = x1 * cos - x2 * sin
    x[..., half:] = x2 * cos + x1 * sin
    return x


def make_inputs(length, hq, hkv, d, dtype, device, seed=0, segment=512):
    """Text-like q [1, Hq, S, D], k, v [1, Hkv, S, D]: segments share a topic direction, each query
    looks at its own segment's topic or at a random earlier one; RoPE applied; then cast."""
    g = torch.Generator(device=device).manual_seed(seed)
    n_seg = -(-length // segment)
    seg = torch.arange(length, device=device) // segment
    topics = torch.randn(hkv, n_seg, d, generator=g, device=device)
    k = 2.0 * topics[:, seg] + torch.randn(hkv, length, d, generator=g, device=device)
    rep = hq // hkv
    far = (torch.rand(hq, length, generator=g, device=device) * (seg + 1)).long()
    own = torch.rand(hq, length, generator=g, device=device) < 0.5
    which = torch.where(own, seg.expand(hq, length), far)
    kv_of = torch.arange(hq, device=device) // rep
    q = 2.0 * topics[kv_of[:, None], which] + torch.randn(hq, length, d, generator=g, device=device)
    v = torch.randn(hkv, length, d, generator=g, device=device)
    q, k = rope_(q[None]), rope_(k[None])
    return q.to(dtype), k.to(dtype), v[None].to(dtype)


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
def build_scorers(names):
    built, skipped = {}, {}
    for name in names:
        try:
            built[name] = prism.build_scorer(name)
        except (TypeError, ValueError) as e:
            skipped[name] = str(e).splitlines()[0]
    return built, skipped


def fmt(x, digits=2):
    if isinstance(x, str):
        return x
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def label(n):
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def markdown(rows, lengths, names, dense_label, header):
    lines = [header, ""]
    cols = " | ".join(label(n) for n in lengths)
    sep = "|".join(["---"] * (len(lengths) + 1))
    by = {(r["name"], r["length"]): r for r in rows}
    for title, key, digits in (
        ("Estimation time (ms, median)", "time_ms", 2),
        ("Extra peak memory (MB)", "extra_mb", 0),
        ("Density (selected / causal blocks; synthetic inputs)", "density", 3),
    ):
        lines += [f"### {title}", "", f"| scorer | {cols} |", f"|{sep}|"]
        shown = ([DENSE_ROW] if key == "time_ms" else []) + names
        for name in shown:
            cells = []
            for n in lengths:
                r = by.get((name, n))
                cells.append(r["note"] if r and r["note"] else fmt(r[key] if r else None, digits))
            shown_name = dense_label if name == DENSE_ROW else name
            lines.append(f"| {shown_name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "### Estimation time / dense attention time (%)",
        "",
        f"| scorer | {cols} |",
        f"|{sep}|",
    ]
    for name in names:
        cells = []
        for n in lengths:
            r, dense = by.get((name, n)), by.get((DENSE_ROW, n))
            ok = r and dense and dense["time_ms"] > 0
            cells.append(fmt(100 * r["time_ms"] / dense["time_ms"], 1) if ok else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--tag", default=None, help="file name stem (default estimators_<device>)")
    ap.add_argument("--lengths", type=int, nargs="+", default=None)
    ap.add_argument("--scorers", nargs="+", default=None, help="default: every registered one")
    ap.add_argument("--rep-ms", type=int, default=200, help="do_bench measuring time per case")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks the script")
    args = ap.parse_args(argv)

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        print("[bench] no CUDA device: CPU timings are not the product (use --smoke to check)")
    shape = SMOKE_SHAPE if args.smoke else GPU_SHAPE
    lengths = args.lengths or (SMOKE_LENGTHS if args.smoke else GPU_LENGTHS)
    names = args.scorers or prism.available_scorers()
    unknown = sorted(set(names) - set(prism.available_scorers()))
    if unknown:
        ap.error(f"unknown scorers {unknown}; valid: {prism.available_scorers()}")
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
                       density=math.nan, note="")  # fmt: skip
            try:
                call = functools.partial(scorer, q, k)
                row["extra_mb"], sel = extra_peak_mb(call, device)
                row["density"] = sel.density
                del sel
                row["time_ms"] = time_ms(call, device, args.rep_ms)
                del call
            except torch.cuda.OutOfMemoryError:
                row["note"] = "OOM"
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            print(
                f"[{label(length)}] {name}: {fmt(row['time_ms'])} ms, "
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
            f, fieldnames=["length", "name", "time_ms", "extra_mb", "density", "note"]
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
