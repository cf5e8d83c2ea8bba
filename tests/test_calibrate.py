"""prism.calibrate: per-layer thresholds reaching a target recall, written as a loadable policy."""

import pytest
import torch

import prism
from prism.calibrate import CalibrateArgs, calibrate, choose_thresholds
from prism.metrics import attention_recall, block_attention_mass

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny():
    from prism.models import tiny_model

    model = tiny_model("llama", layers=3, max_positions=1024)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, 640), generator=g)
    return model, ids


def _recall(q, k, t, bs):
    sel = prism.build_scorer("meanpool", threshold=t, block_size=bs)(q, k)
    return float(attention_recall(block_attention_mass(q, k, bs), sel).mean())


def test_choice_is_the_smallest_threshold_reaching_the_target():
    torch.manual_seed(0)
    qk = {i: (torch.randn(1, 4, 600, 32), torch.randn(1, 2, 600, 32)) for i in range(2)}
    qk[1] = (qk[1][0] * 3, qk[1][1] * 3)  # a peakier layer: needs a different threshold
    cands = [0.5, 0.7, 0.8, 0.9, 0.95, 0.99]
    choices = choose_thresholds(qk, "meanpool", 0.9, cands, block_size=32)
    for c in choices:
        q, k = qk[c.layer]
        assert c.threshold is not None
        # recomputed independently: the pick reaches the target, the next smaller one does not
        assert _recall(q, k, c.threshold, 32) >= 0.9
        smaller = [t for t in cands if t < c.threshold]
        if smaller:
            assert _recall(q, k, smaller[-1], 32) < 0.9
        assert 0 < c.density < 1


def test_unreachable_target_makes_the_layer_dense():
    torch.manual_seed(0)
    qk = {0: (torch.randn(1, 4, 600, 32), torch.randn(1, 2, 600, 32))}
    (c,) = choose_thresholds(qk, "meanpool", 0.99999, [0.3, 0.5], block_size=32)
    assert c.threshold is None


def test_bad_arguments():
    qk = {0: (torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16))}
    with pytest.raises(ValueError, match="target_recall"):
        choose_thresholds(qk, "meanpool", 1.5, [0.9], block_size=16)
    with pytest.raises(ValueError, match="statistic"):
        choose_thresholds(qk, "meanpool", 0.9, [0.9], block_size=16, statistic="median")


def test_calibrated_policy_loads_and_runs(tiny, tmp_path):
    model, ids = tiny
    args = CalibrateArgs(
        scorer="meanpool",
        target_recall=0.95,
        block_size=32,
        backend="reference",
        thresholds=[0.5, 0.8, 0.9, 0.95, 0.99],
    )
    choices, text = calibrate(model, ids, args)
    assert len(choices) == model.config.num_hidden_layers
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    policy = prism.PrismPolicy.from_config(path)
    for c in choices:
        scorer = policy.scorer_for(c.layer)
        if c.threshold is None:
            assert scorer is None
        else:
            assert scorer.config.threshold == c.threshold
    with torch.no_grad():
        dense = model(ids).logits
        prism.patch_model(model, config=path)
        try:
            with prism.collect_stats(model) as st:
                sparse = model(ids).logits
        finally:
            prism.unpatch_model(model)
    assert torch.isfinite(sparse).all()
    assert st.overall_density < 1  # CPU: the default min_len is two blocks
    assert (sparse - dense).abs().max() < 1.0  # calibrated to 95 % recall: close to dense
