"""Probe estimator benchmark (issue 11): PyTorch path vs the fused Triton kernels (GPU only).

    python benchmarks/bench_probe_estimator.py [lengths=[8192,...]] [probes=2] [threshold=0.95]
        [sweep=true] [torch_max=32768] [out=DIR]

1. Checks first (refuses to time on a failure): the fused selection (``ProbeScorer(impl=
   "triton")``) against the PyTorch path (``impl="torch"``) on bf16 / fp32 inputs at 4K-8K, GQA
   and a cached prefix — the share of (b, head, query block) rows whose selection differs must be
   <= 0.2 % — and launch 1's block masses against the PyTorch probe softmax.
2. Sweep (``sweep=true``): launch-1 tile rows (``block_m``) x ``num_warps`` at the smallest and
   largest length.
3. Timing at each length (Hq=32, Hkv=8, D=128, bf16, batch 1, Sq = Sk, the topic-structured
   RoPE'd inputs of ``bench_estimator.synth_qk``): ``triton.testing.do_bench`` medians of the
   PyTorch probe path (up to ``torch_max`` tokens), the fused probe estimator (lists) and its two
   launches, the fused Prism estimator, and dense causal cuDNN SDPA on the same q/k/v (the
   attention the estimate is meant to cut); the selected density; extra peak memory of one call.

Prints a markdown table last; writes ``probe_estimator_h200.{md,csv}`` and the command to ``out``.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_estimator import gpu_header, peak_extra_mb, synth_qk  # noqa: E402

from prism.cli import parse_cli  # noqa: E402
from prism.kernels.estimation.probe_kernels import launch_log_masses, launch_select  # noqa: E402
from prism.kernels.estimation.probe_op import probe_block_probs_fused  # noqa: E402
from prism.scorers.prism import PrismScorer  # noqa: E402
from prism.scorers.probe import (  # noqa: E402
    ProbeScorer,
    probe_block_probs,
    probe_layout,
    shares_probes,
)
from prism.utils.tables import markdown_records  # noqa: E402

HQ, HKV, D = 32, 8, 128


@dataclasses.dataclass
class Options:
    lengths: list[int] = dataclasses.field(
        default_factory=lambda: [8192, 16384, 32768, 65536, 131072]
    )
    probes: int = 2
    placement: str = "ends"
    threshold: float = 0.95
    sweep: bool = True
    torch_max: int = 32768
    out: str = "benchmarks/results"
    name: str = "probe_estimator_h200"  # output files: NAME.{md,csv}, NAME_cmd.txt


def bench(fn, rep=100) -> float:
    return float(triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median"))


def check(opt: Options) -> list[str]:
    """Fused vs PyTorch path; returns the failures (empty: all good)."""
    fails = []
    cases = [  # (B, Hq, Hkv, Sq, Sk, dtype)
        (1, HQ, HKV, 8192, 8192, torch.bfloat16),
        (2, 9, 3, 4097, 4097, torch.bfloat16),
        (1, 8, 2, 3000, 8192, torch.bfloat16),
        (1, 8, 2, 4096, 4096, torch.float32),
    ]
    for b, hq, hkv, sq, sk, dt in cases:
        q, k = synth_qk(b, hq, hkv, sk, D, 3, dt)
        q = q[:, :, sk - sq :].contiguous()
        cfg = dict(probes=opt.probes, placement=opt.placement, threshold=opt.threshold)
        a = ProbeScorer(impl="torch", **cfg).select(q, k).mask
        f = ProbeScorer(impl="triton", **cfg).select(q, k).mask
        bad = (a != f).any(-1).float().mean().item()
        rows, w = probe_layout(sq, 128, opt.probes, opt.placement, q.device)
        shared = shares_probes(opt.placement, opt.probes)
        fused_probs = probe_block_probs_fused(q, k, rows, w, 128, shared=shared)
        err = (fused_probs - probe_block_probs(q, k, 128, opt.probes, opt.placement)).abs().max()
        err = err.item()
        line = (
            f"check B={b} Hq={hq} Hkv={hkv} Sq={sq} Sk={sk} {dt}: rows differing {bad:.5f}, "
            f"max |prob diff| {err:.2e}, density {f.float().mean().item():.3f}"
        )
        print(line, flush=True)
        if bad > 0.002 or err > 5e-3:
            fails.append(line)
    return fails


# launch-1 configurations: (schedule, block_m, num_warps, num_stages, kv_chunk)
LAUNCH1_CONFIGS = (
    [("q", 64, 4, 3, 0), ("q", 128, 8, 2, 0)]
    + [
        ("k", bm, nw, ns, kb)
        for bm, nw, ns, kb in itertools.product((64, 128), (4, 8), (2, 3), (1, 2))
    ]
    + [("k", 64, 4, 1, 2), ("k", 64, 4, 4, 2), ("k", 64, 4, 4, 1)]
    + [("k", 32, 4, 3, 2), ("k", 32, 2, 3, 2), ("k", 32, 2, 3, 1), ("k", 32, 2, 2, 2)]
)


def sweep(opt: Options) -> list[dict]:
    """Launch 1 over LAUNCH1_CONFIGS at every length; launch 2 over rows per program x warps at
    the largest. Each K-stationary configuration is checked against the query schedule first."""
    rows_out = []
    for s in sorted(set(opt.lengths)):
        q, k = synth_qk(1, HQ, HKV, s, D, 0, torch.bfloat16)
        rows, w = probe_layout(s, 128, opt.probes, opt.placement, q.device)
        shared = shares_probes(opt.placement, opt.probes)
        if shared:  # launch 1 computes the own probes only (slots 1..P-1)
            rows = rows[:, 1:].contiguous()
        want = launch_log_masses(q, k, rows, 128, schedule="q")
        nb = want.shape[2]  # Sq = Sk: query block i sees KV blocks 0..i (launch 2 reads these)
        vis = torch.ones(nb, nb, dtype=torch.bool, device=q.device).tril()
        vis = vis[None, None, :, None, :].expand_as(want)
        fin = vis & torch.isfinite(want)
        for sched, bm, nw, ns, kb in LAUNCH1_CONFIGS:
            kw = dict(block_m=bm, num_warps=nw, num_stages=ns, schedule=sched, kv_chunk=kb or 2)
            name = f"sweep S={s} schedule={sched} block_m={bm} warps={nw} stages={ns} chunk={kb}"
            try:
                got = launch_log_masses(q, k, rows, 128, **kw)
                same = bool(torch.equal(vis & torch.isfinite(got), fin)) and (
                    (got[fin] - want[fin]).abs().max().item() <= 1e-3
                )
                t = bench(functools.partial(launch_log_masses, q, k, rows, 128, **kw))
            except Exception as e:  # out of resources etc.: report, go on
                print(f"{name}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            print(f"{name}: launch1 {t:.3f} ms, agrees {same}", flush=True)
            rows_out.append(
                dict(length=s, kernel="launch1", schedule=sched, block_m=bm, num_warps=nw,
                     num_stages=ns, kv_chunk=kb, agrees=same, ms=round(t, 4))
            )  # fmt: skip
        if s == max(opt.lengths):
            params = ProbeScorer(probes=opt.probes, threshold=opt.threshold).kernel_params()
            ref = launch_select(want, w, s, s, HKV, params, shared=shared)
            for rpp, nw in itertools.product((4, 8, 16, 32), (None, 4, 8, 16)):
                try:
                    got = launch_select(
                        want, w, s, s, HKV, params, rows_per_program=rpp, num_warps=nw,
                        shared=shared,
                    )  # fmt: skip
                except Exception as e:  # out of shared memory for the widest tiles
                    print(f"sweep S={s} launch2 rows={rpp} warps={nw}: {type(e).__name__}")
                    continue
                same = all(torch.equal(a, b) for a, b in zip(got, ref))
                t = bench(
                    functools.partial(
                        launch_select, want, w, s, s, HKV, params, rows_per_program=rpp,
                        num_warps=nw, shared=shared,
                    )
                )  # fmt: skip
                print(f"sweep S={s} launch2 rows={rpp} warps={nw}: {t:.3f} ms, same {same}")
                rows_out.append(
                    dict(length=s, kernel="launch2", rows_per_program=rpp, num_warps=nw or 0,
                         agrees=same, ms=round(t, 4))
                )  # fmt: skip
        del q, k, want, vis, fin
        torch.cuda.empty_cache()
    return rows_out


def time_one(opt: Options, s: int) -> dict:
    q, k = synth_qk(1, HQ, HKV, s, D, 0, torch.bfloat16)
    v = torch.randn_like(k)
    cfg = dict(probes=opt.probes, placement=opt.placement, threshold=opt.threshold)
    fused = ProbeScorer(impl="triton", **cfg)
    rows, w = probe_layout(s, 128, opt.probes, opt.placement, q.device)
    shared = shares_probes(opt.placement, opt.probes)
    first = int(shared)  # shared: launch 1 computes the own probes only (slots 1..P-1)
    params = fused.kernel_params()
    sel = fused.select(q, k)
    row = dict(length=s, placement=opt.placement, launch1_probes=rows.shape[1] - first)
    row["density"] = round(sel.mask.float().mean().item(), 4)
    row["probe_fused_ms"] = bench(lambda: fused.select(q, k).lists)
    lm = launch_log_masses(q, k, rows, 128, first_slot=first)
    row["launch1_ms"] = bench(lambda: launch_log_masses(q, k, rows, 128, first_slot=first))
    row["launch1_fixed_ms"] = bench(
        lambda: launch_log_masses(q, k, rows, 128, first_slot=first, reference="fixed")
    )
    row["launch1_qsched_ms"] = bench(
        lambda: launch_log_masses(q, k, rows, 128, schedule="q", first_slot=first)
    )
    row["launch2_ms"] = bench(lambda: launch_select(lm, w, s, s, HKV, params, shared=shared))
    row["probe_fused_peak_mb"] = round(peak_extra_mb(lambda: fused.select(q, k).lists)[0], 1)
    if s <= opt.torch_max:
        ref = ProbeScorer(impl="torch", **cfg)
        row["probe_torch_ms"] = bench(lambda: ref.select(q, k).mask, rep=300)
    prism = PrismScorer(threshold=opt.threshold)
    row["prism_fused_ms"] = bench(lambda: prism.select(q, k).lists)
    qd, kd, vd = q, k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        row["dense_cudnn_ms"] = bench(
            lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
        )
    row["probe_over_dense"] = round(row["probe_fused_ms"] / row["dense_cudnn_ms"], 4)
    for key in list(row):
        if key.endswith("_ms"):
            row[key] = round(row[key], 4)
    print(row, flush=True)
    return row


def main(argv=None) -> None:
    opt = parse_cli(Options, argv, description=__doc__)
    out = Path(opt.out)
    out.mkdir(parents=True, exist_ok=True)
    header = gpu_header()
    print(header, flush=True)
    fails = check(opt)
    if fails:
        print("CHECK FAILED, not timing:\n" + "\n".join(fails), flush=True)
        sys.exit(2)
    sweep_rows = sweep(opt) if opt.sweep else []
    rows = []
    for s in opt.lengths:
        rows.append(time_one(opt, s))
        torch.cuda.empty_cache()
    cols = list(dict.fromkeys(c for r in rows for c in r))
    with open(out / f"{opt.name}.csv", "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=cols)
        wr.writeheader()
        wr.writerows(rows)
    md = markdown_records(rows, cols)
    text = (
        f"{header}\n\nHq={HQ}, Hkv={HKV}, D={D}, bf16, batch 1, P={opt.probes}, placement "
        f"{opt.placement}\n\n{md}\n"
    )
    if sweep_rows:
        text += "\nsweep\n\n" + markdown_records(sweep_rows) + "\n"
    (out / f"{opt.name}.md").write_text(text)
    (out / f"{opt.name}_cmd.txt").write_text(" ".join(sys.argv) + "\n")
    print(text)


if __name__ == "__main__":
    main()
