"""The probe scorer's pooled-key mixture (``pooled_mix``, issue 11) against the float64 loop
references in naive_probe (``naive_pooled_key_probs``, ``naive_probe_probs``, ``naive_probe``)."""

import pytest
import torch
from _peak_memory import probe_peak_extra
from naive_probe import naive_pooled_key_probs, naive_probe, naive_probe_probs

import prism
from prism.kernels.estimation import op
from prism.scorers.probe import pooled_key_block_probs, pooled_rows
from prism.synthetic import synthetic_qkv


def make(sq, sk, d=32, b=2, hq=6, hkv=2, seed=0):
    q, k, _ = synthetic_qkv(
        batch=b, q_heads=hq, kv_heads=hkv, length=sk, q_len=sq, head_dim=d, seed=seed
    )
    return q, k


# (Sq, Sk, BS, stride): ragged, one-row last block, cached prefix (multiple or not), stride 1 / BS
CASES = [
    (127, 127, 32, 8),
    (1000, 1000, 128, 8),
    (513, 777, 64, 3),  # prefix 264, last query block one row (<= stride // 2)
    (300, 1000, 128, 1),
    (256, 1280, 128, 128),
    (4097, 4097, 128, 64),  # last block one row
]


@pytest.mark.parametrize("sq,sk,bs,stride", CASES)
def test_pooled_estimate_matches_reference(sq, sk, bs, stride):
    b, hq = (1, 2) if sq > 2000 else (2, 6)
    q, k = make(sq, sk, b=b, hq=hq, hkv=hq // 3 if hq == 6 else 1)
    got = pooled_key_block_probs(q, k, bs, stride)
    ref = naive_pooled_key_probs(q, k, bs, stride)
    torch.testing.assert_close(got.double(), ref, atol=2e-6, rtol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got[..., 0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("sq,sk,bs,stride", CASES[:4])
def test_mixture_probs_and_selection_match_reference(sq, sk, bs, stride):
    q, k = make(sq, sk, seed=1)
    s = prism.build_scorer(
        "probe", block_size=bs, pooled_mix=0.3, pooled_stride=stride, threshold=0.85
    )
    ref_probs = 0.7 * naive_probe_probs(q, k, bs, 2, "shared") + 0.3 * naive_pooled_key_probs(
        q, k, bs, stride
    )
    torch.testing.assert_close(s.block_probs(q, k).double(), ref_probs, atol=2e-6, rtol=0)
    sel = s(q, k)
    ref = naive_probe(q, k, bs=bs, p=0.85, probs=ref_probs)
    assert torch.equal(sel.mask, ref)
    # the mixture changes the selection (else this test could not tell it from the probes)
    assert not torch.equal(ref, naive_probe(q, k, bs=bs, probes=2, placement="shared", p=0.85))


def test_zero_mix_is_the_probe_scorer():
    q, k = make(1000, 1000)
    a = prism.build_scorer("probe", threshold=0.9)
    b = prism.build_scorer("probe", threshold=0.9, pooled_mix=0.0, pooled_stride=3)
    assert torch.equal(a(q, k).mask, b(q, k).mask)


def test_pooled_rows():
    assert pooled_rows(128, 8) == list(range(4, 128, 8))
    assert pooled_rows(128, 1) == list(range(128))
    assert pooled_rows(128, 128) == [64]
    assert pooled_rows(3, 8) == [2]  # shorter than stride // 2 + 1: its last row
    assert pooled_rows(5, 8) == [4]


def test_chunking_does_not_change_the_estimate():
    q, k = make(1000, 1300)
    a = pooled_key_block_probs(q, k, 64, 4, chunk_mb=256)
    b = pooled_key_block_probs(q, k, 64, 4, chunk_mb=1)  # < one row of logits: one row per step
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_bf16_input_close_to_fp32():
    q, k = make(1000, 1000)
    a = pooled_key_block_probs(q, k, 128, 8)
    b = pooled_key_block_probs(q.bfloat16(), k.bfloat16(), 128, 8)
    assert b.dtype == torch.float32
    torch.testing.assert_close(a, b, atol=2e-2, rtol=0)


@pytest.mark.parametrize(
    "params,err,match",
    [
        ({"pooled_mix": 1.0}, ValueError, r"pooled_mix must be in \[0, 1\)"),
        ({"pooled_mix": -0.1}, ValueError, r"pooled_mix must be in \[0, 1\)"),
        ({"pooled_mix": "0.3"}, TypeError, "pooled_mix must be a number"),
        ({"pooled_mix": True}, TypeError, "pooled_mix must be a number"),
        ({"pooled_stride": 0}, ValueError, "pooled_stride must be >= 1"),
        ({"pooled_stride": 2.0}, TypeError, "pooled_stride must be an int"),
        ({"pooled_stride": 129}, ValueError, r"pooled_stride must be <= block_size \(128\)"),
        ({"pooled_mixx": 0.3}, ValueError, "valid keys: .*pooled_mix"),
    ],
)
def test_bad_pooled_config(params, err, match):
    with pytest.raises(err, match=match):
        prism.build_scorer("probe", **params)


def test_memory_is_block_level_at_32k():
    """Peak extra memory of the mixture at 32K tokens (stride 1: every query row): the chunks of
    probe scores and of [rows, NKB] logits plus block-level buffers, far below [Sq, Sk]."""
    r = probe_peak_extra(pooled_mix=0.3, pooled_stride=1)
    assert r["nkb"] == 256
    chunk = 8 << 20
    block_level = 8 * 256 * 256 * 4  # one fp32 [B, Hq, NQB, NKB]: 2 MiB
    pooled_logits = 8 * 32768 * 256 * 4  # the unchunked [B, Hq, Sq, NKB] logits: 256 MiB
    bound = 4 * chunk + 24 * block_level
    assert r["extra"] < bound, (r, bound)
    assert bound < pooled_logits / 2


needs_interpreter = pytest.mark.skipif(
    not (op.triton_available() and op.interpreter_on()),
    reason="needs Triton's interpreter (TRITON_INTERPRET=1, no CUDA)",
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _fused_vs_torch(q, k, bs, atol):
    fused = prism.build_scorer("probe", block_size=bs, impl="triton", pooled_mix=0.3)
    ref = prism.build_scorer("probe", block_size=bs, impl="torch", pooled_mix=0.3)
    pf, pr = fused.block_probs(q, k), ref.block_probs(q, k)
    torch.testing.assert_close(pf, pr, atol=atol, rtol=0)
    sf, sr = fused(q, k), ref(q, k)
    assert fused.last_path == "triton" and ref.last_path == "torch"
    differ = (sf.mask != sr.mask).any(-1).float().mean().item()  # rows at the rule's boundary
    assert differ <= 0.01, differ
    return sf


@needs_interpreter
def test_fused_launch_one_with_the_mixture_under_the_interpreter():
    q, k = make(300, 700, b=1, hq=4, hkv=2)
    _fused_vs_torch(q, k, 64, 1e-5)


@pytest.mark.gpu
@needs_cuda
def test_fused_launch_one_with_the_mixture_on_the_gpu():
    q, k = make(8192, 8192, d=128, b=1, hq=32, hkv=8)
    q, k = q.cuda().bfloat16(), k.cuda().bfloat16()
    sel = _fused_vs_torch(q, k, 128, 1e-4)
    assert sel.density < 0.9


@pytest.mark.parametrize(
    "name,probes,mix,short_th,long_th",
    [("smollm2_probe_pooled", 2, 0.3, 0.96, 0.95), ("smollm2_probe_p3_pooled", 3, 0.2, 0.98, 0.94)],
)
def test_shipped_pooled_policies(name, probes, mix, short_th, long_th):
    """The shipped mixtures: P shared probes mixed with the pooled estimate (stride 8), every
    layer alike; the thresholds at 8K and 32K keys, and the P = 3 policy's 16K and 64K buckets."""
    from prism.policy import PrismPolicy

    pol = PrismPolicy.from_config(f"prism/configs/policies/{name}.yaml")
    for layer in (0, 17, 29):
        short, long = pol.scorer_for(layer, 8192).config, pol.scorer_for(layer, 32768).config
        for c, th in ((short, short_th), (long, long_th)):
            assert (c.probes, c.placement, c.pooled_mix, c.pooled_stride) == (
                probes,
                "shared",
                mix,
                8,
            )
            assert c.threshold == th
    if name == "smollm2_probe_p3_pooled":  # 0.97 from 16K keys; from 64K the P = 2 mixture
        assert pol.scorer_for(5, 16384).config.threshold == 0.97
        assert pol.scorer_for(5, 32767).config.threshold == 0.97
        c = pol.scorer_for(5, 131072).config
        assert (c.probes, c.placement, c.pooled_mix, c.threshold) == (2, "shared", 0.3, 0.94)
