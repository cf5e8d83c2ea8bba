"""Context-parallel pre-fill attention (issue 13): 1 vs W GPUs, dense CP vs sparse CP, bytes moved.

Run under torchrun on one host (NCCL; leave NVLink multicast off, i.e. do not set
``NCCL_NVLS_ENABLE=1``):

    torchrun --standalone --nproc_per_node=2 benchmarks/bench_context_parallel.py \\
        --out benchmarks/results --tag cp_h200x2

Per length (default 128K and 256K; Hq=32, Hkv=8, D=128, bf16, batch 1, prism.synthetic's RoPE'd
text-like inputs, BS=128):

* ``1gpu dense``: cuDNN causal SDPA of the whole sequence on rank 0 alone;
* ``1gpu sparse``: the scorer (selection + BlockMask) + ``flex`` on rank 0 alone;
* ``cp dense ring`` / ``cp dense allgather``: every causal block (scorer ``dense``) over W ranks;
* ``cp sparse fetch`` / ``cp sparse ring``: the scorer over W ranks (``context_parallel_attention``;
  summaries scoring, then fetch of the selected remote K/V blocks or a ring pass).

Times are medians over ``reps`` of the slowest rank (all-reduce MAX of each rank's wall time,
CUDA-synchronised, after a barrier). Bytes are the op's own counters (:class:`CPStats`), the
largest rank's. Before any timing, a small ragged shape (``check_len`` tokens, GQA) is run through
every CP mode and compared with the single-GPU result: selection rows identical to the
single-process selection, output within ``check_tol`` (relative L2) of the fp32 oracle. If any
check fails the script prints why and exits 1 without reporting numbers.
"""

from __future__ import annotations

import csv
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import prism  # noqa: E402
from prism.distributed import (  # noqa: E402
    ZigZagSharding,
    context_parallel_attention,
    gather_sequence,
)
from prism.kernels import get_backend  # noqa: E402
from prism.kernels.reference import reference_attention  # noqa: E402
from prism.synthetic import synthetic_qkv  # noqa: E402
from prism.testing import relative_error  # noqa: E402
from prism.utils.tables import markdown_records  # noqa: E402

CP_MODES = [  # (label, scorer kind, kv_mode)
    ("cp dense ring", "dense", "ring"),
    ("cp dense allgather", "dense", "allgather"),
    ("cp sparse fetch", "sparse", "fetch"),
    ("cp sparse ring", "sparse", "ring"),
]

#: where and how the run computes (``cpu_smoke=true`` switches to CPU / gloo / float32)
DEV = {"device": "cuda", "dtype": torch.bfloat16, "impl": "auto", "backend": "flex"}


@dataclass
class CPArgs:
    lengths: list[int] = field(default_factory=lambda: [131072, 262144])
    scorer: str = "prism"
    threshold: float = 0.95
    block_size: int = 128
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    reps: int = 5
    warmup: int = 2
    check_len: int = 8192 + 77
    check_tol: float = 2e-2
    #: a smoke test of this script on CPU (gloo, float32, the torch path, plain SDPA, the
    #: reference backend): timings meaningless, e.g. ``torchrun --nproc_per_node=2 ...
    #: cpu_smoke=true lengths=[2048] check_len=1000 q_heads=4 kv_heads=2 head_dim=32
    #: block_size=32 reps=1 warmup=0``
    cpu_smoke: bool = False
    out: str = str(REPO / "benchmarks" / "results")
    tag: str = "cp_h200"


def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


def _sync() -> None:
    if DEV["device"] == "cuda":
        torch.cuda.synchronize()


def _empty_cache() -> None:
    if DEV["device"] == "cuda":
        torch.cuda.empty_cache()


def _scorer(args, kind: str, impl: str = "auto"):
    if kind == "dense":
        return prism.build_scorer("dense", block_size=args.block_size)
    params = dict(block_size=args.block_size, threshold=args.threshold)
    if args.scorer == "prism":
        params["impl"] = impl
    return prism.build_scorer(args.scorer, **params)


