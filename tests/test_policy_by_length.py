"""Length-bucketed policies (``by_length``): the layers' scorers chosen by the call's key count.

Unit level (which scorer a layer gets at which Sk, YAML loading, bad buckets) and through the
Hugging Face integration on a tiny random Llama (CPU, flex): a bucket with threshold 1.0 from
a given length on gives exactly the dense model's logits there, while shorter inputs run sparse.
"""

from __future__ import annotations

import pytest
import torch

import prism
from prism.models.tiny import tiny_model
from prism.policy import PrismPolicy


def _policy(**kw):
    return PrismPolicy.from_dict(
        {
            "scorer": "probe",
            "threshold": 0.99,
            "layers": {0: {"threshold": 0.995}},
            "by_length": {
                1000: {"threshold": 0.97, "layers": {"0-1": {"threshold": 0.98}}},
                5000: {"threshold": 0.9, "dense_layers": [2]},
            },
            **kw,
        }
    )


def test_scorer_per_layer_and_length():
    pol = _policy()
    th = lambda layer, n: pol.scorer_for(layer, n).config.threshold  # noqa: E731
    assert [th(0, 999), th(1, 999), th(3, 999)] == [0.995, 0.99, 0.99]  # the base policy
    assert [th(0, 1000), th(1, 4999), th(3, 1000)] == [0.98, 0.98, 0.97]  # bucket 1000
    # bucket 5000 sets no layers: it inherits the base override of layer 0, not bucket 1000's
    assert [th(0, 5000), th(3, 10**6)] == [0.995, 0.9]
    assert pol.scorer_for(2, 5000) is None and pol.scorer_for(2, 4999) is not None
    assert pol.scorer_for(0).config.threshold == 0.995  # no length: the base choice
    assert pol.scorer_for(3, 5000).name == "probe"  # scorer keys inherited from the base
    assert pol.for_length(20) is pol and pol.for_length(7000) is pol.by_length[5000]
    assert pol.max_layer == 2
    assert "from 1000 keys" in pol.describe() and "by_length=[1000, 5000]" in repr(pol)
    # routing (backend, min_len) is the policy's: named once, not again in every bucket
    assert pol.describe().count("backend=") == 1 and pol.describe().count("min_len=") == 1


def test_buckets_inherit_dense_layers_and_overrides():
    pol = PrismPolicy(
        "prism",
        threshold=0.9,
        dense_layers=1,
        layers={3: {"dense": True}, 4: {"threshold": 0.7}},
        by_length={1000: {"threshold": 0.8}, 2000: {"dense_layers": [5], "layers": {4: {}}}},
    )
    assert pol.scorer_for(0, 1500) is None and pol.scorer_for(3, 1500) is None
    assert pol.scorer_for(4, 1500).config.threshold == 0.7  # the base override of layer 4
    assert pol.scorer_for(1, 1500).config.threshold == 0.8
    # bucket 2000 names its own dense layers (5 only); its layer-4 entry replaces the base's
    assert pol.scorer_for(0, 2000) is not None and pol.scorer_for(5, 2000) is None
    assert pol.scorer_for(3, 2000) is None  # the base's {dense: true} override is inherited
    assert pol.scorer_for(4, 2000).config.threshold == 0.9


def test_yaml_and_errors(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "scorer: meanpool\nthreshold: 0.9\nby_length:\n  2048:\n    threshold: 0.8\n"
        "    layers:\n      1: {dense: true}\n"
    )
    pol = PrismPolicy.from_config(path)
    assert pol.scorer_for(0, 4096).config.threshold == 0.8 and pol.scorer_for(1, 4096) is None
    assert pol.scorer_for(1, 2047).config.threshold == 0.9
    with pytest.raises(ValueError, match="backend, min_len, min_query_len and padding"):
        PrismPolicy("prism", by_length={1000: {"min_len": 5}})
    with pytest.raises(ValueError, match="ints >= 1"):
        PrismPolicy("prism", by_length={"long": {"threshold": 0.9}})
    with pytest.raises(ValueError, match=r"one block_size \(KV block\) for every length"):
        PrismPolicy("prism", by_length={1000: {"block_size": 64}})
    with pytest.raises(ValueError, match=r"one block_size \(KV block\) for every length"):
        PrismPolicy("prism", q_block_size=192, by_length={1000: {"block_size": 64}})
    with pytest.raises(ValueError, match="does not support q_block_size=192"):
        PrismPolicy("xattn", by_length={1000: {"q_block_size": 192}})
    with pytest.raises(ValueError, match="unknown config key"):
        PrismPolicy("prism", by_length={1000: {"treshold": 0.9}})
    with pytest.raises(TypeError, match="must be a mapping"):
        PrismPolicy("prism", by_length={1000: 0.9})


@torch.no_grad()
def test_hf_model_takes_the_bucket_of_its_length():
    model = tiny_model("llama", layers=2)
    g = torch.Generator().manual_seed(0)
    short, long = (torch.randint(0, 512, (1, n), generator=g) for n in (700, 1300))
    dense = {n: model(ids).logits for n, ids in ((700, short), (1300, long))}
    prism.patch_model(
        model,
        scorer="meanpool",
        threshold=0.5,
        block_size=64,
        min_len=1,
        by_length={1024: {"threshold": 1.0}},
    )
    with prism.collect_stats(model) as st:
        out_short = model(short).logits
    assert st.overall_density < 0.9  # below 1024 keys: threshold 0.5, sparse
    assert (out_short - dense[700]).abs().max() > 1e-3
    with prism.collect_stats(model) as st:
        out_long = model(long).logits
    assert st.overall_density == pytest.approx(1.0)  # from 1024 keys: threshold 1.0
    torch.testing.assert_close(out_long, dense[1300], atol=2e-4, rtol=2e-4)


