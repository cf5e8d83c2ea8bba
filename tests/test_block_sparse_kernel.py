"""CPU tests of the Triton block-sparse attention forward (backend "triton").

The kernel runs in-process under Triton's interpreter, which ``conftest.py`` switches on
(``TRITON_INTERPRET=1``) before Triton is first imported when there is no CUDA; the interpreter
cases skip when it is not active (a CUDA machine runs ``test_block_sparse_gpu.py`` instead). Every
case compares with the oracle (:func:`prism.kernels.reference.reference_attention`, float64),
which is itself checked against masked SDPA built from the dense block maps.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from prism.kernels.block_sparse import block_sparse_attention, naive_block_sparse_attention
from prism.kernels.reference import dense_block_maps, reference_attention
from prism.testing import (
    block_mask_from_maps,
    causal_block_maps,
    dense_causal_attention,
    random_causal_block_mask,
)

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
    """(partial, full, block_mask) for a case: dense bool maps [Bm, Hm, NQB, NKB] and the
    BlockMask built from them (without full lists for ``partial_only``)."""
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
    return part, full, bm


def _case_inputs(name: str, c: dict):
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    dt = getattr(torch, c["dtype"])
    B, Hq, Hkv, Sq, Sk, D = c["B"], c["Hq"], c["Hkv"], c["Sq"], c["Sk"], c["D"]
    q = torch.randn(B, Hq, Sq, D, generator=gen).to(dt)
    k = torch.randn(B, Hkv, Sk, D, generator=gen).to(dt)
    v = torch.randn(B, Hkv, Sk, D, generator=gen).to(dt)
    part, full, bm = build_case_mask(c, gen)
    return q, k, v, part, full, bm


def _interpreter():
    """The Triton launcher module, or skip: these cases need Triton's interpreter in-process."""
    pytest.importorskip("triton")
    from prism.kernels.block_sparse import triton_fwd

    if not triton_fwd.interpreter_active():
        pytest.skip(
            "Triton's interpreter is not active in this process (conftest sets "
            "TRITON_INTERPRET=1 only without CUDA; GPUs run test_block_sparse_gpu.py)"
        )
    return triton_fwd


def _check_against_oracle(name: str, c: dict, mode: str) -> None:
    """mode: launcher with "ptr" / "tma" / "ptr_merged" / "tma_merged" (see FULL_MODES), or
    "op" (the public API)."""
    triton_fwd = _interpreter()
    dt = getattr(torch, c["dtype"])
    q, k, v, _, _, bm = _case_inputs(name, c)
    B, Hq, Sq, D = q.shape
    scale = 0.7 / math.sqrt(D)  # a non-default scale
    ref, ref_lse = reference_attention(
        q, k, v, bm, scale, return_lse=True, compute_dtype=torch.float64
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
    assert out.dtype == dt and lse.dtype == torch.float32
    assert not torch.isnan(out).any(), "NaN in out (an element the kernel never wrote?)"
    assert not torch.isnan(lse).any(), "NaN in lse (an element the kernel never wrote?)"
    err = (out.double() - ref).abs()
    tol = (1e-5 + 1e-5 * ref.abs()) if dt == torch.float32 else (2e-3 + 2e-3 * ref.abs())
    assert (err <= tol).all(), f"max error {err.max().item():.3e} beyond tolerance"
    fin = torch.isfinite(ref_lse)
    if fin.any():
        lse_err = (lse.double() - ref_lse)[fin].abs().max().item()
        assert lse_err < (1e-5 if dt == torch.float32 else 1e-3), lse_err
    empty = ~fin
    assert (out[empty] == 0).all() and torch.isneginf(lse[empty]).all()
    if c["kind"] in ("empty_rows", "above_only"):
        assert empty.any()


@pytest.mark.parametrize(
    "name,mode",
    [(n, m) for m in FULL_MODES for n in CASES]
    + [(n, m) for m in SUBSET_MODES for n in SUBSET_CASES],
)
def test_interpreter_kernel_vs_oracle(name, mode):
    _check_against_oracle(name, CASES[name], mode)


@pytest.mark.parametrize("name", OP_CASES)
def test_interpreter_public_op_vs_oracle(name):
    _check_against_oracle(name, CASES[name], "op")


# ----------------------------------------------------------------------------------------------
# The oracle itself, the fallback op path, validation, compile tracing.
# ----------------------------------------------------------------------------------------------


def _qkv(B, Hq, Hkv, Sq, Sk, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, Hq, Sq, D, generator=g).to(dtype),
        torch.randn(B, Hkv, Sk, D, generator=g).to(dtype),
        torch.randn(B, Hkv, Sk, D, generator=g).to(dtype),
    )


def _masked_sdpa_from_maps(q, k, v, part, full, bs_q, bs_kv, scale):
    """float64 SDPA with the token mask written out from the dense block maps (not the lists)."""
    B, Hq, Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    qb = torch.arange(Sq) // bs_q
    kb = torch.arange(Sk) // bs_kv
    part = part.expand(B, Hq, *part.shape[2:])[:, :, qb][..., kb]
    full = full.expand(B, Hq, *full.shape[2:])[:, :, qb][..., kb]
    causal = torch.arange(Sq)[:, None] + (Sk - Sq) >= torch.arange(Sk)[None, :]
    allowed = full | (part & causal)
    g = Hq // Hkv
    kk, vv = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), kk) * scale
    p = s.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)  # empty rows -> 0
    return torch.einsum("bhqk,bhkd->bhqd", p, vv)


