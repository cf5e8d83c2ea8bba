"""Rectangular blocks (``q_block_size``): query blocks of BSQ rows over KV blocks of BSK columns.

They exist for FlashAttention-4 on Hopper, which runs its 192 x 128 tile (its best for head dims
<= 64) only when the BlockMask's query block divides by 192. Checked here, on CPU:

* the block-causal geometry against a token-level brute force (which blocks any query sees,
  which ones the diagonal cuts), ragged lengths and a cached prefix;
* ``meanpool`` and ``prism``: the PyTorch path against the float64 loop references of
  ``naive_scorers`` at ``(BSQ, BSK)``, and the fused Triton estimator (interpreter) against the
  PyTorch path, masks and the four BlockMask lists exactly;
* the ``triton`` and ``flex`` backends on a rectangular BlockMask against the fp32 reference,
  and a full-coverage selection against dense causal SDPA;
* a patched Hugging Face model at threshold 1 equals the dense model;
* clear errors: an unsupported ``q_block_size``, and a scorer without rectangular support.
"""

from __future__ import annotations

import math

import pytest
import torch
from naive_scorers import naive_meanpool, naive_prism, naive_visible

import prism
from prism.kernels import get_backend, reference_attention
from prism.kernels.estimation import op
from prism.masks import block_causal, bool_to_block_lists
from prism.synthetic import synthetic_qkv

needs_interpreter = pytest.mark.skipif(
    not (op.triton_available() and op.interpreter_on()),
    reason="needs Triton's interpreter (TRITON_INTERPRET=1, no CUDA)",
)

# (Sq, Sk, BSQ, BSK): ragged, a cached prefix, a query block smaller than the KV block
GRIDS = [
    (1000, 1000, 192, 128),
    (777, 1301, 192, 128),
    (1537, 1537, 384, 128),
    (300, 1000, 192, 64),
    (1000, 1000, 64, 128),
    (1, 500, 192, 128),
]


def _brute_geometry(sq, sk, bq, bk):
    """visible: some query of the block sees some key of it; partial: visible and some
    (query, key) pair of the block is masked. Token by token."""
    nqb, nkb = math.ceil(sq / bq), math.ceil(sk / bk)
    p = sk - sq
    vis = torch.zeros(nqb, nkb, dtype=torch.bool)
    part = torch.zeros(nqb, nkb, dtype=torch.bool)
    for i in range(nqb):
        for j in range(nkb):
            seen = [
                p + t >= c
                for t in range(i * bq, min((i + 1) * bq, sq))
                for c in range(j * bk, min((j + 1) * bk, sk))
            ]
            vis[i, j] = any(seen)
            part[i, j] = any(seen) and not all(seen)
    return vis, part


@pytest.mark.parametrize("sq,sk,bq,bk", GRIDS)
def test_geometry_matches_token_level_brute_force(sq, sk, bq, bk):
    vis, part = block_causal(sq, sk, (bq, bk))
    bvis, bpart = _brute_geometry(sq, sk, bq, bk)
    assert torch.equal(vis, bvis)
    # a block whose last row is ragged is cut only if one of its *existing* pairs is masked;
    # the geometry's rule also marks the last block row's diagonal block partial (harmless:
    # partial blocks are masked token by token), so partial is a superset on the last row
    assert torch.equal(part[:-1], bpart[:-1]) and bool((part[-1] | ~bpart[-1]).all())
    nvis, npart = naive_visible(sq, sk, (bq, bk))
    assert torch.equal(vis, nvis) and torch.equal(part, npart)


def _qk(sq, sk, hq=6, hkv=2, d=64, b=2, seed=0):
    q, k, _ = synthetic_qkv(
        batch=b, q_heads=hq, kv_heads=hkv, length=sk, q_len=sq, head_dim=d, seed=seed
    )
    return q, k


