"""Recall / oracle definitions of the accuracy harness (prism.eval.recall)."""

import pytest
import torch

import prism
from prism.eval.modeling import capture_qk, tiny_llama
from prism.eval.recall import (
    LayerData,
    density_at_recall,
    evaluate_oracle,
    evaluate_scorer,
    match_density,
    minimal_count,
    oracle_density,
    oracle_selection,
    recall_at_density,
    selection_stats,
)
from prism.masks import block_causal
from prism.metrics import attention_recall, block_attention_mass
from prism.synthetic import synthetic_qkv


@pytest.fixture(scope="module")
def qk_mass():
    q, k, _ = synthetic_qkv(length=1024, q_heads=4, kv_heads=2, head_dim=32, seed=3)
    return q, k, block_attention_mass(q, k, 64, chunk=256)


def test_full_selection_recall_is_one(qk_mass):
    q, k, mass = qk_mass
    sel = prism.build_scorer("dense", block_size=64)(q, k)
    stats = selection_stats(mass, sel)
    assert torch.allclose(stats["recall"], torch.ones_like(stats["recall"]), atol=1e-5)
    assert torch.allclose(stats["density"], torch.ones_like(stats["density"]))
    # a full selection through a top-p scorer at threshold 1.0 too
    sel = prism.build_scorer("prism", block_size=64, threshold=1.0)(q, k)
    assert torch.allclose(attention_recall(mass, sel), torch.ones(1, 4), atol=1e-5)


@pytest.mark.parametrize("mode", ["head", "row"])
@pytest.mark.parametrize("target", [0.5, 0.9, 0.99])
def test_oracle_selection_meets_target_and_is_minimal(qk_mass, mode, target):
    _, _, mass = qk_mass
    sel = oracle_selection(mass, target, mode)
    if mode == "head":
        rec = attention_recall(mass, sel)
        assert (rec >= target - 1e-6).all()
        # minimal: dropping its smallest block falls below the target
        for h in range(mass.shape[1]):
            m, s = mass[0, h], sel[0, h]
            smallest = m[s].min()
            assert (m[s].sum() - smallest) / m.sum() < target
    else:
        row_rec = (mass * sel).sum(-1) / mass.sum(-1)
        assert (row_rec >= target - 1e-6).all()
        m = mass.masked_fill(~sel, float("inf")).min(-1).values
        assert ((mass * sel).sum(-1) - m < target * mass.sum(-1)).all()
    visible, _ = block_causal(1024, 1024, 64)
    dens = oracle_density(mass, visible, target, mode)
    expect = (sel & visible).sum(dim=(-2, -1)).float() / visible.sum()
    assert torch.allclose(dens, expect)


def test_oracle_is_a_floor_for_scorers(qk_mass):
    q, k, mass = qk_mass
    for name in ("prism", "meanpool"):
        sel = prism.build_scorer(name, block_size=64, threshold=0.9)(q, k)
        st = selection_stats(mass, sel)
        assert (st["oracle_density"] <= st["density"] + 1e-6).all()
        assert (st["oracle_row_density"] <= st["density"] + 1e-6).all()
        # the head oracle is the tightest of the two
        assert (st["oracle_density"] <= st["oracle_row_density"] + 1e-6).all()


def test_minimal_count_known_case():
    v = torch.tensor([[0.1, 0.5, 0.2, 0.2]])
    assert minimal_count(v, torch.tensor([0.5])).item() == 1
    assert minimal_count(v, torch.tensor([0.51])).item() == 2
    assert minimal_count(v, torch.tensor([0.9])).item() == 3
    assert minimal_count(v, torch.tensor([1.0])).item() == 4


def test_evaluate_helpers_on_synthetic_layers(qk_mass):
    q, k, _ = qk_mass
    layers = {0: LayerData(q, k, 64, 256), 3: LayerData(q[:, :, :512], k[:, :, :512], 64, 256)}
    out = evaluate_scorer(prism.build_scorer("prism", block_size=64, threshold=0.9), layers)
    assert out["layers"] == [0, 3]
    assert len(out["recall_per_head"]) == 2 and len(out["recall_per_head"][0]) == 4
    assert 0 < out["density"] <= 1 and 0 < out["recall"] <= 1
    assert out["recall_min"] <= out["recall"]
    # block probabilities computed beforehand: the scorer's rule applied to those, not its own
    mp = prism.build_scorer("meanpool", block_size=64, threshold=0.8, impl="torch")
    orac = prism.build_scorer("oracle", block_size=64, threshold=0.8)
    probs = {i: orac.block_probs(ld.q, ld.k) for i, ld in layers.items()}
    assert evaluate_scorer(mp, layers, probs) == evaluate_scorer(orac, layers)
    assert evaluate_scorer(mp, layers, probs)["recall"] != evaluate_scorer(mp, layers)["recall"]
    orc = evaluate_oracle(layers, 0.95, "head")
    assert orc["recall"] >= 0.95 - 1e-6
    value, dens = match_density({"scorer": "meanpool", "block_size": 64}, layers, 0.5)
    assert 0.01 <= value <= 1.0 and abs(dens - 0.5) < 0.08


def test_pareto_interpolation():
    pts = [(0.2, 0.8), (0.4, 0.9), (0.6, 0.99)]
    assert density_at_recall(pts, 0.8) == pytest.approx(0.2)
    assert density_at_recall(pts, 0.85) == pytest.approx(0.3)
    assert density_at_recall(pts, 0.95) == pytest.approx(0.4 + 0.2 * 5 / 9)
    assert density_at_recall(pts, 0.999) is None
    assert density_at_recall(pts, 0.5) == pytest.approx(0.2)
    assert recall_at_density(pts, 0.3) == pytest.approx(0.85)
    assert recall_at_density(pts, 0.1) is None


def test_capture_matches_eager_attention_weights():
    """Captured post-RoPE Q/K reproduce the model's own attention probabilities (GQA mapping
    and RoPE included): their blockwise mass equals the eager attention weights summed into blocks."""
    model = tiny_llama()
    ids = torch.randint(
        0, model.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0)
    )
    qk = capture_qk(model, ids, [1])
    q, k = qk[1]
    assert q.shape == (1, 4, 256, 32) and k.shape == (1, 2, 256, 32)
    mass = block_attention_mass(q, k, 64)
    model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            att = model(ids, output_attentions=True).attentions[1]  # [1, 4, 256, 256]
    finally:
        model.config._attn_implementation = "sdpa"
    ref = att.view(1, 4, 4, 64, 4, 64).sum(dim=(3, 5))
    assert torch.allclose(mass, ref, atol=1e-4)