@pytest.mark.parametrize(
    "name",
    [
        "fp32_ragged127_d64",
        "fp16_partial_only",
        "fp16_full_only",
        "fp16_empty_rows",
        "fp32_above_only",
        "fp16_mask_broadcast_b1h1",
        "fp16_block_128x64",
        "fp16_prefix_ragged",
    ],
)
def test_oracle_matches_masked_sdpa(name):
    c = CASES[name]
    q, k, v, part, full, bm = _case_inputs(name, c)
    q, k, v = q.double(), k.double(), v.double()
    bs_q, bs_kv = bm.BLOCK_SIZE
    scale = 0.7 / math.sqrt(q.shape[-1])
    want = _masked_sdpa_from_maps(q, k, v, part, full, bs_q, bs_kv, scale)
    for chunk in (None, 37):  # one step, and steps that cut query blocks
        out, lse = reference_attention(q, k, v, bm, scale, chunk, return_lse=True)
        assert out.dtype == torch.float64 and lse.dtype == torch.float64
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    empty = torch.isneginf(lse)
    assert (out[empty] == 0).all()
    # the float32 alias: same numbers in float32
    out32 = naive_block_sparse_attention(q.float(), k.float(), v.float(), bm, scale)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), want, rtol=1e-4, atol=1e-4)


def test_oracle_accepts_narrow_index_lists():
    """Index lists narrower than NKB (only the first ``num`` entries are read) give the same maps."""
    from torch.nn.attention.flex_attention import BlockMask

    q, k, v = _qkv(1, 2, 1, 300, 300, 64, torch.float64)
    bm, _ = random_causal_block_mask(1, 2, 300, 300, 64, 0.5, torch.Generator().manual_seed(7))
    w = max(int(bm.kv_num_blocks.max()), int(bm.full_kv_num_blocks.max()))
    assert w < bm.kv_indices.shape[-1]
    narrow = BlockMask.from_kv_blocks(
        bm.kv_num_blocks,
        bm.kv_indices[..., :w].contiguous(),
        bm.full_kv_num_blocks,
        bm.full_kv_indices[..., :w].contiguous(),
        BLOCK_SIZE=64,
        mask_mod=bm.mask_mod,
        seq_lengths=(300, 300),
        compute_q_blocks=False,
    )
    for a, b in zip(dense_block_maps(narrow), dense_block_maps(bm)):
        assert torch.equal(a, b)
    torch.testing.assert_close(
        reference_attention(q, k, v, narrow), reference_attention(q, k, v, bm)
    )


@pytest.mark.parametrize("Sq,Sk,bs", [(300, 300, 128), (200, 500, 64), (256, 512, 128)])
def test_oracle_dense_equals_causal_sdpa(Sq, Sk, bs):
    B, Hq, Hkv, D = 2, 4, 2, 64
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, D, torch.float64)
    vis, diag = causal_block_maps(Sq, Sk, bs)
    shape = (B, Hq) + tuple(vis.shape)
    bm = block_mask_from_maps(diag.expand(shape), (vis & ~diag).expand(shape), Sq, Sk, bs)
    out = naive_block_sparse_attention(q, k, v, bm, compute_dtype=torch.float64)
    allowed = torch.arange(Sq)[:, None] + (Sk - Sq) >= torch.arange(Sk)[None, :]
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=allowed
    )
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dense_causal_attention(q, k, v), ref, rtol=1e-12, atol=1e-12)


def test_random_mask_density_and_diagonal():
    bm, dens = random_causal_block_mask(
        1, 2, 1024, 1024, 128, 0.3, torch.Generator().manual_seed(1)
    )
    assert 0.15 < dens < 0.45
    part, full = dense_block_maps(bm)
    assert torch.equal(part[0, 0], torch.eye(8, dtype=torch.bool))  # the diagonal, partial
    assert not (part & full).any()


def test_op_cpu_fallback_matches_masked_sdpa(monkeypatch):
    """Without the interpreter (forced here) the op runs the float32 oracle (documented CPU
    fallback), cast back to the input dtype."""
    from prism.kernels.block_sparse import op

    monkeypatch.setattr(op, "_use_triton", lambda device: False)
    q, k, v = _qkv(2, 4, 2, 200, 260, 64, torch.float16)
    bm, _ = random_causal_block_mask(2, 4, 200, 260, 64, 0.5, torch.Generator().manual_seed(2))
    part, full = dense_block_maps(bm)
    out, lse = block_sparse_attention(q, k, v, bm, return_lse=True)
    assert out.dtype == torch.float16 and out.shape == q.shape and lse.dtype == torch.float32
    want = _masked_sdpa_from_maps(q, k, v, part, full, 64, 64, 64**-0.5)
    torch.testing.assert_close(out.double(), want, rtol=2e-3, atol=2e-3)
    _, rlse = reference_attention(q, k, v, bm, return_lse=True)
    torch.testing.assert_close(lse, rlse)


def test_compile_fullgraph_traces_op():
    """The op has a fake impl: a model calling it traces with fullgraph=True (aot_eager on CPU)."""
    q, k, v = _qkv(1, 4, 2, 128, 192, 64, torch.float32)
    bm, _ = random_causal_block_mask(1, 4, 128, 192, 64, 0.5, torch.Generator().manual_seed(3))

    def f(q, k, v):
        return block_sparse_attention(q, k, v, bm, return_lse=True)

    out, lse = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    ref, rlse = reference_attention(q, k, v, bm, return_lse=True)
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
