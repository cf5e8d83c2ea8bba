"""CPU tests of the Triton block-sparse attention forward (backend "triton").

The kernel runs under Triton's interpreter, which must be switched on (``TRITON_INTERPRET=1``)
before Triton is first imported in a process. Other test modules may import Triton first, and the
variable would leak into every later test, so the interpreter cases run in ONE subprocess (this
file executed as a script with ``--worker``) that reports a JSON line per case; each pytest case
asserts on its line. The naive float32 reference is checked in-process against dense SDPA.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from prism.kernels.block_sparse import block_sparse_attention, naive_block_sparse_attention
from prism.kernels.block_sparse.naive import (
    block_mask_from_maps,
    causal_block_maps,
    random_causal_block_mask,
)

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------
# Cases for the interpreter worker. Keep each ≤ ~2 s in the interpreter (≤ 1K tokens, fp32/fp16).
# kind: "random"   — diagonal partial blocks + random full blocks
#       "partial_only" — no full lists; partial lists hold the diagonal plus random blocks, some of
#                      them ABOVE the diagonal (fully masked by the causal rule) and some below
#       "full_only" — every visible block listed as full (no causal mask), empty partial lists
#       "empty_rows" — random, then some query-block rows get no block at all
#       "above_only" — some rows list only blocks above the diagonal (every key masked)
# ----------------------------------------------------------------------------------------------
CASES = {
    "fp32_ragged127_d64": dict(
        B=1, Hq=2, Hkv=1, Sq=127, Sk=127, D=64, bs=64, dtype="float32", kind="random", density=0.5
    ),
    "fp32_d32_bs64": dict(
        B=1, Hq=2, Hkv=2, Sq=200, Sk=200, D=32, bs=64, dtype="float32", kind="random", density=0.6
    ),
    "fp16_ragged300_gqa42_batch2": dict(
        B=2, Hq=4, Hkv=2, Sq=300, Sk=300, D=64, bs=128, dtype="float16", kind="random", density=0.7
    ),
    "fp16_1000_d128": dict(
        B=1,
        Hq=2,
        Hkv=1,
        Sq=1000,
        Sk=1000,
        D=128,
        bs=128,
        dtype="float16",
        kind="random",
        density=0.3,
    ),
    "fp16_gqa82_bs64": dict(
        B=1, Hq=8, Hkv=2, Sq=256, Sk=256, D=64, bs=64, dtype="float16", kind="random", density=0.5
    ),
    "fp16_prefix_ragged": dict(
        B=2, Hq=2, Hkv=1, Sq=200, Sk=500, D=64, bs=64, dtype="float16", kind="random", density=0.5
    ),
    "fp16_prefix_aligned": dict(
        B=1, Hq=2, Hkv=1, Sq=256, Sk=512, D=128, bs=128, dtype="float16", kind="random", density=0.5
    ),
    "fp16_partial_only": dict(
        B=1,
        Hq=2,
        Hkv=1,
        Sq=300,
        Sk=400,
        D=64,
        bs=64,
        dtype="float16",
        kind="partial_only",
        density=0.4,
    ),
    "fp16_full_only": dict(
        B=2,
        Hq=2,
        Hkv=2,
        Sq=300,
        Sk=300,
        D=64,
        bs=128,
        dtype="float16",
        kind="full_only",
        density=1.0,
    ),
    "fp16_empty_rows": dict(
        B=1,
        Hq=4,
        Hkv=2,
        Sq=320,
        Sk=320,
        D=64,
        bs=64,
        dtype="float16",
        kind="empty_rows",
        density=0.5,
    ),
    "fp32_above_only": dict(
        B=1,
        Hq=2,
        Hkv=1,
        Sq=256,
        Sk=256,
        D=64,
        bs=64,
        dtype="float32",
        kind="above_only",
        density=0.5,
    ),
    "fp16_mask_broadcast_b1h1": dict(
        B=2,
        Hq=4,
        Hkv=2,
        Sq=200,
        Sk=260,
        D=64,
        bs=64,
        dtype="float16",
        kind="random",
        density=0.6,
        mask_bh=(1, 1),
    ),
    "fp16_block_128x64": dict(
        B=1,
        Hq=2,
        Hkv=1,
        Sq=300,
        Sk=300,
        D=64,
        bs=(128, 64),
        dtype="float16",
        kind="random",
        density=0.5,
    ),
    # compute tiles smaller than the mask block: 2 query tiles per block row, 4 KV sub-tiles
    "fp16_subtiles_bs128_t32": dict(
        B=1,
        Hq=2,
        Hkv=1,
        Sq=300,
        Sk=350,
        D=64,
        bs=128,
        dtype="float16",
        kind="random",
        density=0.6,
        config=(32, 32),
    ),
    # dense: every causal block => equals causal SDPA (checked against the reference too)
    "fp16_dense_causal": dict(
        B=1, Hq=2, Hkv=1, Sq=384, Sk=384, D=64, bs=128, dtype="float16", kind="random", density=1.0
    ),
}
# Kernel variants: K/V loads through pointers ("ptr") or TMA descriptors ("tma"), one merged loop
# over full + partial blocks ("_merged") or two loops. Defaults: Hopper D=128 tma_merged, Hopper
# D=64 tma, elsewhere ptr / ptr_merged. Every case runs the first two; a subset the other two.
FULL_MODES = ("ptr", "tma_merged")
SUBSET_MODES = ("tma", "ptr_merged")
SUBSET_CASES = (
    "fp16_ragged300_gqa42_batch2",
    "fp16_prefix_ragged",
    "fp16_partial_only",
    "fp16_empty_rows",
    "fp32_above_only",
    "fp16_subtiles_bs128_t32",
)
# the public op path (validation + torch.ops.prism.block_sparse_attn_fwd -> interpreter)
OP_CASES = (
    "fp16_ragged300_gqa42_batch2",
    "fp16_prefix_ragged",
    "fp16_empty_rows",
    "fp32_ragged127_d64",
)


def build_case_mask(c: dict, gen: torch.Generator):
    """Dense (partial, full) block maps and the BlockMask for a case."""
    bs = c["bs"]
    bs_q, bs_kv = (bs, bs) if isinstance(bs, int) else bs
    Bm, Hm = c.get("mask_bh", (c["B"], c["Hq"]))
    Sq, Sk = c["Sq"], c["Sk"]
    vis, diag = causal_block_maps(Sq, Sk, bs_q, bs_kv)
    shape = (Bm, Hm) + tuple(vis.shape)
    rnd = torch.rand(shape, generator=gen) < c["density"]
    kind = c["kind"]
    part = diag.expand(shape).clone()
    full = vis & ~diag & rnd
    with_full = True
    if kind == "partial_only":
        above = ~vis & (torch.rand(shape, generator=gen) < 0.5)
        part = part | full | above
        full = torch.zeros_like(full)
        with_full = False
    elif kind == "full_only":
        full = vis.expand(shape).clone()
        part = torch.zeros_like(part)
    elif kind == "empty_rows":
        drop = torch.rand(shape[:3] + (1,), generator=gen) < 0.4
        drop[..., 0, :] = True  # always at least one empty row
        part = part & ~drop
        full = full & ~drop
    elif kind == "above_only":
        above = ~vis & (torch.rand(shape, generator=gen) < 0.7)
        only = torch.rand(shape[:3] + (1,), generator=gen) < 0.5
        only[..., 0, :] = True
        part = torch.where(only, above, part | above)
        full = full & ~only
    bm = block_mask_from_maps(part, full, Sq, Sk, (bs_q, bs_kv), with_full_lists=with_full)
    return bm


def _run_case(name: str, c: dict, mode: str) -> dict:
    """mode: launcher with "ptr" / "tma" / "ptr_merged" / "tma_merged" (see FULL_MODES), or
    "op" (the public API)."""
    from prism.kernels.block_sparse import triton_fwd

    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    dt = getattr(torch, c["dtype"])
    B, Hq, Hkv, Sq, Sk, D = c["B"], c["Hq"], c["Hkv"], c["Sq"], c["Sk"], c["D"]
    q = torch.randn(B, Hq, Sq, D, generator=gen).to(dt)
    k = torch.randn(B, Hkv, Sk, D, generator=gen).to(dt)
    v = torch.randn(B, Hkv, Sk, D, generator=gen).to(dt)
    bm = build_case_mask(c, gen)
    scale = 0.7 / math.sqrt(D)  # a non-default scale
    ref, ref_lse = naive_block_sparse_attention(
        q, k, v, bm, scale=scale, return_lse=True, compute_dtype=torch.float64
    )
    if mode == "op":
        out, lse = block_sparse_attention(q, k, v, bm, scale=scale, return_lse=True)
    else:
        cfg = None
        if "config" in c:
            cfg = triton_fwd.KernelConfig(c["config"][0], c["config"][1], 4, 2)
        out = torch.full((B, Hq, Sq, D), float("nan"), dtype=dt)  # poisoned
        lse = torch.full((B, Hq, Sq), float("nan"), dtype=torch.float32)
        bs_q, bs_kv = bm.BLOCK_SIZE
        triton_fwd.block_sparse_attention_triton(
            q,
            k,
            v,
            bm.kv_num_blocks,
            bm.kv_indices,
            bm.full_kv_num_blocks,
            bm.full_kv_indices,
            bs_q,
            bs_kv,
            scale,
            True,
            config=cfg,
            use_tma=mode.startswith("tma"),
            merged=mode.endswith("merged"),
            out=out,
            lse=lse,
        )
    err = (out.double() - ref).abs()
    tol = (1e-5 + 1e-5 * ref.abs()) if dt == torch.float32 else (2e-3 + 2e-3 * ref.abs())
    fin = torch.isfinite(ref_lse)
    lse_err = (lse.double() - ref_lse)[fin].abs().max().item() if fin.any() else 0.0
    empty = ~fin
    return dict(
        name=name,
        mode=mode,
        out_dtype=str(out.dtype),
        nan=bool(torch.isnan(out).any() or torch.isnan(lse).any()),
        max_err=err.max().item(),
        within_tol=bool((err <= tol).all()),
        lse_err=lse_err,
        empty_rows=int(empty.sum()),
        empty_rows_zero=bool((out[empty] == 0).all()) and bool(torch.isneginf(lse[empty]).all()),
    )


def _worker() -> None:
    from prism.kernels.block_sparse import triton_fwd

    assert triton_fwd.interpreter_active(), "worker started without TRITON_INTERPRET=1"
    jobs = [(n, m) for m in FULL_MODES for n in CASES]
    jobs += [(n, m) for m in SUBSET_MODES for n in SUBSET_CASES]
    jobs += [(n, "op") for n in OP_CASES]
    for name, mode in jobs:
        try:
            res = _run_case(name, CASES[name], mode)
        except Exception as e:  # report, do not die: the other cases still run
            res = dict(name=name, mode=mode, error=f"{type(e).__name__}: {e}")
        print("RESULT " + json.dumps(res), flush=True)


@pytest.fixture(scope="module")
def interp_results():
    pytest.importorskip("triton")
    env = dict(
        os.environ,
        TRITON_INTERPRET="1",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [sys.executable, __file__, "--worker"],
        env=env,
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=600,
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            results[(r["name"], r["mode"])] = r
    if not results:
        pytest.fail(
            f"interpreter worker produced no results (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return results


def _check(r: dict, dtype: str):
    assert "error" not in r, r.get("error")
    assert not r["nan"], f"NaN in output/lse (unwritten element?): {r}"
    assert r["within_tol"], f"max error {r['max_err']:.3e} beyond tolerance: {r}"
    assert r["lse_err"] < (1e-5 if dtype == "float32" else 1e-3), r
    assert r["empty_rows_zero"], r
    assert r["out_dtype"] == f"torch.{dtype}"


@pytest.mark.parametrize(
    "name,mode",
    [(n, m) for m in FULL_MODES for n in CASES]
    + [(n, m) for m in SUBSET_MODES for n in SUBSET_CASES],
)
def test_interpreter_kernel_vs_naive(interp_results, name, mode):
    r = interp_results[(name, mode)]
    _check(r, CASES[name]["dtype"])
    if CASES[name]["kind"] in ("empty_rows", "above_only"):
        assert r["empty_rows"] > 0


@pytest.mark.parametrize("name", OP_CASES)
def test_interpreter_public_op_vs_naive(interp_results, name):
    _check(interp_results[(name, "op")], CASES[name]["dtype"])


# ----------------------------------------------------------------------------------------------
# In-process tests (no interpreter): reference, fallback op path, validation, compile tracing.
# ----------------------------------------------------------------------------------------------


def _qkv(B, Hq, Hkv, Sq, Sk, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, Hq, Sq, D, generator=g).to(dtype),
        torch.randn(B, Hkv, Sk, D, generator=g).to(dtype),
        torch.randn(B, Hkv, Sk, D, generator=g).to(dtype),
    )


@pytest.mark.parametrize("Sq,Sk,bs", [(300, 300, 128), (200, 500, 64), (256, 512, 128)])
def test_naive_dense_equals_causal_sdpa(Sq, Sk, bs):
    B, Hq, Hkv, D = 2, 4, 2, 64
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, D, torch.float64)
    vis, diag = causal_block_maps(Sq, Sk, bs)
    shape = (B, Hq) + tuple(vis.shape)
    bm = block_mask_from_maps(diag.expand(shape), (vis & ~diag).expand(shape), Sq, Sk, bs)
    out = naive_block_sparse_attention(q, k, v, bm, compute_dtype=torch.float64)
    allowed = torch.arange(Sq)[:, None] + (Sk - Sq) >= torch.arange(Sk)[None, :]
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=allowed
    )
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_random_mask_density_and_diagonal():
    bm, dens = random_causal_block_mask(
        1, 2, 1024, 1024, 128, 0.3, torch.Generator().manual_seed(1)
    )
    assert 0.15 < dens < 0.45
    from prism.kernels.block_sparse import dense_block_maps

    part, full = dense_block_maps(bm)
    assert torch.equal(part[0, 0], torch.eye(8, dtype=torch.bool))  # the diagonal, partial
    assert not (part & full).any()


def test_op_cpu_fallback_matches_naive():
    """Without the interpreter the op runs the naive path (documented CPU fallback)."""
    from prism.kernels.block_sparse.triton_fwd import interpreter_active

    if interpreter_active():
        pytest.skip("interpreter active in this process: the op would run the kernel")
    q, k, v = _qkv(2, 4, 2, 200, 260, 64, torch.float16)
    bm, _ = random_causal_block_mask(2, 4, 200, 260, 64, 0.5, torch.Generator().manual_seed(2))
    out, lse = block_sparse_attention(q, k, v, bm, return_lse=True)
    ref, rlse = naive_block_sparse_attention(q, k, v, bm, return_lse=True)
    assert out.dtype == torch.float16 and out.shape == q.shape and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(lse, rlse)


def test_compile_fullgraph_traces_op():
    """The op has a fake impl: a model calling it traces with fullgraph=True (aot_eager on CPU)."""
    q, k, v = _qkv(1, 4, 2, 128, 192, 64, torch.float32)
    bm, _ = random_causal_block_mask(1, 4, 128, 192, 64, 0.5, torch.Generator().manual_seed(3))

    def f(q, k, v):
        return block_sparse_attention(q, k, v, bm, return_lse=True)

    out, lse = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    ref, rlse = naive_block_sparse_attention(q, k, v, bm, return_lse=True)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, rlse, rtol=1e-4, atol=1e-4)


def test_opcheck():
    q, k, v = _qkv(1, 2, 1, 100, 140, 32, torch.float32)
    bm, _ = random_causal_block_mask(1, 2, 100, 140, 64, 0.5, torch.Generator().manual_seed(4))
    args = (
        q,
        k,
        v,
        bm.kv_num_blocks,
        bm.kv_indices,
        bm.full_kv_num_blocks,
        bm.full_kv_indices,
        64,
        64,
        0.125,
        True,
    )
    torch.library.opcheck(
        torch.ops.prism.block_sparse_attn_fwd.default,
        args,
        test_utils=("test_schema", "test_faketensor"),
    )


def _valid():
    q, k, v = _qkv(1, 4, 2, 128, 128, 64, torch.float16)
    bm, _ = random_causal_block_mask(1, 4, 128, 128, 64, 1.0, torch.Generator().manual_seed(5))
    return q, k, v, bm


def test_validation_errors():
    q, k, v, bm = _valid()
    with pytest.raises(ValueError, match="rank 4"):
        block_sparse_attention(q[0], k, v, bm)
    with pytest.raises(TypeError, match="share a dtype"):
        block_sparse_attention(q, k.float(), v, bm)
    with pytest.raises(TypeError, match="not supported"):
        block_sparse_attention(q.double(), k.double(), v.double(), bm)
    with pytest.raises(TypeError, match="torch.Tensor"):
        block_sparse_attention(q.numpy(), k, v, bm)
    with pytest.raises(ValueError, match="GQA"):
        q3, k3, v3 = _qkv(1, 4, 3, 128, 128, 64, torch.float16)
        block_sparse_attention(q3, k3, v3, bm)
    with pytest.raises(ValueError, match="must not exceed"):
        qs, ks, vs = _qkv(1, 4, 2, 128, 64, 64, torch.float16)
        block_sparse_attention(qs, ks, vs, bm)
    with pytest.raises(ValueError, match="head dim"):
        qd, kd, vd = _qkv(1, 4, 2, 128, 128, 48, torch.float16)
        block_sparse_attention(qd, kd, vd, bm)
    with pytest.raises(ValueError, match="seq_lengths"):
        qq, kk, vv = _qkv(1, 4, 2, 100, 128, 64, torch.float16)
        block_sparse_attention(qq, kk, vv, bm)
    with pytest.raises(ValueError, match="batch"):
        qb, kb, vb = _qkv(2, 4, 2, 128, 128, 64, torch.float16)
        bm3, _ = random_causal_block_mask(3, 4, 128, 128, 64, 1.0)
        block_sparse_attention(qb, kb, vb, bm3)
    with pytest.raises(ValueError, match="Hq=4"):
        bmh, _ = random_causal_block_mask(1, 2, 128, 128, 64, 1.0)  # H = Hkv: rejected
        block_sparse_attention(q, k, v, bmh)
    with pytest.raises(ValueError, match="BLOCK_SIZE"):
        bm24, _ = random_causal_block_mask(1, 4, 128, 128, 24, 1.0)
        block_sparse_attention(q, k, v, bm24)
    with pytest.raises(ValueError, match="scale"):
        block_sparse_attention(q, k, v, bm, scale=-0.1)
    with pytest.raises(ValueError, match="k and v"):
        block_sparse_attention(q, k, v[:, :, :64], bm)


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
