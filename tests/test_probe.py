"""The exact probe-query scorer (issue 11) against the float64 loop reference in naive_probe."""

import pytest
import torch
import torch.nn.functional as F
from _peak_memory import probe_peak_extra
from naive_probe import naive_probe, naive_probe_probs, naive_probe_rows

import prism
from prism.masks import block_causal, top_k, top_p
from prism.metrics import attention_recall, block_attention_mass
from prism.scorers.probe import PLACEMENTS, ProbeConfig, probe_offsets
from prism.synthetic import synthetic_qkv


def make(sq, sk, d=64, b=2, hq=8, hkv=2, seed=0):
    q, k, v = synthetic_qkv(
        batch=b, q_heads=hq, kv_heads=hkv, length=sk, q_len=sq, head_dim=d, seed=seed
    )
    return q, k, v


def block_lengths(sq, bs):
    n = -(-sq // bs)
    return torch.tensor([min(bs, sq - i * bs) for i in range(n)], dtype=torch.float32)


SHAPES = [  # (Sq, Sk, BS)
    (127, 127, 128),
    (1000, 1000, 128),
    (4097, 4097, 128),  # last query block holds one row
    (300, 1000, 128),  # cached prefix, not a multiple of the block
    (256, 1280, 128),  # cached prefix, a multiple of the block
    (1000, 1000, 32),
    (513, 777, 64),  # prefix 264 (not a multiple), last block one row
]


@pytest.mark.parametrize("sq,sk,bs", SHAPES)
def test_default_probe_matches_reference(sq, sk, bs):
    q, k, _ = make(sq, sk)
    sel = prism.build_scorer("probe", block_size=bs, threshold=0.9)(q, k)
    ref = naive_probe(q, k, bs=bs, probes=2, placement="shared", p=0.9)
    assert sel.mask.shape == ref.shape
    assert torch.equal(sel.mask, ref)
    if sk >= 1000:  # real sparsity, not a trivially full selection
        assert sel.density < 0.9


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("probes", [1, 3, 5])
@pytest.mark.parametrize("sq,sk", [(513, 513), (290, 700)])
def test_placements_match_reference(placement, probes, sq, sk):
    # BS 64: the last query block of 513 holds 1 row (< probes), of 290 34 rows, prefix 410
    q, k, _ = make(sq, sk, d=32, hq=6, hkv=2, seed=1)
    s = prism.build_scorer(
        "probe", block_size=64, probes=probes, placement=placement, threshold=0.85
    )
    probs = s.block_probs(q, k)
    ref_probs = naive_probe_probs(q, k, 64, probes, placement)
    torch.testing.assert_close(probs.double(), ref_probs, atol=2e-6, rtol=0)
    ref = naive_probe(q, k, bs=64, probes=probes, placement=placement, p=0.85)
    assert torch.equal(s(q, k).mask, ref)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("probes", [1, 2, 3, 7, 32])
@pytest.mark.parametrize("length", [1, 2, 5, 31, 32])
def test_probe_rows_are_distinct_real_rows(placement, probes, length):
    offs = probe_offsets(length, probes, placement)
    assert offs == naive_probe_rows(length, probes, placement)
    if placement == "shared":  # row -1 = the previous block's last row
        assert len(offs) == (1 if probes == 1 else min(probes, length + 1)) == len(set(offs))
        assert offs[-1] == length - 1 and offs == sorted(offs)
        assert probes == 1 or offs[0] == -1
        first = probe_offsets(length, probes, placement, has_prev=False)
        assert first == naive_probe_rows(length, probes, placement, has_prev=False)
        assert first == (offs if probes == 1 else offs[1:])
        return
    assert len(offs) == min(probes, length) == len(set(offs))
    assert all(0 <= r < length for r in offs) and offs == sorted(offs)
    if placement == "ends" and len(offs) >= 2:
        assert offs[0] == 0 and offs[-1] == length - 1
    if placement == "last":
        assert offs[-1] == length - 1


@pytest.mark.parametrize("sq,sk,bs", [(1000, 1000, 128), (300, 1000, 64), (4097, 4097, 128)])
def test_block_probs_rows_sum_to_one_and_are_causal(sq, sk, bs):
    q, k, _ = make(sq, sk, d=32, hq=4, hkv=1, seed=2)
    probs = prism.build_scorer("probe", block_size=bs, probes=3).block_probs(q, k)
    visible, _ = block_causal(sq, sk, bs)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5, rtol=0)
    assert probs.dtype == torch.float32
    assert (probs[..., ~visible] == 0).all()


def test_chunking_does_not_change_the_result():
    q, k, _ = make(1500, 4097, d=32, seed=3)
    a = prism.build_scorer("probe", probes=4, chunk_mb=1)  # several query blocks per chunk, many
    b = prism.build_scorer("probe", probes=4, chunk_mb=4096)  # one chunk
    torch.testing.assert_close(a.block_probs(q, k), b.block_probs(q, k), atol=1e-6, rtol=0)


@pytest.mark.parametrize("sq,sk,bs", [(1000, 1000, 128), (300, 1000, 64), (513, 777, 64)])
def test_threshold_one_selects_every_causal_block(sq, sk, bs):
    q, k, _ = make(sq, sk, d=32, seed=4)
    sel = prism.build_scorer("probe", block_size=bs, threshold=1.0)(q, k)
    visible, _ = block_causal(sq, sk, bs)
    assert torch.equal(sel.mask, visible.expand_as(sel.mask))
    assert sel.density == 1.0


def test_threshold_one_equals_dense_causal_attention():
    q, k, v = make(300, 1000, d=32, seed=5)
    out = prism.sparse_attention(q, k, v, scorer="probe", backend="flex", threshold=1.0)
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=_causal(300, 1000)
    )
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def _causal(sq, sk):
    return torch.arange(sk)[None, :] <= (sk - sq) + torch.arange(sq)[:, None]