@pytest.mark.parametrize("sq,sk,bq,bk", [g for g in GRIDS if g[0] > 1])
def test_torch_paths_match_the_float64_loop_references(sq, sk, bq, bk):
    q, k = _qk(sq, sk, b=1, seed=sq)
    kw = {"block_size": bk, "q_block_size": bq, "threshold": 0.9, "impl": "torch"}
    got = prism.build_scorer("meanpool", **kw)(q, k)
    assert got.block_size == (bq, bk) or bq == bk
    ref = naive_meanpool(q, k, bs=(bq, bk), p=0.9)
    assert torch.equal(got.mask, ref)
    got = prism.build_scorer("prism", **kw)(q, k).mask
    ref = naive_prism(q, k, bs=(bq, bk), p_high=0.9, p_low=0.9)
    assert torch.equal(got, ref)


@needs_interpreter
@pytest.mark.parametrize("scorer", ["prism", "meanpool"])
@pytest.mark.parametrize("sq,sk,bq,bk", GRIDS)
def test_fused_estimator_matches_torch_path(scorer, sq, sk, bq, bk):
    q, k = _qk(sq, sk, seed=sk)
    kw = {"block_size": bk, "q_block_size": bq, "threshold": 0.85}
    fused = prism.build_scorer(scorer, impl="triton", **kw)
    sel = fused(q, k)
    assert fused.last_path == "triton" and sel.stored_as == "lists"
    ref = prism.build_scorer(scorer, impl="torch", **kw)(q, k).mask
    assert sel.mask.shape == (2, 6, math.ceil(sq / bq), math.ceil(sk / bk))
    assert torch.equal(sel.mask, ref)
    _, part = block_causal(sq, sk, (bq, bk))
    lists = bool_to_block_lists(ref & part) + bool_to_block_lists(ref & ~part)
    for got, exp in zip(sel.lists, lists):
        assert torch.equal(got, exp)


@pytest.mark.parametrize("backend", ["triton", "flex", "reference"])
@pytest.mark.parametrize("sq,sk", [(1000, 1000), (777, 1301)])
def test_backends_on_a_rectangular_block_mask(backend, sq, sk):
    if backend == "triton" and not (op.triton_available() and op.interpreter_on()):
        pytest.skip("the Triton kernel on CPU needs the interpreter")
    torch.manual_seed(0)
    q, k = _qk(sq, sk, b=2, seed=1)
    v = torch.randn_like(k)
    sel = prism.build_scorer("meanpool", q_block_size=192, threshold=0.8, impl="torch")(q, k)
    assert 0 < sel.density < 1
    bm = sel.block_mask()
    assert tuple(bm.BLOCK_SIZE) == (192, 128)
    ref = reference_attention(q.double(), k.double(), v.double(), bm).float()
    out = get_backend(backend)(q, k, v, bm)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=5e-5, rtol=0)
    # full coverage over the rectangular grid is dense causal attention
    full = prism.build_scorer("meanpool", q_block_size=192, threshold=1.0, impl="torch")(q, k)
    g = q.shape[1] // k.shape[1]
    allowed = (sk - sq + torch.arange(sq)[:, None]) >= torch.arange(sk)[None, :]
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.double(),
        k.double().repeat_interleave(g, 1),
        v.double().repeat_interleave(g, 1),
        attn_mask=allowed,
    ).float()
    out = get_backend(backend)(q, k, v, full.block_mask())
    torch.testing.assert_close(out, dense, atol=5e-5, rtol=0)