def _inputs(args, s: int, seed: int = 0):
    return synthetic_qkv(
        1, args.q_heads, args.kv_heads, s, args.head_dim, seed=seed,
        dtype=DEV["dtype"], device=DEV["device"],
    )  # fmt: skip


def _reduce(values, op) -> list[float]:
    t = torch.tensor(values, device=DEV["device"], dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return t.tolist()


def timed(fn, reps: int, warmup: int) -> float:
    """Median over reps of the slowest rank's wall time (ms)."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(_reduce([time.perf_counter() - t0], dist.ReduceOp.MAX)[0] * 1e3)
    return statistics.median(times)


def check(args) -> list[str]:
    """The small-shape correctness gate: returns the list of failures (empty = pass)."""
    rank, w = dist.get_rank(), dist.get_world_size()
    s = args.check_len
    q, k, v = _inputs(args, s, seed=1)
    plan = ZigZagSharding(s, args.block_size, w)
    local = [plan.shard(x, rank) for x in (q, k, v)]
    failures = []
    for label, kind, kv_mode in CP_MODES:
        # prism: the summaries path computes the PyTorch formula, so compare with impl="torch"
        sel = _scorer(args, kind, impl="torch")(q, k)
        ref = reference_attention(q, k, v, sel.block_mask(), out_dtype=torch.float32)
        one_gpu = get_backend(DEV["backend"])(q, k, v, sel.block_mask())
        out, stats = context_parallel_attention(
            *local, plan, _scorer(args, kind), kv_mode=kv_mode, impl=DEV["impl"]
        )
        full = gather_sequence(out, plan)
        same = torch.equal(stats.selection, sel.mask[:, :, stats.query_blocks])
        same_all = _reduce([float(same)], dist.ReduceOp.MIN)[0] == 1.0
        err_cp = relative_error(full.float(), ref)
        err_1 = relative_error(one_gpu.float(), ref)
        nan = bool(full.isnan().any())
        log(
            f"check {label}: selection identical={same_all}, rel err CP={err_cp:.2e} "
            f"(1-GPU {DEV['backend']} {err_1:.2e}), density={sel.density:.3f}, NaN={nan}"
        )
        if not same_all:
            failures.append(f"{label}: selection rows differ from the single-process selection")
        if nan or not err_cp < args.check_tol:
            failures.append(f"{label}: rel err {err_cp:.3g} (tol {args.check_tol}), NaN={nan}")
    return failures


def run_length(args, s: int) -> list[dict]:
    rank, w = dist.get_rank(), dist.get_world_size()
    rows = []
    q, k, v = _inputs(args, s)

    # one GPU: rank 0 alone (the other ranks idle through the same barriers)
    scorer = _scorer(args, "sparse")
    backend = get_backend(DEV["backend"])

    def dense_fn():
        if DEV["device"] != "cuda":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def sparse_fn():
        return backend(q, k, v, scorer(q, k).block_mask())

    def idle():
        return None

    one = {}
    for label, fn in (("1gpu dense", dense_fn), ("1gpu sparse", sparse_fn)):
        one[label] = timed(fn if rank == 0 else idle, args.reps, args.warmup)
    density_1 = scorer(q, k).density if rank == 0 else float("nan")
    rows.append(dict(S=s, mode="1gpu dense", gpus=1, ms=one["1gpu dense"], density=1.0))
    rows.append(dict(S=s, mode="1gpu sparse", gpus=1, ms=one["1gpu sparse"], density=density_1))
    log(f"  1gpu dense {one['1gpu dense']:.2f} ms, 1gpu sparse {one['1gpu sparse']:.2f} ms")

    plan = ZigZagSharding(s, args.block_size, w)
    local = [plan.shard(x, rank).contiguous() for x in (q, k, v)]
    _empty_cache()
    for label, kind, kv_mode in CP_MODES:
        box: dict = {}
        cp_scorer = _scorer(args, kind)

        def run(scorer=cp_scorer, kv_mode=kv_mode, box=box):
            box["stats"] = context_parallel_attention(
                *local, plan, scorer, kv_mode=kv_mode, impl=DEV["impl"]
            )[1]

        ms = timed(run, args.reps, args.warmup)
        st = box["stats"]
        sent, recv, units = _reduce(
            [st.bytes_sent, st.bytes_recv, st.kv_units_moved], dist.ReduceOp.MAX
        )
        density = _reduce([st.density], dist.ReduceOp.SUM)[0] / w
        row = dict(
            S=s, mode=label, gpus=w, ms=ms, density=density, sent_GB=sent * 1e-9,
            recv_GB=recv * 1e-9, kv_units=int(units), kv_units_remote=st.kv_units_remote,
            score_mode=st.score_mode,
        )  # fmt: skip
        rows.append(row)
        log("  " + ", ".join(f"{a}={b:.4g}" if isinstance(b, float) else f"{a}={b}"
                             for a, b in row.items()))  # fmt: skip
        _empty_cache()
    for r in rows:
        r["speedup_vs_1gpu_dense"] = one["1gpu dense"] / r["ms"]
    return rows


def main(argv=None):
    from prism.cli import parse_cli

    args = parse_cli(CPArgs, argv, description=__doc__)
    if args.cpu_smoke:
        DEV.update(device="cpu", dtype=torch.float32, impl="torch", backend="reference")
        dist.init_process_group("gloo")
        where = "CPU smoke test (gloo, float32; timings meaningless)"
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_context_parallel.py needs CUDA GPUs (torchrun on a GPU host)")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        where = (
            f"{torch.cuda.get_device_name()}, NCCL "
            f"{'.'.join(map(str, torch.cuda.nccl.version()))}, NCCL_NVLS_ENABLE="
            f"{os.environ.get('NCCL_NVLS_ENABLE', '(unset)')}"
        )
    w = dist.get_world_size()
    header = [
        f"# {where} x{w} ranks, torch {torch.__version__}",
        f"# command: torchrun --nproc_per_node={w} benchmarks/bench_context_parallel.py "
        + " ".join(sys.argv[1:]),
        f"# shape: B=1, Hq={args.q_heads}, Hkv={args.kv_heads}, D={args.head_dim}, "
        f"{str(DEV['dtype']).removeprefix('torch.')}, BS={args.block_size}; sparse scorer "
        f"{args.scorer} threshold {args.threshold}; synthetic RoPE'd inputs",
    ]
    log("\n".join(header))
    failures = check(args)
    if failures:
        log("CORRECTNESS CHECK FAILED, no numbers reported:\n  " + "\n  ".join(failures))
        dist.destroy_process_group()
        sys.exit(1)
    log("correctness check passed")
    rows = []
    for s in args.lengths:
        log(f"S={s}")
        rows += run_length(args, s)
        _empty_cache()
    if dist.get_rank() == 0:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        cols = ["S", "mode", "gpus", "ms", "speedup_vs_1gpu_dense", "density", "sent_GB",
                "recv_GB", "kv_units", "kv_units_remote", "score_mode"]  # fmt: skip
        with open(out_dir / f"{args.tag}.csv", "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            wr.writeheader()
            wr.writerows(rows)
        table = markdown_records(rows, cols, digits=3)
        notes = (
            "ms: median wall time of the slowest rank (the 1gpu rows: rank 0 alone); bytes: "
            "per rank, the largest, from the op's own counters; kv_units: (batch, KV head, "
            "block) K/V units a rank received from the others (kv_units_remote: all of them)."
        )
        text = "\n".join(header) + "\n\n" + notes + "\n\n" + table + "\n"
        (out_dir / f"{args.tag}.md").write_text(text)
        print(table, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
