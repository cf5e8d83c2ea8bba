"""GPU tests of the fused Prism estimator (marker ``gpu``; skipped without CUDA).

Larger shapes than the interpreter tests, bf16 included: the compiled Triton kernels
(``impl="triton"``, and ``impl="auto"``, which picks them on CUDA) against the PyTorch path
(``impl="torch"``) on the same GPU inputs, and the lists through the Triton attention backend.
"""

from __future__ import annotations

import pytest
import torch

import prism
from prism.masks import block_causal, bool_to_block_lists
from prism.scorers.prism import PrismConfig, PrismScorer
from prism.synthetic import synthetic_qkv

pytestmark = pytest.mark.gpu


def _qk(b, hq, hkv, sq, sk, d, dtype, seed=0):
    q, k, v = synthetic_qkv(
        batch=b, q_heads=hq, kv_heads=hkv, length=sk, q_len=sq, head_dim=d, seed=seed
    )
    return q.cuda().to(dtype), k.cuda().to(dtype), v.cuda().to(dtype)


def _lists(mask, sq, sk, bs):
    _, part = block_causal(sq, sk, bs, mask.device)
    return bool_to_block_lists(mask & part) + bool_to_block_lists(mask & ~part)


CASES = [  # (B, Hq, Hkv, Sq, Sk, D, params)
    (1, 8, 2, 8192, 8192, 128, {}),
    (2, 8, 2, 4000, 4000, 64, {"threshold": 0.9}),
    (1, 4, 4, 3000, 8192, 128, {}),  # cached prefix, not a multiple of BS
    (1, 8, 1, 4096, 4096, 128, {"calibrate": False, "threshold_high": 0.8}),
    (1, 9, 3, 5000, 5000, 64, {"rope_layout": "interleaved"}),  # G = 3
    (1, 4, 2, 4096, 4096, 128, {"block_size": 64}),
]


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_fused_equals_unfused_fp32(case):
    b, hq, hkv, sq, sk, d, params = case
    q, k, _ = _qk(b, hq, hkv, sq, sk, d, torch.float32)
    ref = PrismScorer(**params, impl="torch")(q, k).mask
    sc = prism.build_scorer("prism", impl="triton", **params)
    sel = sc(q, k)
    assert sc.last_path == "triton" and sel.stored_as == "lists"
    assert torch.equal(sel.mask, ref)
    for got, exp in zip(sel.lists, _lists(ref, sq, sk, sc.config.block_size)):
        assert torch.equal(got, exp)


@pytest.mark.parametrize("sq,sk", [(16384, 16384), (6000, 20000)])
def test_fused_bf16_up_to_rounding(sq, sk):
    q, k, _ = _qk(1, 16, 4, sq, sk, 128, torch.bfloat16, seed=3)
    ref = PrismScorer(impl="torch")(q, k).mask
    got = prism.build_scorer("prism", impl="triton")(q, k).mask
    diff_rows = int((got != ref).any(-1).sum())
    # same fp32 math after pooling; only sums in a different order -> boundary rounding only
    assert diff_rows <= max(1, ref.shape[1] * ref.shape[2] // 1000)


def test_fused_lists_drive_triton_backend():
    q, k, v = _qk(1, 8, 2, 4096, 4096, 128, torch.bfloat16, seed=5)
    sel_f = prism.build_scorer("prism", impl="triton")(q, k)
    sel_u = PrismScorer(impl="torch")(q, k)
    assert torch.equal(sel_f.mask, sel_u.mask)
    fn = prism.get_backend("triton")
    out_f = fn(q, k, v, sel_f.block_mask(), scale=None)
    out_u = fn(q, k, v, sel_u.block_mask(), scale=None)
    torch.testing.assert_close(out_f, out_u, rtol=0, atol=0)


def test_threshold_one_is_dense():
    q, k, _ = _qk(1, 4, 2, 5000, 5000, 128, torch.bfloat16)
    sel = prism.build_scorer("prism", impl="triton", threshold=1.0)(q, k)
    visible, _ = block_causal(5000, 5000, 128, q.device)
    assert torch.equal(sel.mask, visible.expand_as(sel.mask))
    assert abs(sel.density - 1.0) < 1e-6


def test_auto_picks_triton_on_cuda():
    q, k, _ = _qk(1, 8, 2, 4096, 4096, 128, torch.bfloat16, seed=7)
    sc = prism.build_scorer("prism")  # impl="auto"
    sel = sc(q, k)
    assert sc.last_path == "triton" and sel.stored_as == "lists"
    assert sc.resolve_impl(q.double(), k.double()) == "torch"  # unsupported dtype: PyTorch path
    assert torch.equal(sel.mask, PrismScorer(impl="torch")(q, k).mask)


def test_deprecated_prism_fused_alias_runs_the_kernel():
    with pytest.warns(DeprecationWarning):
        sc = prism.build_scorer("prism_fused")
    assert sc.Config is PrismConfig and sc.config.impl == "triton"
    q, k, _ = _qk(1, 4, 2, 2048, 2048, 128, torch.float32, seed=8)
    sel = sc(q, k)
    assert sc.last_path == "triton"
    assert torch.equal(sel.mask, PrismScorer(impl="torch")(q, k).mask)
