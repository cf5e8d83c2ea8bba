"""Backends on the same selection: flex (compiled FlexAttention, CPU) vs the fp32 reference,
and the reference itself vs plain masked SDPA built from the selection in the test."""

import pytest
import torch
import torch.nn.functional as F

import prism
from prism.synthetic import synthetic_qkv
from prism.testing import dense_causal_attention

CASES = [  # (B, Hq, Hkv, Sq, Sk, D)
    (2, 8, 2, 127, 127, 64),
    (2, 8, 2, 1000, 1000, 64),
    (1, 4, 4, 300, 1000, 128),
    (2, 4, 1, 256, 1280, 64),
    (1, 8, 2, 4097, 4097, 64),
]


def token_mask(sel: prism.BlockSelection) -> torch.Tensor:
    """[B, Hq, Sq, Sk] allowed = selected block AND causal AND inside the sequence (plain)."""
    sq, sk, bs = sel.q_len, sel.kv_len, sel.block_size
    qb = torch.arange(sq) // bs
    kb = torch.arange(sk) // bs
    m = sel.mask[:, :, qb][:, :, :, kb]
    causal = (torch.arange(sq)[:, None] + sk - sq) >= torch.arange(sk)[None, :]
    return m & causal


def masked_sdpa(q, k, v, allowed):
    g = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), kk) * q.shape[-1] ** -0.5
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.nan_to_num(s.softmax(-1), nan=0.0)
    return torch.einsum("bhqk,bhkd->bhqd", p, vv)


def dense_causal(q, k, v):
    """float64 causal SDPA with the cached prefix."""
    return dense_causal_attention(q.double(), k.double(), v.double())


def inputs(b, hq, hkv, sq, sk, d, seed=0, dtype=torch.float32):
    return synthetic_qkv(b, hq, hkv, sk, d, q_len=sq, seed=seed, dtype=dtype)


@pytest.mark.parametrize("case", CASES)
def test_reference_backend_matches_masked_sdpa(case):
    q, k, v = inputs(*case)
    sel = prism.build_scorer("prism", threshold=0.8)(q, k)
    out = prism.sparse_attention(q, k, v, backend="reference", selection=sel)
    want = masked_sdpa(q, k, v, token_mask(sel))
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_flex_matches_reference_fp32(case):
    q, k, v = inputs(*case)
    sel = prism.build_scorer("prism", threshold=0.8)(q, k)
    assert sel.density < 1.0 or case[4] < 300
    ref = prism.sparse_attention(q, k, v, backend="reference", selection=sel)
    out = prism.sparse_attention(q, k, v, backend="flex", selection=sel)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_flex_rows_without_keys_are_zero():
    q, k, v = inputs(1, 2, 1, 512, 512, 64)
    sel = prism.build_scorer("window", window=1, force_sink=False, force_diagonal=False)(q, k)
    sel.mask[:, :, 2] = False  # query block 2 sees nothing
    out = prism.sparse_attention(q, k, v, backend="flex", selection=sel)
    ref = prism.sparse_attention(q, k, v, backend="reference", selection=sel)
    assert out[:, :, 256:384].abs().max() == 0
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_flex_bf16_within_bf16_error():
    q, k, v = inputs(2, 8, 2, 1000, 1500, 64, dtype=torch.bfloat16)
    sel = prism.build_scorer("prism", threshold=0.9)(q, k)
    exact = masked_sdpa(q, k, v, token_mask(sel))
    out = prism.sparse_attention(q, k, v, backend="flex", selection=sel).double()
    # a same-dtype PyTorch computation, for the bf16 error scale
    allowed = token_mask(sel)
    g = 4
    same = F.scaled_dot_product_attention(
        q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=allowed
    ).double()
    err = (out - exact).norm() / exact.norm()
    err_same = (same - exact).norm() / exact.norm()
    assert err < max(2 * err_same, 1e-3), (err, err_same)


@pytest.mark.parametrize("case", CASES[:4])
@pytest.mark.parametrize("backend", ["flex", "reference"])
@pytest.mark.parametrize("scorer", ["prism", "meanpool"])
def test_threshold_one_equals_dense_causal(case, backend, scorer):
    q, k, v = inputs(*case)
    out = prism.sparse_attention(q, k, v, scorer=scorer, backend=backend, threshold=1.0)
    torch.testing.assert_close(out.double(), dense_causal(q, k, v), atol=1e-4, rtol=1e-4)


def test_module_api_and_union_config():
    q, k, v = inputs(1, 8, 2, 1000, 1000, 64)
    attn = prism.SparseAttention(
        scorer="union",
        backend="flex",
        policies=[{"scorer": "prism", "threshold": 0.9}, {"scorer": "window", "window": 2}],
    )
    out = attn(q, k, v)
    assert out.shape == q.shape
    sel = attn.last_selection
    assert 0 < sel.density < 1
    ref = prism.sparse_attention(q, k, v, backend="reference", selection=sel)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_block_mask_shape_and_roundtrip():
    q, k, _ = inputs(2, 8, 2, 300, 1000, 64)
    sel = prism.build_scorer("prism", threshold=0.9)(q, k)
    bm = sel.block_mask(300, 1000)
    assert bm.kv_num_blocks.shape == (2, 8, 3)
    assert bm.full_kv_num_blocks is not None
    from prism.masks import block_mask_to_bool

    partial, full = block_mask_to_bool(bm)
    assert torch.equal(partial | full, sel.mask)
    assert not (partial & full).any()
    _, geom_partial = sel.causal()
    assert torch.equal(partial, sel.mask & geom_partial)


def test_flex_never_silently_runs_dense_after_many_recompiles():
    """Past Dynamo's recompile limit a compiled function runs eagerly, and eager flex_attention
    ignores the block lists (a sparse mask silently runs dense). The flex backend raises the limit
    for its own calls; here the user's global limit is 1 and three variants must all stay sparse."""
    import torch._dynamo.config as dcfg

    name = "recompile_limit" if hasattr(dcfg, "recompile_limit") else "cache_size_limit"
    with dcfg.patch(**{name: 1}):
        for d, dtype in ((32, torch.float32), (64, torch.float32), (32, torch.bfloat16)):
            q, k, v = inputs(1, 4, 2, 512, 512, d, dtype=dtype)
            sel = prism.build_scorer("window", window=1)(q, k)
            assert sel.density < 0.7
            out = prism.sparse_attention(q, k, v, backend="flex", selection=sel).float()
            ref = prism.sparse_attention(q, k, v, backend="reference", selection=sel).float()
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
            torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
