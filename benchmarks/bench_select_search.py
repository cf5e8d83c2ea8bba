"""Threshold search of the fused select launches (GPU only): bisection vs quartering.

    python benchmarks/bench_select_search.py [lengths=[8192,32768,131072]] [grid=true]
        [out=DIR] [name=select_search_h200]

The select launches (the probe estimator's launch 2, the Prism / mean-pool select kernel) find
each row's top-p / top-k set by a search on the threshold's bit pattern: ``search="bisect"``
halves the bracket per row reduction, ``search="quad"`` quarters it (three thresholds per
reduction, :func:`prism.kernels.estimation.select._threshold_keep_quad`). Both give the same set.

1. Checks first (refuses to time on a failure): at every length the ``quad`` lists equal the
   ``bisect`` lists, exactly, for the probe estimator (default: shared, P = 2, top-p 0.95), the
   mean-pool top-k policy (k for 20 % density, ``bench_model.topk_for_density``) and Prism's
   default; at 8K the fused probe selection against its PyTorch path (<= 0.2 % of rows differ).
2. Timing (``triton.testing.do_bench`` medians; Hq = 32, Hkv = 8, D = 128, bf16, batch 1,
   Sq = Sk, ``bench_estimator.synth_qk`` inputs): the whole probe call (three times), its
   launch 1, its launch 2 with each search, launch 2 without a search (``min_prob`` rule) and
   without softmax or search (keep all), and (``grid=true``) launch 2 over rows per program x
   warps (lists equal to the same shape's bisection; <= 0.05 % of rows differing from the
   default shape's, summation order); the mean-pool top-k and Prism select launches with each search; the
   registers / spills Triton reports for every launch-2 kernel timed.

Writes ``NAME.md`` (tables), ``NAME.csv`` (one row per timing) and ``NAME_cmd.txt`` to ``out``.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import sys
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_estimator import gpu_header, synth_qk  # noqa: E402
from bench_model import capture_graph, topk_for_density  # noqa: E402

import prism  # noqa: E402
from prism.cli import parse_cli  # noqa: E402
from prism.kernels.estimation.op import Plan  # noqa: E402
from prism.kernels.estimation.pool import pool_blocks_fused  # noqa: E402
from prism.kernels.estimation.probe_kernels import launch_log_masses, launch_select  # noqa: E402
from prism.kernels.estimation.select import pick_select_config, select_from_pooled  # noqa: E402
from prism.scorers.probe import ProbeScorer, probe_layout, shares_probes  # noqa: E402
from prism.utils.tables import markdown_records  # noqa: E402

HQ, HKV, D, BS = 32, 8, 128, 128


@dataclasses.dataclass
class Options:
    lengths: list[int] = dataclasses.field(default_factory=lambda: [8192, 16384, 32768, 131072])
    grid: bool = True
    pooled: bool = True  # also the mean-pool top-k / Prism select launches
    torch_check: bool = True  # the 8K check against the PyTorch path
    out: str = "benchmarks/results"
    name: str = "select_search_h200"


def bench(fn, rep=100) -> float:
    return round(float(triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")), 4)


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def gbench(fn) -> float:
    """:func:`bench` of ``fn`` replayed from a CUDA graph (no host time: short rows are
    launch-bound otherwise)."""
    return bench(capture_graph(fn, warmup=3))


def _rows_differing(a, b) -> int:
    """(b, head, query block) rows whose lists differ."""
    d = (a[0] != b[0]) | (a[2] != b[2]) | (a[1] != b[1]).any(-1) | (a[3] != b[3]).any(-1)
    return int(d.sum())


def _stats(kernel) -> dict:
    return dict(n_regs=getattr(kernel, "n_regs", None), n_spills=getattr(kernel, "n_spills", None))


def check_torch_path() -> list[str]:
    q, k = synth_qk(1, HQ, HKV, 8192, D, 3, torch.bfloat16)
    a = ProbeScorer(impl="torch").select(q, k).mask
    f = ProbeScorer(impl="triton").select(q, k).mask
    bad = (a != f).any(-1).float().mean().item()
    line = f"check 8K probe fused vs torch path: rows differing {bad:.5f}"
    print(line, flush=True)
    return [line] if bad > 0.002 else []


def probe_rows(s: int, q, k, grid: bool) -> tuple[list[dict], list[str]]:
    fused = ProbeScorer(impl="triton")
    c = fused.config
    rows, w = probe_layout(s, BS, c.probes, c.placement, q.device)
    shared = shares_probes(c.placement, c.probes)
    first = int(shared)
    params = fused.kernel_params()
    lm = launch_log_masses(q, k, rows, BS, first_slot=first)
    out, fails = [], []

    def put(kind, ms, **kw):
        out.append(dict(length=s, estimator="probe", kind=kind, ms=ms, **kw))
        print(out[-1], flush=True)

    ref = launch_select(lm, w, s, s, HKV, params, shared=shared)
    dens = (ref[0] + ref[2]).float().sum().item() / (HQ * (s // BS) * (s // BS + 1) / 2)
    for i in range(2):
        put(f"whole call #{i + 1}", bench(lambda: fused.select(q, k).lists), density=round(dens, 4))
    put("whole call, CUDA graph", gbench(lambda: fused.select(q, k).lists))
    put("launch 1", gbench(lambda: launch_log_masses(q, k, rows, BS, first_slot=first)))
    variants = [("bisect", None, None), ("quad", None, None), ("auto", None, None)]
    if grid:
        variants += [
            (srch, rpp, nw) for srch in ("bisect", "quad") for rpp in (1, 4) for nw in (1, 2, 4)
        ]
    bisect_lists = {}
    for srch, rpp, nw in variants:
        kw = dict(shared=shared, search=srch, rows_per_program=rpp, num_warps=nw)
        got, kern = launch_select(lm, w, s, s, HKV, params, return_kernel=True, **kw)
        if srch == "bisect":
            bisect_lists[rpp, nw] = got
        elif _rows_differing(got, bisect_lists[rpp, nw]):  # same shape: exactly the same lists
            fails.append(f"probe S={s} launch 2 {kw}: lists differ from the bisection's")
        n_diff = _rows_differing(got, ref)  # another shape: summation order (<= 0.05 % rows)
        if n_diff > 5e-4 * ref[0].numel():
            fails.append(f"probe S={s} launch 2 {kw}: {n_diff} rows differ from the default's")
        ms = gbench(lambda kw=kw: launch_select(lm, w, s, s, HKV, params, **kw))
        put(f"launch 2 {srch}", ms, rows=rpp or "auto", warps=nw or "auto",
            rows_vs_default=n_diff, **_stats(kern))  # fmt: skip
    for kind, p2 in [
        ("launch 2 no search (min_prob)", dataclasses.replace(params, rule="min_prob")),
        ("launch 2 keep all", dataclasses.replace(params, threshold=1.0)),
    ] * (grid and s == 131072):
        _, kern = launch_select(lm, w, s, s, HKV, p2, shared=shared, return_kernel=True)
        ms = gbench(lambda p2=p2: launch_select(lm, w, s, s, HKV, p2, shared=shared))
        put(kind, ms, **_stats(kern))
    return out, fails


def _pool_select(q, k, plan, launch):
    return select_from_pooled(pool_blocks_fused(q, k, plan), plan, launch)


def pooled_rows(s: int, q, k) -> tuple[list[dict], list[str]]:
    nqb = s // BS
    out, fails = [], []
    for est, scorer in [
        (
            f"meanpool top-k {topk_for_density(nqb, 0.2, forced=0)}",
            prism.build_scorer(
                "meanpool", impl="triton", rule="top_k", top_k=topk_for_density(nqb, 0.2, forced=0)
            ),
        ),
        ("prism 0.95", prism.build_scorer("prism", impl="triton")),
    ]:
        plan = Plan(q, k, scorer.kernel_params(D))
        pooled = pool_blocks_fused(q, k, plan)
        base = pick_select_config(plan.g, plan.nkb, "cuda")
        ref = select_from_pooled(pooled, plan, base)
        for srch in ("bisect", "quad", "auto"):
            launch = dataclasses.replace(base, search=srch)
            got, kern = select_from_pooled(pooled, plan, launch, return_kernel=True)
            if not _same(got, ref):
                fails.append(f"{est} S={s} search {srch}: lists differ from bisect's")
                continue
            ms = gbench(functools.partial(select_from_pooled, pooled, plan, launch))
            whole = gbench(functools.partial(_pool_select, q, k, plan, launch))
            out.append(
                dict(length=s, estimator=est, kind=f"select {srch}", ms=ms, whole_ms=whole,
                     **_stats(kern))
            )  # fmt: skip
            print(out[-1], flush=True)
    return out, fails


def main(argv=None) -> None:
    opt = parse_cli(Options, argv, description=__doc__)
    out = Path(opt.out)
    out.mkdir(parents=True, exist_ok=True)
    header = gpu_header()
    print(header, flush=True)
    fails = check_torch_path() if opt.torch_check else []
    rows = []
    for s in opt.lengths:
        q, k = synth_qk(1, HQ, HKV, s, D, 0, torch.bfloat16)
        r1, f1 = probe_rows(s, q, k, opt.grid)
        r2, f2 = pooled_rows(s, q, k) if opt.pooled else ([], [])
        rows += r1 + r2
        fails += f1 + f2
        del q, k
        torch.cuda.empty_cache()
    if fails:
        print("CHECK FAILED, not reporting:\n" + "\n".join(fails), flush=True)
        sys.exit(2)
    cols = list(dict.fromkeys(c for r in rows for c in r))
    with open(out / f"{opt.name}.csv", "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=cols)
        wr.writeheader()
        wr.writerows(rows)
    text = f"{header}\n\nHq={HQ}, Hkv={HKV}, D={D}, bf16, batch 1\n\n" + markdown_records(
        rows, cols
    )
    (out / f"{opt.name}.md").write_text(text + "\n")
    (out / f"{opt.name}_cmd.txt").write_text(" ".join(sys.argv) + "\n")
    print(text)


if __name__ == "__main__":
    main()
