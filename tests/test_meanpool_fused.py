"""The fused mean-pool estimator (``meanpool`` with ``impl="triton"``): Prism's fused kernel with
one band spanning every dim and no calibration, which the select kernel runs as a single band.

On CPU under Triton's interpreter (``tests/conftest.py`` switches it on without CUDA; fp32 /
fp16, <= 1K tokens) and, marked ``gpu``, on CUDA at 8K-16K in bf16. Each case compares the fused
selection with the PyTorch path (``impl="torch"``): the bool mask and the four BlockMask lists
exactly, and for top-p the float64 loop reference ``naive_meanpool`` beside it. Also: the
single-band switch is taken exactly when the bands coincide, the routing (``auto`` on CPU is the
PyTorch path, odd head dims stay there), the compiled op's key, and clear errors.
"""

from __future__ import annotations

import pytest
import torch
from naive_scorers import naive_meanpool

import prism
from prism.kernels.estimation import op
from prism.kernels.estimation.op import Plan, PrismKernelParams
from prism.masks import block_causal, bool_to_block_lists
from prism.scorers.meanpool import MeanPoolScorer
from prism.synthetic import synthetic_qkv

needs_interpreter = pytest.mark.skipif(
    not (op.triton_available() and op.interpreter_on()),
    reason="needs Triton's interpreter (TRITON_INTERPRET=1, no CUDA)",
)

# name: (B, Hq, Hkv, Sq, Sk, D, dtype, scorer params)
CASES = {
    "ragged127_d64": (1, 2, 1, 127, 127, 64, "float32", {}),
    "ragged1000_gqa82_batch2": (2, 8, 2, 1000, 1000, 64, "float32", {"threshold": 0.9}),
    "d128_fp16": (1, 4, 2, 1000, 1000, 128, "float16", {}),
    "prefix_not_multiple": (1, 4, 1, 300, 1000, 64, "float32", {"threshold": 0.8}),
    "group3": (1, 6, 2, 1000, 1000, 64, "float32", {"threshold": 0.9}),
    "block64_no_forced": (
        1, 4, 2, 1000, 1000, 64, "float32",
        {"block_size": 64, "force_sink": False, "force_diagonal": False, "threshold": 0.8},
    ),
    "top_k": (1, 4, 2, 1000, 1000, 64, "float32", {"rule": "top_k", "top_k": 3, "block_size": 32}),
    "min_prob": (1, 4, 2, 1000, 1000, 64, "float32", {"rule": "min_prob", "min_prob": 0.05}),
    "threshold1_dense": (1, 4, 2, 700, 1000, 64, "float32", {"threshold": 1.0}),
    "single_query": (1, 4, 2, 1, 500, 64, "float32", {}),
}  # fmt: skip
SPARSE = {"ragged1000_gqa82_batch2", "prefix_not_multiple", "block64_no_forced", "top_k"}


def _inputs(name, device="cpu"):
    b, hq, hkv, sq, sk, d, dtype, params = CASES[name]
    q, k, _ = synthetic_qkv(
        batch=b, q_heads=hq, kv_heads=hkv, length=sk, q_len=sq, head_dim=d,
        seed=sum(map(ord, name)),
    )  # fmt: skip
    dt = getattr(torch, dtype)
    return q.to(device, dt), k.to(device, dt), params


def _split(mask, sq, sk, bs):
    _, part = block_causal(sq, sk, bs, mask.device)
    return bool_to_block_lists(mask & part) + bool_to_block_lists(mask & ~part)


def _check_against_torch_path(q, k, params, max_diff_rows=0):
    sq, sk = q.shape[2], k.shape[2]
    fused = prism.build_scorer("meanpool", impl="triton", **params)
    sel = fused(q, k)
    assert fused.last_path == "triton" and sel.stored_as == "lists"
    ref = MeanPoolScorer(impl="torch", **params)(q, k).mask
    diff_rows = int((sel.mask != ref).any(-1).sum())
    assert diff_rows <= max_diff_rows, f"{diff_rows} query-block rows differ from the torch path"
    if max_diff_rows == 0:
        for got, exp in zip(sel.lists, _split(ref, sq, sk, fused.config.block_size)):
            assert torch.equal(got, exp)  # the exact layout of bool_to_block_lists
    return sel, ref


@needs_interpreter
@pytest.mark.parametrize("name", list(CASES))
def test_fused_meanpool_matches_torch_path_and_reference(name):
    q, k, params = _inputs(name)
    sel, ref = _check_against_torch_path(q, k, params)
    c = MeanPoolScorer(**params).config
    if c.rule == "top_p":
        nv = naive_meanpool(
            q.double(), k.double(), bs=c.block_size, p=c.threshold,
            force_sink=c.force_sink, force_diagonal=c.force_diagonal,
        )  # fmt: skip
        assert torch.equal(sel.mask, nv)
    if name == "threshold1_dense":
        assert sel.density == pytest.approx(1.0)
    if name in SPARSE:
        assert sel.density < 0.6
    if name == "top_k":  # every full row keeps exactly k (+ the forced sink / diagonal)
        assert int(sel.mask.sum(-1).max()) <= 3 + 2


