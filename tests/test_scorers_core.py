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


# ------------------------------------------------------------------------------------------------
# selection rules (prism.masks.select): the prefix rule at exact ties
# ------------------------------------------------------------------------------------------------
def _top_p_reference(row: list[float], vis: list[bool], p: float) -> set[int]:
    """The documented rule, by hand: order the visible entries by descending probability, equal
    probabilities by ascending index; keep an entry iff the mass strictly before it is < p."""
    if p >= 1.0:
        return {j for j, v in enumerate(vis) if v}
    order = sorted((j for j, v in enumerate(vis) if v), key=lambda j: (-row[j], j))
    kept, before = set(), 0.0
    for j in order:
        if before < p:
            kept.add(j)
        before += row[j]
    return kept


@pytest.mark.parametrize(
    "p,expect",
    [
        (0.5, {1}),  # the first tie starts exactly at p: mass before it (0.5) is not < 0.5
        (0.55, {1, 0}),  # the tie straddles p: only its first (lowest index) member
        (0.625, {1, 0}),  # the second tie member starts exactly at p
        (0.7, {1, 0, 2}),
        (0.75, {1, 0, 2}),
        (0.76, {1, 0, 2, 4}),
        (0.99, {1, 0, 2, 4, 5}),
    ],
)
def test_top_p_tie_boundary(p, expect):
    """Four blocks of exactly 1/8 after a block of 1/2 (dyadic, so every sum is exact); block 3 is
    invisible and carries the same probability, so it neither counts nor is kept."""
    from prism.masks.select import top_p

    row = [0.125, 0.5, 0.125, 0.125, 0.125, 0.125]
    vis = [True, True, True, False, True, True]
    probs = torch.tensor([row])
    visible = torch.tensor([vis])
    got = set(torch.nonzero(top_p(probs, visible, p)[0]).flatten().tolist())
    assert got == expect
    assert got == _top_p_reference(row, vis, p)


def test_top_p_ties_match_reference_and_the_other_rules():
    """Rows of multiples of 1/32 (many exact ties, exact float sums) over a block-causal map:
    ``top_p`` == the hand-written rule; ``cover`` (share of a total of exactly 1) and
    ``minimal_count`` give the same sets / sizes (one prefix rule)."""
    from prism.masks.select import cover, minimal_count, top_p

    g = torch.Generator().manual_seed(0)
    visible, _ = block_causal(300, 700, 32)  # [10, 22], a ragged cached prefix
    b, h = 2, 3
    counts = torch.zeros(b, h, *visible.shape)
    nvis = visible.sum(-1)
    for idx in torch.cartesian_prod(torch.arange(b), torch.arange(h), torch.arange(10)).tolist():
        bb, hh, i = idx
        cols = torch.nonzero(visible[i]).flatten()
        # 32 units spread over at most 4 distinct values -> heavy ties
        levels = torch.randint(0, 4, (len(cols),), generator=g).float()
        if levels.sum() == 0:
            levels[0] = 1
        units = torch.floor(levels / levels.sum() * 32)
        units[torch.argmax(levels)] += 32 - units.sum()
        counts[bb, hh, i, cols] = units
    probs = counts / 32
    assert torch.equal(probs.sum(-1), torch.ones(b, h, 10))
    assert int(nvis.min()) > 4
    for p in (1 / 3, 0.5, 0.75, 0.8, 0.96875, 0.99):  # exact tie boundaries and in-between
        keep = top_p(probs, visible, p)
        for bb in range(b):
            for hh in range(h):
                for i in range(10):
                    row, vis = probs[bb, hh, i].tolist(), visible[i].tolist()
                    got = set(torch.nonzero(keep[bb, hh, i]).flatten().tolist())
                    assert got == _top_p_reference(row, vis, p), (p, bb, hh, i)
        assert torch.equal(cover(probs, p, visible), keep)
        target = torch.full((b, h, 10), p)
        assert torch.equal(minimal_count(probs.masked_fill(~visible, 0), target), keep.sum(-1))


def test_cover_with_start_and_ties():
    """``cover``: mass already covered (``start``) counts first; equal candidates by index."""
    from prism.masks.select import cover

    mass = torch.tensor([[2.0, 1.0, 1.0, 1.0, 4.0]])
    cand = torch.tensor([[False, True, True, True, True]])  # entry 0 is forced (start = 2)
    start = torch.tensor([2.0])
    # total 9; 0.5 x 9 = 4.5: 4.0 (before 2) kept, first 1.0 (before 6) dropped
    assert cover(mass, 0.5, cand, start=start).tolist() == [[False, False, False, False, True]]
    # 0.75 x 9 = 6.75: entry 1 (before 6) kept, entry 2 (before 7) dropped
    assert cover(mass, 0.75, cand, start=start).tolist() == [[False, True, False, False, True]]
    assert cover(mass, 1.0, cand, start=start).tolist() == cand.tolist()
