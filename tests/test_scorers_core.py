"""Prism and mean-pool selections against the plain float64 references in naive_scorers.py."""

import pytest
import torch
from naive_scorers import naive_meanpool, naive_prism, naive_visible

import prism
from prism.masks import block_causal
from prism.synthetic import synthetic_qkv

SHAPES = [  # (Sq, Sk)
    (127, 127),
    (1000, 1000),
    (4097, 4097),
    (300, 1000),  # cached prefix, not a multiple of the block
    (256, 1280),  # cached prefix, a multiple of the block
]


def make(sq, sk, d, b=2, hq=8, hkv=2, seed=0):
    q, k, _ = synthetic_qkv(
        batch=b, q_heads=hq, kv_heads=hkv, length=sk, q_len=sq, head_dim=d, seed=seed
    )
    return q, k


@pytest.mark.parametrize("sq,sk", SHAPES)
@pytest.mark.parametrize("d", [64, 128])
def test_prism_matches_reference(sq, sk, d):
    q, k = make(sq, sk, d)
    sel = prism.build_scorer("prism", threshold=0.9)(q, k)
    ref = naive_prism(q, k, p_high=0.9, p_low=0.9)
    assert sel.mask.shape == ref.shape
    assert torch.equal(sel.mask, ref)
    if sk >= 1000:  # the test must exercise real sparsity, not a trivially full selection
        assert sel.density < 0.9


@pytest.mark.parametrize("sq,sk", SHAPES)
@pytest.mark.parametrize("d", [64, 128])
def test_meanpool_matches_reference(sq, sk, d):
    q, k = make(sq, sk, d, seed=1)
    sel = prism.build_scorer("meanpool", threshold=0.9)(q, k)
    ref = naive_meanpool(q, k, p=0.9)
    assert torch.equal(sel.mask, ref)


@pytest.mark.parametrize(
    "params,ref_params",
    [
        ({"calibrate": False}, {"calibrate": False}),
        ({"rope_layout": "interleaved"}, {"layout": "interleaved"}),
        ({"threshold_high": 0.7, "threshold_low": 0.99}, {"p_high": 0.7, "p_low": 0.99}),
        ({"high_dims": 32, "low_dims": 32}, {"high_dims": 32, "low_dims": 32}),
        ({"block_size": 64}, {"bs": 64}),
        (
            {"force_sink": False, "force_diagonal": False},
            {"force_sink": False, "force_diagonal": False},
        ),
    ],
)
def test_prism_options_match_reference(params, ref_params):
    q, k = make(700, 1500, 64, seed=2)
    sel = prism.build_scorer("prism", **{"threshold": 0.95, **params})(q, k)
    ref = naive_prism(q, k, **{"p_high": 0.95, "p_low": 0.95, **ref_params})
    assert torch.equal(sel.mask, ref)


def test_bf16_input_close_to_fp32():
    q, k = make(1000, 2000, 128, seed=3)
    a = prism.build_scorer("prism", threshold=0.9)(q, k).mask
    b = prism.build_scorer("prism", threshold=0.9)(q.bfloat16(), k.bfloat16()).mask
    assert (a != b).float().mean() < 0.02  # only near-ties may flip


@pytest.mark.parametrize("sq,sk", SHAPES)
def test_geometry_matches_naive(sq, sk):
    for bs in (64, 128):
        vis, part = block_causal(sq, sk, bs)
        nvis, npart = naive_visible(sq, sk, bs)
        assert torch.equal(vis, nvis) and torch.equal(part, npart)


@pytest.mark.parametrize("name", ["prism", "meanpool"])
def test_threshold_one_selects_every_causal_block(name):
    q, k = make(1000, 1300, 64)
    sel = prism.build_scorer(name, threshold=1.0)(q, k)
    vis, _ = block_causal(1000, 1300, 128)
    assert torch.equal(sel.mask, vis.expand_as(sel.mask))
    assert sel.density == 1.0


@pytest.mark.parametrize("name", ["prism", "meanpool"])
def test_forced_blocks_causal_and_monotone(name):
    q, k = make(2000, 2500, 64)
    vis, part = block_causal(2000, 2500, 128)
    prev = None
    for t in (0.99, 0.9, 0.7, 0.5):
        m = prism.build_scorer(name, threshold=t)(q, k).mask
        assert m[..., 0].all(), "sink forced"
        assert (m | ~part).all(), "diagonal forced"
        assert not (m & ~vis).any(), "block-causal"
        if prev is not None:
            assert not (m & ~prev).any(), "lower threshold selects a subset (top-p is nested)"
        prev = m


def test_rules_top_k_and_min_prob():
    q, k = make(1024, 2048, 64)
    vis, part = block_causal(1024, 2048, 128)
    m = prism.build_scorer(
        "meanpool", rule="top_k", top_k=3, force_sink=False, force_diagonal=False
    )(q, k).mask
    assert torch.equal(m.sum(-1), vis.sum(-1).clamp(max=3).expand(m.shape[:3]).to(m.sum(-1).dtype))
    scorer = prism.build_scorer(
        "meanpool", rule="min_prob", min_prob=0.2, force_sink=False, force_diagonal=False
    )
    m = scorer(q, k).mask
    probs = scorer.block_probs(q, k)
    assert torch.equal(m, (probs >= 0.2) & vis)


def test_union_and_intersection_policies():
    q, k = make(1000, 2000, 64)
    a = prism.build_scorer("prism", threshold=0.8)(q, k).mask
    w = prism.build_scorer("window", window=2)(q, k).mask
    u = prism.build_scorer(
        "union", policies=[{"scorer": "prism", "threshold": 0.8}, {"scorer": "window", "window": 2}]
    )(q, k).mask
    i = prism.build_scorer(
        "intersection",
        policies=[{"scorer": "prism", "threshold": 0.8}, {"scorer": "window", "window": 2}],
    )(q, k).mask
    assert torch.equal(u, a | w)
    assert torch.equal(i, a & w)
    # window: exactly the `window` nearest visible blocks (plus the sink)
    vis, _ = block_causal(1000, 2000, 128)
    last = vis.long().cumsum(-1).argmax(-1)
    for row in range(vis.shape[0]):
        want = {0, int(last[row]), int(last[row]) - 1}
        assert set(torch.nonzero(w[0, 0, row]).flatten().tolist()) == want