def test_single_band_exactly_when_the_bands_coincide():
    q = torch.zeros(1, 2, 256, 64)
    base = dict(block_size=128, threshold_high=0.9, threshold_low=0.9)
    assert Plan(q, q, MeanPoolScorer(threshold=0.9).kernel_params(64)).one_band
    assert Plan(q, q, PrismKernelParams(high_dims=64, low_dims=64, **base)).one_band
    # Prism's default bands (D/2, 3D/4), or full bands with different targets: two bands
    assert not Plan(q, q, prism.build_scorer("prism").kernel_params(64)).one_band
    two_targets = dict(base, threshold_low=0.8)
    assert not Plan(q, q, PrismKernelParams(high_dims=64, low_dims=64, **two_targets)).one_band
    interleaved = PrismKernelParams(high_dims=64, low_dims=64, rope_layout="interleaved", **base)
    assert Plan(q, q, interleaved).one_band


def test_meanpool_kernel_params_are_full_width_uncalibrated():
    p = MeanPoolScorer(threshold=0.8, rule="top_k", top_k=7, force_sink=False).kernel_params(128)
    assert (p.high_dims, p.low_dims, p.calibrate) == (128, 128, False)
    assert (p.threshold_high, p.threshold_low, p.rule, p.top_k) == (0.8, 0.8, "top_k", 7)
    assert (p.force_sink, p.force_diagonal) == (False, True)


def test_routing_and_errors():
    q, k, _ = _inputs("ragged127_d64")
    sc = MeanPoolScorer()  # impl="auto": the PyTorch path on CPU tensors
    sc(q, k)
    assert sc.last_path == "torch" and sc.resolve_impl(q, k) == "torch"
    with pytest.raises(ValueError, match="unknown impl 'fast'.*valid"):
        MeanPoolScorer(impl="fast")
    with pytest.raises(ValueError, match="even head dim"):
        MeanPoolScorer(impl="triton").kernel_params(63)
    # the compiled op's key names the scorer, so the op resolves mean pooling, not Prism
    from prism.scorers._fused_ops import _prism_params

    mp = MeanPoolScorer(threshold=0.9)
    assert '"scorer": "meanpool"' in mp.op_key
    assert _prism_params(mp.op_key, 64) == mp.kernel_params(64)
    assert '"scorer": "prism"' in prism.build_scorer("prism").op_key


def test_odd_head_dim_stays_on_the_torch_path(monkeypatch):
    """``auto`` would take the fused kernel on CUDA: forced here, an odd D must still route to
    the PyTorch path (the kernel needs rotary pairs) instead of raising."""
    import prism.scorers._fused_pooled as fp

    monkeypatch.setattr(fp, "auto_takes_fused", lambda q: True)
    q = torch.randn(1, 2, 200, 63)
    sc = MeanPoolScorer()
    assert sc.resolve_impl(q, q) == "torch"
    assert sc.resolve_impl(torch.randn(1, 2, 200, 64), torch.randn(1, 2, 200, 64)) == "triton"


# -- GPU ------------------------------------------------------------------------------------------
GPU_CASES = [  # (B, Hq, Hkv, Sq, Sk, D, params)
    (1, 8, 2, 8192, 8192, 128, {}),
    (2, 9, 3, 5000, 5000, 64, {"threshold": 0.9}),  # G = 3, batch 2
    (1, 4, 4, 3000, 8192, 128, {"rule": "top_k", "top_k": 12}),  # cached prefix
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[str(i) for i in range(len(GPU_CASES))])
def test_gpu_fused_meanpool_fp32_exact(case):
    b, hq, hkv, sq, sk, d, params = case
    q, k, _ = synthetic_qkv(
        batch=b, q_heads=hq, kv_heads=hkv, length=sk, q_len=sq, head_dim=d, seed=11
    )
    q, k = q.cuda(), k.cuda()
    _check_against_torch_path(q, k, params)
    assert MeanPoolScorer(**params).resolve_impl(q, k) == "triton"  # auto takes it on CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("params", [{}, {"rule": "top_k", "top_k": 26}])
def test_gpu_fused_meanpool_bf16_16k(params):
    q, k, _ = synthetic_qkv(batch=1, q_heads=16, kv_heads=4, length=16384, head_dim=128, seed=3)
    q, k = q.cuda().bfloat16(), k.cuda().bfloat16()
    # the same fp32 math after pooling, sums in another order: boundary rounding only
    sel, ref = _check_against_torch_path(q, k, params, max_diff_rows=16 * 128 // 1000)
    assert 0.02 < sel.density < 0.9
