"""The pooled-key estimate on the GPU path (``prism.kernels.estimation.pooled_kernels``) and the
probe selection that mixes it in inside launch 2 (``pooled_mix`` > 0, issue 11).

Under Triton's interpreter (CPU, fp32 and fp16: bf16 ``tl.dot`` is wrong there) and on the GPU
(marker ``gpu``, bf16, real lengths). References: the float64 loop
``naive_probe.naive_pooled_key_probs`` (written without prism's helpers) for the estimate, and
``naive_probe.naive_probe`` over the float64 mixture for the selection.
"""

from __future__ import annotations

import sys

import pytest
import torch
from _peak_memory import peak_extra
from naive_probe import naive_pooled_key_probs, naive_probe, naive_probe_probs

import prism
from prism.kernels.estimation import op
from prism.kernels.estimation.pooled_kernels import launch_pooled_probs, pooled_rows_per_block
from prism.kernels.estimation.probe_kernels import launch_select
from prism.kernels.estimation.probe_op import ProbeKernelParams, pooled_key_probs_fused
from prism.masks import block_causal
from prism.scorers.probe import pooled_key_block_probs, pooled_rows

needs_interpreter = pytest.mark.skipif(
    not (op.triton_available() and op.interpreter_on()),
    reason="needs Triton's interpreter (TRITON_INTERPRET=1, no CUDA)",
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _qk(b, hq, hkv, sq, sk, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g)
    k = torch.randn(b, hkv, sk, d, generator=g)
    k[:, :, :: max(1, sk // 7)] *= 4.0  # a few strong keys: uneven block masses
    q = q + 1.2 * k.repeat_interleave(hq // hkv, 1)[:, :, sk - sq :]
    return q, k


# (B, Hq, Hkv, Sq, Sk, D, BS, stride): ragged lengths, a one-row last block, cached prefixes
# (multiple of BS or not), GQA groups 1 / 3 (not a power of two) / 4 / 8, strides 1 ... BS
CASES = {
    "ragged127_g3_batch2": (2, 6, 2, 127, 127, 32, 32, 8),
    "len1000_g2": (1, 4, 2, 1000, 1000, 64, 128, 8),
    "prefix264_one_row_last": (1, 4, 1, 513, 777, 64, 64, 3),
    "prefix700_stride1": (1, 4, 2, 300, 1000, 32, 128, 1),
    "prefix1024_stride_bs": (1, 8, 1, 256, 1280, 64, 128, 128),
    "mqa_g8_block16": (1, 8, 1, 333, 333, 16, 16, 4),
    "mha_d128": (1, 2, 2, 400, 400, 128, 64, 8),
    "single_query": (1, 4, 2, 1, 500, 32, 64, 8),
    "d192_stride1_g4": (1, 4, 1, 200, 300, 192, 64, 1),  # D > 128: narrower fp32 tiles
}


def _visible(sq, sk, bs):
    vis, _ = block_causal(sq, sk, bs)
    return vis  # [NQB, NKB]


@needs_interpreter
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_pooled_estimate_matches_float64_reference(case, dtype):
    b, hq, hkv, sq, sk, d, bs, stride = CASES[case]
    q, k = _qk(b, hq, hkv, sq, sk, d)
    q, k = q.to(dtype), k.to(dtype)
    nqb, nkb = -(-sq // bs), -(-sk // bs)
    out = torch.full((b, hq, nqb, nkb), float("nan"))  # poisoned: only visible entries written
    got = launch_pooled_probs(q, k, bs, stride, out=out)
    assert got is out
    vis = _visible(sq, sk, bs).expand_as(got)
    assert torch.isnan(got[~vis]).all()  # nothing past the visible blocks is touched
    ref = naive_pooled_key_probs(q.float(), k.float(), bs, stride)
    atol = 2e-6 if dtype == torch.float32 else 5e-6  # fp16: the means split in two halves
    torch.testing.assert_close(got[vis].double(), ref[vis], atol=atol, rtol=0)
    # the public wrapper: zeros past the visible blocks, rows summing to 1
    full = pooled_key_probs_fused(q, k, bs, stride)
    assert torch.equal(full[~vis], torch.zeros_like(full[~vis]))
    torch.testing.assert_close(full.sum(-1), torch.ones(b, hq, nqb), atol=1e-5, rtol=0)


@needs_interpreter
def test_fused_pooled_estimate_takes_strided_views():
    q, k = _qk(1, 4, 2, 600, 600, 32)
    qv = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, S, D] view of [B, S, H, D]
    kv = k.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(
        pooled_key_probs_fused(qv, kv, 64, 8), pooled_key_probs_fused(q, k, 64, 8), atol=0, rtol=0
    )


def test_rows_per_block_matches_the_scorer_layout():
    for sq, bs, stride in [(1000, 128, 8), (5, 128, 8), (128, 128, 1), (4, 16, 16), (300, 64, 3)]:
        assert pooled_rows_per_block(sq, bs, stride) == len(pooled_rows(min(sq, bs), stride))


# (B, Hq, Hkv, Sq, Sk, D, BS, scorer params)
SELECT_CASES = {
    "ragged1000_g3": (1, 6, 2, 1000, 1000, 32, 128, {"threshold": 0.9}),
    "batch2_prefix": (2, 4, 2, 290, 700, 32, 64, {"threshold": 0.85, "pooled_stride": 3}),
    "ends_p3_block32": (1, 4, 1, 500, 500, 32, 32, {"probes": 3, "placement": "ends"}),
    "top_k": (1, 4, 2, 600, 600, 32, 32, {"rule": "top_k", "top_k": 4}),
    "min_prob_no_forced": (
        1, 4, 2, 600, 600, 32, 32,
        {"rule": "min_prob", "min_prob": 0.03, "force_sink": False, "force_diagonal": False},
    ),
}  # fmt: skip


@needs_interpreter
@pytest.mark.parametrize("case", list(SELECT_CASES))
def test_fused_mixture_selection_matches_reference_rule(case):
    """The fused lists (launch 1 + the pooled launches + launch 2 mixing) against the float64
    mixture through the float64 top-p rule (``naive_probe``), or for top-k / min-prob against
    the PyTorch path (the same mixture through ``masks.select``'s rule); rows at the rule's
    rounding boundary may differ (bounded), and the mixture must change the selection (else
    this could not tell it from the probes)."""
    b, hq, hkv, sq, sk, d, bs, params = SELECT_CASES[case]
    params = {"pooled_mix": 0.3, "threshold": 0.9, **params}
    q, k = _qk(b, hq, hkv, sq, sk, d, seed=1)
    fused = prism.build_scorer("probe", block_size=bs, impl="triton", **params)
    sel = fused(q, k)
    assert fused.last_path == "triton" and sel.lists is not None  # the kernel wrote the lists
    c = fused.config
    if c.rule == "top_p":
        a = c.pooled_mix
        ref_p = (1 - a) * naive_probe_probs(q, k, bs, c.probes, c.placement) + a * (
            naive_pooled_key_probs(q, k, bs, c.pooled_stride)
        )
        forced = dict(force_sink=c.force_sink, force_diagonal=c.force_diagonal)
        ref = naive_probe(q, k, bs=bs, p=c.threshold, probs=ref_p, **forced)
        alone = naive_probe(q, k, bs=bs, probes=c.probes, placement=c.placement, p=c.threshold)
    else:
        ref = prism.build_scorer("probe", block_size=bs, impl="torch", **params)(q, k).mask
        no_mix = {**params, "pooled_mix": 0.0}
        alone = prism.build_scorer("probe", block_size=bs, impl="torch", **no_mix)(q, k).mask
    bad = (sel.mask != ref).any(-1).float().mean().item()
    assert bad <= 0.01, bad
    assert not torch.equal(ref, alone)


@needs_interpreter
def test_launch_select_checks_the_pooled_tensor():
    q, k = _qk(1, 4, 2, 300, 300, 32)
    sc = prism.build_scorer("probe", block_size=64, impl="triton")
    from prism.kernels.estimation.probe_kernels import launch_log_masses
    from prism.scorers.probe import probe_layout

    rows, w = probe_layout(300, 64, 2, "shared")
    lm = launch_log_masses(q, k, rows, 64, first_slot=1)
    with pytest.raises(ValueError, match="pooled must be float32"):
        launch_select(
            lm, w, 300, 300, 2, sc.kernel_params(), shared=True,
            pooled=torch.zeros(1, 4, 5, 4), alpha=0.3,
        )  # fmt: skip


def test_kernel_params_check_the_stride_only_with_the_mixture():
    ProbeKernelParams(block_size=4)  # the default stride 8 > BS is irrelevant without a mixture
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        ProbeKernelParams(block_size=0)


def test_bad_pooled_kernel_params():
    with pytest.raises(ValueError, match=r"pooled_mix must be in \[0, 1\)"):
        ProbeKernelParams(block_size=64, pooled_mix=1.0)
    with pytest.raises(ValueError, match="pooled_stride must be in"):
        ProbeKernelParams(block_size=64, pooled_mix=0.3, pooled_stride=65)
    q, k = _qk(1, 2, 1, 64, 64, 16)
    with pytest.raises(ValueError, match="stride must be in"):
        pooled_key_probs_fused(q, k, 32, 0)


def test_kernel_params_carry_the_mixture():
    s = prism.build_scorer("probe", pooled_mix=0.25, pooled_stride=4)
    kp = s.kernel_params()
    assert (kp.pooled_mix, kp.pooled_stride) == (0.25, 4)
    assert '"pooled_mix": 0.25' in s.op_key  # the compiled op's key: a mixture is its own op


@pytest.mark.skipif(not op.triton_available(), reason="needs Triton")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_fused_mixture_memory_is_block_level_at_32k():
    """The whole fused selection with the mixture (launch 1, the pooled launches, launch 2) at
    32K tokens, under the interpreter in a fresh process: its peak extra memory is a few
    block-level tensors (B·Hq·NQB·NKB float32 = 512 KiB here), never [Sq, Sk] (4 GiB), nor the
    [rows, NKB] pooled logits of every 8th row (8 MiB); a 64 MiB control allocation afterwards
    is seen."""
    r = peak_extra((1, 2, 1, 32768, 16), True, impl="triton", pooled_mix=0.3, threshold=0.9)
    assert r["path"] == "triton" and r["nkb"] == 256
    block_level = 2 * 256 * 256 * 4
    assert r["extra"] < 8 * block_level, r  # 4 MiB (measured: ~1.9 MiB)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("sq,sk", [(8192, 8192), (3000, 8192), (32768, 32768)])
def test_gpu_fused_pooled_mixture_matches_torch_path(sq, sk):
    q, k = _qk(1, 32, 8, sq, sk, 128)
    q, k = q.cuda().bfloat16(), k.cuda().bfloat16()
    ref_pool = pooled_key_block_probs(q, k, 128, 8)
    torch.testing.assert_close(pooled_key_probs_fused(q, k, 128, 8), ref_pool, atol=2e-4, rtol=0)
    fused = prism.build_scorer("probe", impl="triton", pooled_mix=0.3)
    torch_ = prism.build_scorer("probe", impl="torch", pooled_mix=0.3)
    sf, st = fused(q, k), torch_(q, k)
    assert fused.last_path == "triton" and sf.lists is not None
    bad = (sf.mask != st.mask).any(-1).float().mean().item()
    assert bad <= 0.01, bad
    assert sf.density < 0.9