def test_shipped_near_lossless_policy_is_r99_then_r98():
    """``smollm2_probe_near_lossless.yaml`` (measured on the H200) = r99 below 32K keys and r98
    from 32K, layer by layer."""
    folder = "prism/configs/policies/"
    nl = PrismPolicy.from_config(folder + "smollm2_probe_near_lossless.yaml")
    r98 = PrismPolicy.from_config(folder + "smollm2_probe_r98.yaml")
    r99 = PrismPolicy.from_config(folder + "smollm2_probe_r99.yaml")
    for layer in range(30):
        assert nl.scorer_for(layer, 32767).config == r99.scorer_for(layer).config
        assert nl.scorer_for(layer, 32768).config == r98.scorer_for(layer).config


def test_buckets_may_change_the_query_block():
    """The KV block is the policy's; a bucket may set its own query block (rectangular grid)."""
    pol = PrismPolicy("prism", by_length={4096: {"q_block_size": 192}})
    assert pol.scorer_for(0, 4095).block_size == 128
    assert pol.scorer_for(0, 4096).block_size == (192, 128)
    assert pol.min_len == 256  # two KV blocks, whatever the query block
    # and back: a rectangular base with a square bucket; a bucket with another scorer takes the
    # bucket's grid
    pol = PrismPolicy(
        "meanpool", q_block_size=192, by_length={4096: {"q_block_size": 0, "scorer": "prism"}}
    )
    assert pol.scorer_for(0, 100).block_size == (192, 128)
    assert pol.scorer_for(0, 5000).block_size == 128 and pol.scorer_for(0, 5000).name == "prism"


def test_shipped_fa4_hopper_policy_is_prism_then_192_rows():
    """``prism_fa4_hopper.yaml``: the default Prism scorer, 192-row query blocks from 128K keys."""
    pol = PrismPolicy.from_config("prism/configs/policies/prism_fa4_hopper.yaml")
    base = PrismPolicy("prism").scorer
    below, above = pol.scorer_for(5, 131071), pol.scorer_for(5, 131072)
    assert below.config == base.config and below.block_size == 128
    assert above.block_size == (192, 128)
    assert {k: v for k, v in vars(above.config).items() if k != "q_block_size"} == {
        k: v for k, v in vars(base.config).items() if k != "q_block_size"
    }


@torch.no_grad()
def test_hf_model_runs_the_bucket_grid():
    """Through the HF integration: below the bucket the square grid, from it 192 x 128 blocks
    (the causal block count per call is the grid's), and at threshold 1.0 the dense logits."""
    from prism.masks import block_causal

    model = tiny_model("llama", layers=2)
    heads = model.config.num_attention_heads
    long = torch.randint(0, 512, (1, 1300), generator=torch.Generator().manual_seed(1))
    short = long[:, :700]
    dense = model(long).logits
    prism.patch_model(
        model, scorer="meanpool", threshold=1.0, min_len=1,
        by_length={1024: {"q_block_size": 192}},
    )  # fmt: skip
    try:
        for ids, grid in ((short, 128), (long, (192, 128))):
            with prism.collect_stats(model) as st:
                out = model(ids).logits
            n = ids.shape[1]
            per_call = int(block_causal(n, n, grid, "cpu")[0].sum()) * heads
            for layer in st.layers.values():
                assert layer.sparse_calls == 1 and layer.causal_blocks == per_call, grid
                assert layer.selected_blocks == per_call
        torch.testing.assert_close(out, dense, atol=2e-4, rtol=2e-4)
    finally:
        prism.unpatch_model(model)


@torch.no_grad()
def test_padded_batch_runs_each_row_on_its_own_bucket_grid():
    """Left padding, eager: a 1300-token row takes the 192 x 128 bucket, a 700-token row the
    square grid, in one batch; causal block counts per call are the two grids' sum, and at
    threshold 1.0 the valid positions give the dense logits."""
    from prism.masks import block_causal

    model = tiny_model("llama", layers=2)
    heads = model.config.num_attention_heads
    total, lengths = 1300, (1300, 700)
    ids = torch.randint(1, 512, (2, total), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, : total - lengths[1]] = 0
    ids[1, : total - lengths[1]] = 0
    dense = model(ids, attention_mask=mask).logits
    prism.patch_model(
        model, scorer="meanpool", threshold=1.0, min_len=1,
        by_length={1024: {"q_block_size": 192}},
    )  # fmt: skip
    try:
        with prism.collect_stats(model) as st:
            out = model(ids, attention_mask=mask).logits
    finally:
        prism.unpatch_model(model)
    grids = {1300: (192, 128), 700: 128}
    expected = heads * sum(int(block_causal(n, n, grids[n], "cpu")[0].sum()) for n in lengths)
    for layer in st.layers.values():
        assert layer.causal_blocks == expected and layer.selected_blocks == expected
    valid = mask.bool()
    torch.testing.assert_close(out[valid], dense[valid], atol=2e-4, rtol=2e-4)