def test_patched_model_at_full_coverage_is_dense():
    from prism.eval.modeling import tiny_llama

    model = tiny_llama().eval()
    ids = torch.randint(0, 512, (2, 1000), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        prism.patch_model(model, scorer="prism", q_block_size=192, threshold=1.0, min_len=1,
                          impl="torch", backend="flex")  # fmt: skip
        try:
            from prism.integrations.hf import get_policy

            assert get_policy(model).scorer.block_size == (192, 128)  # the grid reached the layers
            with prism.collect_stats(model) as st:
                out = model(ids).logits
        finally:
            prism.unpatch_model(model)
    assert st.overall_density == 1.0 and sum(s.sparse_calls for s in st.layers.values()) > 0
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_errors_are_clear():
    with pytest.raises(ValueError, match=r"unsupported q_block_size 100; 0 \(= block_size\)"):
        prism.build_scorer("prism", q_block_size=100)
    with pytest.raises(
        ValueError, match=r"does not support q_block_size=192.*\['meanpool', 'prism'"
    ):
        prism.build_scorer("xattn", q_block_size=192)
    # the same size as block_size is square, accepted everywhere
    assert prism.build_scorer("xattn", q_block_size=128).block_size == 128


@pytest.mark.gpu
@pytest.mark.parametrize("sq,sk", [(8192, 8192), (4097, 6000)])
def test_rectangular_blocks_on_the_gpu(sq, sk):
    """CUDA, bf16: the fused estimator at 192 x 128 against the PyTorch path (rows may differ
    only at summation-order ties), and ``flex`` (FA4 where installed: its 192 x 128 tile) against
    the fp32 reference on the estimator's own mask."""
    q, k = _qk(sq, sk, hq=9, hkv=3, b=1, seed=3)
    q, k = q.cuda().bfloat16(), k.cuda().bfloat16()
    v = torch.randn_like(k)
    kw = {"q_block_size": 192, "threshold": 0.9}
    sel = prism.build_scorer("prism", impl="triton", **kw)(q, k)
    ref = prism.build_scorer("prism", impl="torch", **kw)(q, k).mask
    rows = int((sel.mask != ref).any(-1).sum())
    assert rows <= max(1, ref.shape[1] * ref.shape[2] // 1000), f"{rows} rows differ"
    # the kernel's own split: the diagonal-cut blocks partial, every other selected block full
    _, part = block_causal(sq, sk, (192, 128), q.device)
    split = bool_to_block_lists(sel.mask & part) + bool_to_block_lists(sel.mask & ~part)
    for got, exp in zip(sel.lists, split):
        assert torch.equal(got, exp)
    bm = sel.block_mask()
    assert tuple(bm.BLOCK_SIZE) == (192, 128) and 0 < sel.density < 1
    exp = reference_attention(q.float(), k.float(), v.float(), bm)
    for backend in ("flex", "flex_triton", "triton"):
        out = get_backend(backend)(q, k, v, bm).float()
        assert torch.isfinite(out).all()
        assert (out - exp).abs().max().item() < 2e-2, backend


@pytest.mark.gpu
@pytest.mark.parametrize("bq,bk", [(192, 128), (192, 64), (384, 128)])
def test_flex_triton_tiles_a_rectangular_grid_on_the_gpu(bq, bk):
    """FlexAttention's Triton backend needs a kernel tile dividing both block sizes (a power of
    two): ``flex_triton`` on rectangular BlockMasks against the fp32 reference, fp32 and bf16."""
    q, k = _qk(1000, 1301, hq=6, hkv=2, b=2, seed=4)
    v = torch.randn_like(k)
    kw = {"block_size": bk, "q_block_size": bq, "threshold": 0.8, "impl": "torch"}
    bm = prism.build_scorer("meanpool", **kw)(q, k).block_mask()
    bm = bm.to("cuda")
    for dt, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        qq, kk, vv = (t.cuda().to(dt) for t in (q, k, v))
        exp = reference_attention(qq.float(), kk.float(), vv.float(), bm)
        out = get_backend("flex_triton")(qq, kk, vv, bm).float()
        assert (out - exp).abs().max().item() < tol


def test_recall_needs_the_selections_grid():
    """attention_recall refuses a mass computed on another block grid (a rectangular selection
    with a single query block would otherwise broadcast into a wrong recall)."""
    from prism.metrics import attention_recall, block_attention_mass

    q, k = _qk(150, 150, b=1, seed=5)
    sel = prism.build_scorer("meanpool", q_block_size=192, impl="torch")(q, k)
    assert sel.mask.shape[-2:] == (1, 2)
    with pytest.raises(ValueError, match="block grid"):
        attention_recall(block_attention_mass(q, k, 128), sel)
    rec = attention_recall(block_attention_mass(q, k, sel.block_size), sel)
    assert rec.shape == (1, 6) and bool((rec > 0).all()) and bool((rec <= 1 + 1e-6).all())
