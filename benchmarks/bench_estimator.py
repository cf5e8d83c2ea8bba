"""Prism estimator benchmark: unfused PyTorch vs fused Triton vs mean-pool (GPU only).

    python benchmarks/bench_estimator.py [phase=all|sweep|timing|precompile] [lengths=[8192,...]]
        [threshold=0.95] [out=DIR]

(omegaconf ``key=value`` overrides through :func:`prism.cli.parse_cli`; the older
``--phase sweep --lengths 8192 16384`` spellings still work; ``-h`` lists the keys.)

1. Checks: the fused selection (Triton, 2 launches) against the unfused ``PrismScorer`` at a few
   sizes, fp32 and bf16 (rows whose selection differs; list layout against ``bool_to_block_lists``).
2. Sweep (phase ``sweep`` / ``all``): launch shapes of the select kernel at the smallest and
   largest length (time of the select launch alone, compiler registers / spills), and the
   timing-only variants of ``_estimator_variants.py`` (no threshold search / no list writing /
   logits only), which attribute the select time to its stages.
3. Timing at each length (Hq=32, Hkv=8, D=128, bf16, batch 1, Sq = Sk): ``triton.testing.do_bench``
   medians of the unfused Prism scorer (bool mask), unfused + BlockMask lists, mean-pool, the fused
   estimator (lists) and its two launches; extra peak CUDA memory of one call (outputs included) and
   the size of its outputs; pooling bandwidth against reading Q and K once.

Prints a markdown table last; writes ``estimator_h200.{md,csv}`` and the command line to ``--out``.
Inputs are synthetic RoPE'd "topic" Q/K made on the GPU (sparse, text-like attention), so the
selection density — and the threshold search's work — resemble a real model's, not noise.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _estimator_variants import VARIANTS  # noqa: E402

from prism.cli import parse_cli  # noqa: E402
from prism.kernels.estimation.op import Plan, prism_select_block_lists  # noqa: E402
from prism.kernels.estimation.pool import pool_blocks_fused  # noqa: E402
from prism.kernels.estimation.select import (  # noqa: E402
    SelectConfig,
    pick_select_config,
    select_from_pooled,
)
from prism.masks import BlockSelection, block_causal, bool_to_block_lists  # noqa: E402
from prism.scorers.meanpool import MeanPoolScorer  # noqa: E402
from prism.scorers.prism import PrismConfig, PrismScorer  # noqa: E402

D = 128  # head dim of every benchmark shape


def gpu_header() -> str:
    """``GPU ...; torch ...; triton ...; python ...``: the first line of the estimator benchmarks."""
    return (
        f"GPU {torch.cuda.get_device_name()}; torch {torch.__version__}; triton "
        f"{triton.__version__}; python {platform.python_version()}"
    )


def synth_qk(b, hq, hkv, s, d, seed, dtype, device="cuda", segment=300, strength=2.0):
    """RoPE'd topic-structured q [B,Hq,S,D], k [B,Hkv,S,D] on the GPU (cf. prism.synthetic)."""
    g = torch.Generator(device=device).manual_seed(seed)
    n_seg = -(-s // segment)
    topics = torch.randn(b, hkv, n_seg, d, generator=g, device=device)
    seg_of = torch.arange(s, device=device) // segment
    k = strength * topics[:, :, seg_of] + torch.randn(b, hkv, s, d, generator=g, device=device)
    rep = hq // hkv
    t_rep = topics.repeat_interleave(rep, dim=1)  # [B, Hq, nseg, D]
    recall = (torch.rand(b, hq, s, generator=g, device=device) * (seg_of + 1)).long()
    mix = torch.rand(b, hq, s, generator=g, device=device) < 0.5
    seg_q = torch.where(mix, recall, seg_of.expand(b, hq, s))
    q = torch.empty(b, hq, s, d, device=device)
    for h in range(hq):  # gather per head keeps the temporaries small at 128K
        q[:, h] = strength * torch.gather(
            t_rep[:, h], 1, seg_q[:, h, :, None].expand(-1, -1, d)
        ) + torch.randn(b, s, d, generator=g, device=device)
    half = d // 2
    theta = 10000.0 ** (-torch.arange(half, device=device, dtype=torch.float64) * 2 / d)
    ang = torch.arange(s, device=device, dtype=torch.float64)[:, None] * theta[None, :]
    cos, sin = ang.cos().float(), ang.sin().float()

    def rope(x):
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    out_q = torch.empty(b, hq, s, d, device=device, dtype=dtype)
    for h in range(hq):
        out_q[:, h] = rope(q[:, h]).to(dtype)
    del q
    return out_q, rope(k).to(dtype)


def bench(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def peak_extra_mb(fn) -> tuple[float, float]:
    """(extra peak MB of one call incl. its outputs, MB of the outputs it returns)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    held = torch.cuda.memory_allocated() - base
    del out
    return peak / 2**20, held / 2**20


def fused_mask(lists, sq, sk, bs):
    return BlockSelection.from_lists(lists, sq, sk, bs).mask


def kernel_params(cfg: PrismConfig):
    return PrismScorer(cfg).kernel_params(D)


def check(cfg, lengths, dtypes, seed=1, device="cuda"):
    rows = []
    for s, pre in lengths:
        for dt in dtypes:
            q, k = synth_qk(2, 8, 2, s, D, seed, dt, device=device)
            q = q[:, :, pre:]  # a cached prefix of `pre` tokens
            ref = PrismScorer(cfg).select_torch(q, k).mask
            lists = prism_select_block_lists(q, k, kernel_params(cfg))
            got = fused_mask(lists, q.shape[2], s, cfg.block_size)
            diff_rows = int((got != ref).any(-1).sum())
            _, part = block_causal(q.shape[2], s, cfg.block_size, q.device)
            exp = bool_to_block_lists(ref & part) + bool_to_block_lists(ref & ~part)
            exp = (exp[0], exp[1], exp[2], exp[3])
            layout_ok = diff_rows > 0 or all(torch.equal(a, b) for a, b in zip(lists, exp))
            rows.append(
                dict(
                    Sk=s,
                    Sq=q.shape[2],
                    dtype=str(dt).replace("torch.", ""),
                    rows=ref.shape[0] * ref.shape[1] * ref.shape[2],
                    diff_rows=diff_rows,
                    lists_equal=layout_ok,
                    density=float(ref.float().mean()),
                )
            )
            print("check", rows[-1], flush=True)
    return rows


def sweep(cfg, s, variants, pool_variants=()):
    """Select-kernel launch variants ``(SelectConfig, variant)`` on one pooled input; variant
    1/2/3 are the timing-only tile bodies of ``_estimator_variants.py`` (no threshold search / no
    list writing / logits only), 0 the production body."""
    q, k = synth_qk(1, 32, 8, s, D, 0, torch.bfloat16)
    plan = Plan(q, k, kernel_params(cfg))
    pooled = pool_blocks_fused(q, k, plan)
    ref = select_from_pooled(pooled, plan)
    ref_mask = fused_mask(ref, s, s, cfg.block_size)
    out = []
    for v, dbg in variants:
        name = f"{v}" + (f" variant={VARIANTS[dbg].__name__}" if dbg else "")
        try:
            t0 = time.time()
            lists, kern = select_from_pooled(
                pooled, plan, v, tile=VARIANTS.get(dbg), return_kernel=True
            )
            torch.cuda.synchronize()
            comp = time.time() - t0
            diff = -1
            if not dbg:
                diff = int((fused_mask(lists, s, s, cfg.block_size) != ref_mask).any(-1).sum())
            t = bench(
                lambda v=v, dbg=dbg: select_from_pooled(pooled, plan, v, tile=VARIANTS.get(dbg))
            )
            regs, spills = getattr(kern, "n_regs", -1), getattr(kern, "n_spills", -1)
            out.append(
                dict(
                    S=s, launch=name, ms=t, regs=regs, spills=spills, diff_rows=diff, compile_s=comp
                )
            )
        except Exception as e:  # a variant that does not compile is reported, not fatal
            out.append(dict(S=s, launch=name, ms=float("nan"), error=repr(e)[:200]))
        print("sweep", out[-1], flush=True)
    qk_bytes = (q.numel() + k.numel()) * q.element_size()
    for rows, warps in pool_variants:
        t = bench(lambda r=rows, w=warps: pool_blocks_fused(q, k, plan, rows=r, num_warps=w))
        out.append(
            dict(
                S=s, launch=f"pool rows={rows} warps={warps} ({qk_bytes / t / 1e6:.0f} GB/s)", ms=t
            )
        )
        print("sweep", out[-1], flush=True)
    return out


def time_one(cfg, s):
    q, k = synth_qk(1, 32, 8, s, D, 0, torch.bfloat16)
    unf = PrismScorer(cfg).select_torch
    mp = MeanPoolScorer(block_size=cfg.block_size, threshold=cfg.threshold)
    params = kernel_params(cfg)
    plan = Plan(q, k, params)
    pooled = pool_blocks_fused(q, k, plan)
    lists, kern = select_from_pooled(pooled, plan, return_kernel=True)
    ref = unf(q, k).mask
    diff = int((fused_mask(lists, s, s, cfg.block_size) != ref).any(-1).sum())
    n_causal = int(block_causal(s, s, cfg.block_size)[0].sum())
    dens = float((lists[0] + lists[2]).sum()) / (ref.shape[1] * n_causal)
    fns = {
        "unfused": lambda: unf(q, k).mask,
        "unfused+lists": lambda: unf(q, k).block_mask(),
        "meanpool": lambda: mp(q, k).mask,
        "fused": lambda: prism_select_block_lists(q, k, params),
        "fused.pool": lambda: pool_blocks_fused(q, k, plan),
        "fused.select": lambda: select_from_pooled(pooled, plan),
    }
    row = dict(S=s, density=dens, diff_rows=diff, rows=32 * plan.nqb)
    for name, fn in fns.items():
        row[f"{name}_ms"] = bench(fn)
    for name in ("unfused", "unfused+lists", "meanpool", "fused"):
        row[f"{name}_mb"], row[f"{name}_out_mb"] = peak_extra_mb(fns[name])
    qk_bytes = (q.numel() + k.numel()) * q.element_size()
    row["pool_GBps"] = qk_bytes / row["fused.pool_ms"] / 1e6
    row["regs"] = getattr(kern, "n_regs", -1)
    row["spills"] = getattr(kern, "n_spills", -1)
    row["launch"] = str(pick_select_config(plan.g, plan.nkb))
    print("time", row, flush=True)
    return row


def time_lengths(cfg, lengths):
    res = []
    for s in lengths:
        res.append(time_one(cfg, s))
        torch.cuda.empty_cache()
    return res


def copy_bw_gbps() -> float:
    x = torch.empty(2**28, device="cuda", dtype=torch.float32)  # 1 GiB
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / t / 1e6


def to_md(rows, cols) -> str:
    from prism.utils.tables import markdown_table

    return markdown_table(cols, [[r.get(c, "") for c in cols] for r in rows], digits=3)


def sweep_plan(lengths):
    """(S, [(SelectConfig, variant)], [(pool rows, pool warps)]) of the launch sweep: the default
    launch, one alternative, and at the largest length the timing-only variants (1: no
    threshold search, 2: no list writing, 3: logits only) that attribute the select time."""
    sc = SelectConfig
    plans = []
    lo, hi = min(lengths), max(lengths)
    for s in sorted({lo, hi}):
        base = pick_select_config(4, math.ceil(s / 128))
        variants = [(base, 0)]
        pools = []
        if s == hi:
            variants += [
                (sc(4, 4, base.num_warps, dot_prec="ieee", tiers=3), 0),
                (sc(4, 4, base.num_warps, dot_prec="tf32x3", tiers=1), 0),
                (base, 1),
                (base, 2),
                (base, 3),
            ]
            pools = [(64, 4), (32, 4)]
        else:
            variants += [(sc(4, 4, base.num_warps, dot_prec="tf32x3", tiers=3), 0)]
        plans.append((s, variants, pools))
    return plans


def _compile_job(job):
    """Run one launch once on random inputs of the benchmark's shape (fills Triton's disk cache)."""
    s, launch, variant, pool = job
    q = torch.randn(1, 32, s, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, s, D, device="cuda", dtype=torch.bfloat16)
    plan = Plan(q, k, kernel_params(PrismConfig()))
    pooled = pool_blocks_fused(q, k, plan, *(pool or (None, 4)))
    if launch is not None or pool is None:
        select_from_pooled(pooled, plan, launch, tile=VARIANTS.get(variant))
    torch.cuda.synchronize()
    return s


def precompile(lengths, workers=12):
    """Compile every launch of the sweep and of the timing in parallel processes (CPU-bound)."""
    import concurrent.futures as cf
    import multiprocessing as mp

    jobs = [(s, None, 0, None) for s in lengths]
    for s, variants, pools in sweep_plan(lengths):
        jobs += [(s, v, d, None) for v, d in variants]
        jobs += [(s, None, 0, p) for p in pools]
    t0 = time.time()
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        for r in ex.map(_compile_job, jobs):
            print("compiled", r, f"{time.time() - t0:.0f}s", flush=True)


PHASES = ("all", "sweep", "timing", "precompile")


@dataclasses.dataclass
class Args:
    lengths: list[int] = dataclasses.field(
        default_factory=lambda: [8192, 16384, 32768, 65536, 131072]
    )
    phase: str = dataclasses.field(default="all", metadata={"help": " | ".join(PHASES)})
    threshold: float = 0.95
    out: str = str(Path(__file__).resolve().parent / "results")


def main(argv=None) -> None:
    args = parse_cli(Args, argv, description=__doc__, prog="benchmarks/bench_estimator.py")
    if args.phase not in PHASES:
        sys.exit(f"error: phase must be one of {list(PHASES)}, got {args.phase!r}")
    if not torch.cuda.is_available():
        sys.exit("bench_estimator.py needs a CUDA GPU")
    cfg = PrismConfig(threshold=args.threshold)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    env = (
        f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}"
        f" | python {platform.python_version()}"
    )
    print(env, flush=True)
    cmd = "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:])
    if args.phase == "precompile":
        precompile(args.lengths)
        return

    if args.phase in ("all", "sweep"):
        checks = check(cfg, [(4096, 0), (16384, 0), (3000, 257)], [torch.float32, torch.bfloat16])
        sweeps = []
        for s, variants, pools in sweep_plan(args.lengths):
            sweeps += sweep(cfg, s, variants, pools)
        md = ["## Fused vs unfused selection (fp32 exact / bf16)", ""]
        md += [to_md(checks, list(checks[0].keys())), ""]
        keys = ["S", "launch", "ms", "regs", "spills", "diff_rows", "compile_s", "error"]
        md += ["## Select-kernel launch sweep", "", to_md(sweeps, keys), ""]
        md += [f"Command: `{cmd}`; `{env}` ({time.time() - t0:.0f} s)", ""]
        (out / "estimator_h200_sweep.md").write_text("\n".join(md))
        print("\n".join(md), flush=True)

    if args.phase in ("all", "timing"):
        bw = copy_bw_gbps()
        timing = time_lengths(cfg, args.lengths)
        cols = [
            "S", "density", "diff_rows", "unfused_ms", "unfused+lists_ms", "meanpool_ms",
            "fused_ms", "fused.pool_ms", "fused.select_ms", "pool_GBps", "unfused_mb",
            "unfused+lists_mb", "fused_mb", "fused_out_mb", "regs", "spills",
        ]  # fmt: skip
        md = [
            "# Prism estimator: unfused PyTorch vs fused Triton (H200)",
            "",
            f"`{env}`; Hq=32, Hkv=8, D=128, bf16, batch 1, Sq=Sk, threshold {args.threshold}, "
            "BS=128; synthetic RoPE'd topic Q/K. Times: do_bench medians (ms). Memory: extra peak "
            "of one call in MB, outputs included (`fused_out_mb`: the four block lists alone). "
            f"Device copy bandwidth (read+write): {bw:.0f} GB/s. Launch shapes: "
            + "; ".join(f"{r['S']}: {r['launch']}" for r in timing),
            "",
            to_md(timing, cols),
            "",
            f"Command: `{cmd}`  ({time.time() - t0:.0f} s)",
            "",
        ]
        text = "\n".join(md)
        (out / "estimator_h200.md").write_text(text)
        with open(out / "estimator_h200.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=sorted({k for r in timing for k in r}))
            w.writeheader()
            w.writerows(timing)
        print(text)
    (out / f"estimator_h200_command_{args.phase}.txt").write_text(cmd + "\n" + env + "\n")


if __name__ == "__main__":
    main()
