"""GPU tests of the Triton block-sparse attention forward (marked ``gpu``; skipped without CUDA).

bf16 criterion (DESIGN §8): the kernel's error against a float32 reference is at most ~2x the
error of a same-dtype PyTorch computation (SDPA in bf16/fp16 with the equivalent token mask).
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from prism.kernels.block_sparse import (  # noqa: E402
    block_sparse_attention,
    dense_block_maps,
    naive_block_sparse_attention,
)
from prism.testing import (  # noqa: E402
    block_mask_from_maps,
    causal_block_maps,
    random_causal_block_mask,
)


def _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda H, S: torch.randn(B, H, S, D, generator=g, device="cuda", dtype=torch.float32).to(
        dtype
    )
    return mk(Hq, Sq), mk(Hkv, Sk), mk(Hkv, Sk)


def _token_mask(bm, B, Hq, Sq, Sk):
    """bool [B, Hq, Sq, Sk] equivalent of the block lists (for the same-dtype SDPA baseline)."""
    bs_q, bs_kv = bm.BLOCK_SIZE
    part, full = dense_block_maps(bm)
    nqb = -(-Sq // bs_q)
    part, full = part[:, :, :nqb].expand(B, Hq, -1, -1), full[:, :, :nqb].expand(B, Hq, -1, -1)
    qi = torch.arange(Sq, device="cuda") // bs_q
    ki = torch.arange(Sk, device="cuda") // bs_kv
    causal = (torch.arange(Sq, device="cuda")[:, None] + Sk - Sq) >= torch.arange(
        Sk, device="cuda"
    )[None, :]
    p = part[:, :, qi][:, :, :, ki]
    f = full[:, :, qi][:, :, :, ki]
    return f | (p & causal)


CASES = [
    # B, Hq, Hkv, Sq, Sk, D, bs, dtype, density, mask_bh
    (2, 8, 2, 3000, 3000, 128, 128, torch.bfloat16, 0.3, None),
    (1, 4, 4, 1500, 4100, 64, 64, torch.float16, 0.4, None),
    (2, 8, 2, 2048, 2048, 64, 128, torch.bfloat16, 0.5, (1, 1)),
    (1, 32, 8, 8192, 8192, 128, 128, torch.bfloat16, 0.2, None),
    (1, 6, 2, 1000, 1300, 128, 64, torch.bfloat16, 1.0, None),
]


@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: f"B{c[0]}H{c[1]}/{c[2]}S{c[3]}/{c[4]}D{c[5]}bs{c[6]}{str(c[7])[6:]}d{c[8]}",
)
def test_gpu_kernel_vs_reference(case):
    B, Hq, Hkv, Sq, Sk, D, bs, dtype, density, mask_bh = case
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, seed=Sq + Sk)
    Bm, Hm = mask_bh or (B, Hq)
    g = torch.Generator(device="cuda").manual_seed(7)
    bm, _ = random_causal_block_mask(Bm, Hm, Sq, Sk, bs, density, g, device="cuda")
    scale = 1.0 / math.sqrt(D)
    out, lse = block_sparse_attention(q, k, v, bm, return_lse=True)
    torch.cuda.synchronize()
    ref, ref_lse = naive_block_sparse_attention(q, k, v, bm, scale=scale, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape
    assert not torch.isnan(out).any()
    err = (out.float() - ref).norm() / ref.norm()
    # same-dtype PyTorch computation of the same masked attention
    tm = _token_mask(bm, B, Hq, Sq, Sk)
    G = Hq // Hkv
    base = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=tm, scale=scale
    )
    base_err = (base.float() - ref).norm() / ref.norm()
    assert err <= 2 * base_err + 1e-4, (err.item(), base_err.item())
    fin = torch.isfinite(ref_lse)
    assert torch.equal(fin, torch.isfinite(lse))
    torch.testing.assert_close(lse[fin], ref_lse[fin], rtol=0, atol=2e-3)


def test_gpu_poisoned_output_and_empty_rows():
    from prism.kernels.block_sparse import triton_fwd

    B, Hq, Hkv, Sq, Sk, D, bs = 2, 4, 2, 1000, 1200, 128, 128
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, D, torch.bfloat16, seed=1)
    vis, diag = causal_block_maps(Sq, Sk, bs, device="cuda")
    shape = (B, Hq) + tuple(vis.shape)
    g = torch.Generator(device="cuda").manual_seed(3)
    full = vis & ~diag & (torch.rand(shape, generator=g, device="cuda") < 0.5)
    part = diag.expand(shape).clone()
    drop = torch.rand(shape[:3] + (1,), generator=g, device="cuda") < 0.3
    drop[:, :, 0] = True
    part, full = part & ~drop, full & ~drop
    bm = block_mask_from_maps(part, full, Sq, Sk, bs)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((B, Hq, Sq), float("nan"), device="cuda")
    triton_fwd.block_sparse_attention_triton(
        q,
        k,
        v,
        bm.kv_num_blocks,
        bm.kv_indices,
        bm.full_kv_num_blocks,
        bm.full_kv_indices,
        bs,
        bs,
        D**-0.5,
        True,
        out=out,
        lse=lse,
    )
    ref, ref_lse = naive_block_sparse_attention(q, k, v, bm, return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    empty = torch.isneginf(ref_lse)
    assert empty.any() and (out[empty] == 0).all() and torch.isneginf(lse[empty]).all()
    assert ((out.float() - ref).norm() / ref.norm()) < 1e-2


def test_gpu_full_density_equals_causal_sdpa():
    B, Hq, Hkv, S, D = 1, 8, 2, 4096, 128
    q, k, v = _qkv(B, Hq, Hkv, S, S, D, torch.bfloat16, seed=5)
    bm, dens = random_causal_block_mask(1, 1, S, S, 128, 1.0, device="cuda")
    assert dens == 1.0
    out = block_sparse_attention(q, k, v, bm)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(),
        k.float().repeat_interleave(4, 1),
        v.float().repeat_interleave(4, 1),
        is_causal=True,
    )
    assert ((out.float() - ref).norm() / ref.norm()) < 1e-2


def test_gpu_fp32_inputs():
    q, k, v = _qkv(1, 2, 1, 500, 700, 64, torch.float32, seed=9)
    bm, _ = random_causal_block_mask(
        1, 2, 500, 700, 64, 0.5, torch.Generator(device="cuda").manual_seed(1), device="cuda"
    )
    out = block_sparse_attention(q, k, v, bm)
    ref = naive_block_sparse_attention(q, k, v, bm)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_gpu_compile_fullgraph():
    B, Hq, Hkv, S, D = 1, 8, 2, 2048, 64
    q, k, v = _qkv(B, Hq, Hkv, S, S, D, torch.bfloat16, seed=11)
    bm, _ = random_causal_block_mask(
        B, Hq, S, S, 128, 0.4, torch.Generator(device="cuda").manual_seed(2), device="cuda"
    )
    w = torch.randn(D, D, device="cuda", dtype=torch.bfloat16) / 8

    def layer(q, k, v):
        o = block_sparse_attention(q @ w, k, v, bm)
        return o * 2 + 1

    eager = layer(q, k, v)
    compiled = torch.compile(layer, fullgraph=True)(q, k, v)
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)
