"""The oracle scorer (true block mass + the standard selection) against its float64 loop
reference ``naive_scorers.naive_oracle``, and the property that defines it: top-p on the true
mass gives every query block at least ``threshold`` of its mass."""

from __future__ import annotations

import pytest
import torch
from naive_scorers import naive_oracle

from prism.metrics import block_attention_mass
from prism.scorers import build_scorer
from prism.synthetic import synthetic_qkv

CASES = [  # (B, Hq, Hkv, Sq, Sk, BS, threshold)
    (1, 2, 1, 127, 127, 16, 0.9),  # ragged
    (2, 4, 2, 100, 100, 32, 0.8),  # batch 2, GQA
    (1, 4, 2, 50, 133, 16, 0.95),  # cached prefix, no block multiple
    (1, 3, 3, 1, 77, 16, 0.7),  # one query row
]


def _qk(b, hq, hkv, sq, sk, seed=0):
    q, k, _ = synthetic_qkv(
        batch=b, q_heads=hq, kv_heads=hkv, length=sk, q_len=sq, head_dim=32, seed=seed
    )
    return q, k


@pytest.mark.parametrize("case", range(len(CASES)))
def test_oracle_matches_float64_reference(case):
    b, hq, hkv, sq, sk, bs, p = CASES[case]
    q, k = _qk(b, hq, hkv, sq, sk, seed=case)
    sel = build_scorer("oracle", block_size=bs, threshold=p)(q, k)
    want = naive_oracle(q, k, bs, p)
    assert torch.equal(sel.mask, want)
    assert sel.mask.float().mean() < 1.0 or sq <= bs


@pytest.mark.parametrize("chunk_mb", [1, 256])
def test_oracle_rows_reach_their_threshold(chunk_mb):
    """Rows sum to 1, and each query block's selection holds >= threshold of its true mass (the
    scores of a 1 MiB step span one block of queries: the chunked path)."""
    q, k = _qk(2, 4, 2, 300, 700)
    sc = build_scorer("oracle", block_size=32, threshold=0.9, chunk_mb=chunk_mb)
    probs = sc.block_probs(q, k)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5, rtol=0)
    mass = block_attention_mass(q, k, 32)
    kept = (mass * sc(q, k).mask).sum(-1) / mass.sum(-1)
    assert (kept >= 0.9 - 1e-5).all()
    assert sc(q, k).density < 0.9


def test_oracle_reuses_masses_only_for_the_same_unchanged_inputs():
    q, k = _qk(1, 2, 1, 100, 100)
    sc = build_scorer("oracle", block_size=16)
    a = sc.block_probs(q, k)
    assert build_scorer("oracle", block_size=16, threshold=0.5).block_probs(q, k) is a
    assert build_scorer("oracle", block_size=32).block_probs(q, k) is not a  # other blocks
    q2 = q.clone()
    assert sc.block_probs(q2, k) is not a  # another tensor, equal values: recomputed ...
    torch.testing.assert_close(sc.block_probs(q2, k), a)
    q.mul_(3.0)  # ... and an in-place change is seen
    b = sc.block_probs(q, k)
    assert b is not a and not torch.allclose(a, b)
    torch.testing.assert_close(b, build_scorer("oracle", block_size=16).block_probs(q * 1, k))


def test_oracle_bad_config():
    with pytest.raises(ValueError, match="chunk_mb"):
        build_scorer("oracle", chunk_mb=0)
    with pytest.raises(ValueError, match="valid keys"):
        build_scorer("oracle", probes=2)