@pytest.mark.parametrize("sq,sk,bs", [(1000, 1000, 64), (300, 1000, 128), (513, 777, 64)])
def test_every_query_as_probe_is_the_exact_block_mass(sq, sk, bs):
    q, k, _ = make(sq, sk, d=32, seed=6)
    s = prism.build_scorer("probe", block_size=bs, probes=bs, placement="ends", threshold=0.9)
    probs = s.block_probs(q, k)
    mass = block_attention_mass(q, k, bs)
    lengths = block_lengths(sq, bs)
    torch.testing.assert_close(probs, mass / lengths[:, None], atol=1e-6, rtol=0)
    # hence the selection (and its recall) is the top-p of the true mass of each block row
    sel = s(q, k)
    true_sel = prism.build_scorer("probe", block_size=bs, threshold=0.9)
    visible, _ = block_causal(sq, sk, bs)
    oracle = true_sel.finalize(top_p(mass / lengths[:, None], visible, 0.9), sq, sk)
    assert torch.equal(sel.mask, oracle.mask)
    torch.testing.assert_close(attention_recall(mass, sel), attention_recall(mass, oracle))


def test_two_probes_recall_close_to_the_exact_mass_on_structured_input():
    """Sanity of the estimator (not of the code): on RoPE-structured synthetic input the 2-probe
    selection keeps most of the true mass, far more than its density."""
    q, k, _ = make(2048, 2048, d=64, b=1, seed=7)
    sel = prism.build_scorer("probe", threshold=0.9)(q, k)
    recall = attention_recall(block_attention_mass(q, k, 128), sel)
    assert float(recall.mean()) > sel.density + 0.2


def test_rules_top_k_and_min_prob_on_the_probe_probs():
    q, k, _ = make(700, 1500, d=32, seed=8)
    ref_probs = naive_probe_probs(q, k, 64, 2, "shared").float()  # the default placement
    visible, partial = block_causal(700, 1500, 64)
    s = prism.build_scorer("probe", block_size=64, rule="top_k", top_k=3)
    want = top_k(ref_probs, visible, 3) | partial
    want[..., 0] = True
    assert torch.equal(s(q, k).mask, want & visible)
    s = prism.build_scorer("probe", block_size=64, rule="min_prob", min_prob=0.05)
    want = (ref_probs >= 0.05) | partial
    want[..., 0] = True
    assert torch.equal(s(q, k).mask, want & visible)


def test_no_forced_blocks_when_disabled():
    q, k, _ = make(1000, 1000, d=32, seed=9)
    sel = prism.build_scorer(
        "probe", threshold=0.6, force_sink=False, force_diagonal=False, block_size=64
    )(q, k)
    ref = naive_probe(
        q, k, bs=64, p=0.6, probes=2, placement="shared", force_sink=False, force_diagonal=False
    )
    assert torch.equal(sel.mask, ref)


def test_bf16_input_close_to_fp32():
    q, k, _ = make(1000, 2000, d=64, seed=10)
    s = prism.build_scorer("probe", threshold=0.9)
    a = s(q, k).mask
    b = s(q.bfloat16(), k.bfloat16()).mask
    assert (a != b).float().mean() < 0.02  # only near-ties may flip


def test_gqa_does_not_mix_heads():
    # query head h must use KV head h // G: changing KV head 1 leaves the heads of KV head 0 alone
    q, k, _ = make(600, 600, d=32, b=1, hq=6, hkv=3, seed=11)
    s = prism.build_scorer("probe", block_size=64, probes=2)
    p0 = s.block_probs(q, k)
    k2 = k.clone()
    k2[:, 1] = torch.randn_like(k2[:, 1])
    p1 = s.block_probs(q, k2)
    assert torch.equal(p0[:, [0, 1, 4, 5]], p1[:, [0, 1, 4, 5]])
    assert not torch.equal(p0[:, 2:4], p1[:, 2:4])


@pytest.mark.parametrize(
    "params,match",
    [
        ({"probes": 0}, r"probes must be >= 1"),
        ({"probes": -3}, r"probes must be >= 1"),
        ({"probes": 129}, r"probes must be <= block_size \(128\)"),
        ({"probes": 65, "block_size": 64}, r"probes must be <= block_size \(64\)"),
        ({"placement": "random"}, "valid placements"),
        ({"chunk_mb": 0}, "chunk_mb must be >= 1"),
        ({"rule": "nope"}, "valid rules"),
        ({"probez": 2}, "valid keys"),
    ],
)
def test_bad_config(params, match):
    with pytest.raises(ValueError, match=match):
        prism.build_scorer("probe", **params)


def test_bad_config_types():
    with pytest.raises(TypeError, match="probes must be an int"):
        ProbeConfig(probes=2.0)
    with pytest.raises(TypeError, match="probes must be an int"):
        ProbeConfig(probes=True)


def test_probes_equal_block_size_is_allowed():
    assert prism.build_scorer("probe", block_size=64, probes=64).config.probes == 64


def test_memory_is_bounded_by_the_chunk():
    r = probe_peak_extra(probes=2)
    assert r["nkb"] == 256
    chunk = 8 << 20
    block_level = 8 * 256 * 256 * 4  # one fp32 [B, Hq, NQB, NKB]: 2 MiB
    all_probe_scores = 8 * 512 * 32768 * 4  # the unchunked [B, Hq, NQB·P, Sk] scores: 512 MiB
    bound = 4 * chunk + 20 * block_level  # scores + mask + block sums of one chunk, rule buffers
    assert r["extra"] < bound, (r, bound)
    assert bound < all_probe_scores / 5
