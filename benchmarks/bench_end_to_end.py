"""End-to-end sparse attention pre-fill on one GPU: estimator + BlockMask + kernel vs dense cuDNN.

Per length and scorer: the scorer's estimation time (selection + BlockMask, i.e. everything
before the kernel), each backend's kernel time on that mask, the total, the density, and the
speed-up over dense causal cuDNN SDPA measured in the same run. Inputs are prism.synthetic's
RoPE'd text-like Q/K/V (Hq=32, Hkv=8, D=128, bf16, batch 1): densities are those of synthetic
data, not of a real model (see benchmarks/results/accuracy.md for real-model densities).
Before timing, each (length, scorer) checks that every backend agrees with the Triton kernel
(which its own tests compare with the fp32 reference) and wrote no NaN.

    python benchmarks/bench_end_to_end.py --out benchmarks/results --tag e2e_h200
"""

from __future__ import annotations

import csv
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import prism  # noqa: E402
from prism.kernels import get_backend  # noqa: E402
from prism.kernels.flex import flash_available  # noqa: E402
from prism.synthetic import synthetic_qkv  # noqa: E402
from prism.testing import relative_error as rel_err  # noqa: E402


def bench(fn, rep_ms: int) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def run_length(S: int, args) -> list[dict]:
    rows = []
    q, k, v = synthetic_qkv(1, 32, 8, S, 128, seed=0, dtype=torch.bfloat16, device="cuda")
    scale = 128**-0.5
    kr, vr = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)  # fallback if GQA is refused

    def dense_fn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            try:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            except RuntimeError:
                return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)

    dense_out = dense_fn()
    t_dense = bench(dense_fn, args.rep_ms)
    print(f"S={S}: dense cuDNN {t_dense:.3f} ms", flush=True)
    for name in args.scorers:
        scorer = prism.build_scorer(name)
        est_fn = lambda scorer=scorer: scorer(q, k).block_mask()
        sel = scorer(q, k)
        bm = sel.block_mask()
        density = sel.density
        t_est = bench(est_fn, args.rep_ms)
        outs = {}
        for b in args.backends:
            t0 = time.perf_counter()
            try:
                outs[b] = get_backend(b)(q, k, v, bm, scale=scale)
                torch.cuda.synchronize()
            except Exception as e:  # keep the run going; the table says why
                print(f"  {name}/{b}: FAILED {type(e).__name__}: {e}", flush=True)
                continue
            print(f"  {name}/{b}: first call {time.perf_counter() - t0:.1f} s", flush=True)
        base = outs.get("triton")
        checks = {
            b: (rel_err(o, base) if base is not None else float("nan")) for b, o in outs.items()
        }
        for b, o in outs.items():
            assert not o.isnan().any(), f"{b} wrote NaN"
            assert checks[b] < 2e-2, f"{b} disagrees with triton: {checks[b]}"
            t_k = bench(lambda b=b, bm=bm: get_backend(b)(q, k, v, bm, scale=scale), args.rep_ms)
            total = t_est + t_k
            row = dict(
                S=S,
                scorer=name,
                backend=b,
                density=round(density, 4),
                est_ms=round(t_est, 4),
                kernel_ms=round(t_k, 4),
                total_ms=round(total, 4),
                dense_cudnn_ms=round(t_dense, 4),
                speedup=round(t_dense / total, 3),
                kernel_ratio=round(t_k / (density * t_dense), 3),
                err_vs_dense=round(rel_err(o, dense_out), 4),
            )
            rows.append(row)
            print("  " + ", ".join(f"{k_}={v_}" for k_, v_ in row.items()), flush=True)
    return rows


@dataclass
class E2EArgs:
    lengths: list[int] = field(default_factory=lambda: [8192, 32768, 131072])
    scorers: list[str] = field(default_factory=lambda: ["prism", "meanpool", "xattn"])
    backends: list[str] = field(default_factory=lambda: ["triton", "flex"])
    rep_ms: int = 150
    out: str = str(REPO / "benchmarks" / "results")
    tag: str = "e2e_h200"


def main(argv=None):
    from prism.cli import parse_cli

    args = parse_cli(E2EArgs, argv, description=__doc__)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.cuda.get_device_name()
    log_lines = [
        f"# {dev}, torch {torch.__version__}, flex FLASH available: {flash_available()}",
        "# command: python benchmarks/bench_end_to_end.py " + " ".join(sys.argv[1:]),
    ]
    print("\n".join(log_lines), flush=True)
    rows = []
    for S in args.lengths:
        rows += run_length(S, args)
        torch.cuda.empty_cache()
    hdr = list(rows[0].keys())
    with open(out_dir / f"{args.tag}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=hdr)
        w.writeheader()
        w.writerows(rows)
    md = log_lines + [
        "",
        "kernel_ratio = kernel time / (density x dense cuDNN time); speedup = dense cuDNN / (estimator + kernel);",
        "err_vs_dense = relative L2 difference of the sparse output from dense attention (synthetic data).",
        "",
        "| " + " | ".join(hdr) + " |",
        "|" + "---|" * len(hdr),
    ]
    md += ["| " + " | ".join(str(r[h]) for h in hdr) + " |" for r in rows]
    (out_dir / f"{args.tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md[2:]))


if __name__ == "__main__":
    main()
