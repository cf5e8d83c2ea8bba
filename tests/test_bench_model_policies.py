"""benchmarks/bench_model.py's policy sizing: ``topk:FRAC`` gives the density it names.

The top-k sizing decides what "20 % density" means in the 8B results, so it is checked here
against a direct count over the block-causal grid (no model, no GPU)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_model():
    spec = importlib.util.spec_from_file_location(
        "bench_model", REPO / "benchmarks" / "bench_model.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_model"] = mod  # (its dataclasses look their module up)
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("bench_model", None)


def _density(n: int, k: int, forced: bool) -> float:
    """Kept share of the n x n block-causal grid: each row keeps its top k blocks plus, when
    ``forced``, the sink and the diagonal (counted once where they coincide or the top k is the
    whole row). The top-k set is taken as the k blocks nearest the diagonal but one, so the
    forced blocks are extra wherever the row is long enough (the sizing's assumption)."""
    keep = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        keep[i, max(0, i - k) : i] = True  # k blocks, not the diagonal, where the row allows
        if i < k:
            keep[i, : i + 1] = True
        if forced:
            keep[i, 0] = keep[i, i] = True
    return keep.sum().item() / (n * (n + 1) / 2)


@pytest.mark.parametrize("n,frac", [(64, 0.2), (256, 0.1), (1024, 0.2), (1024, 0.05)])
def test_topk_counts_the_forced_blocks_and_is_nearest(bench_model, n, frac):
    k = bench_model.topk_for_density(n, frac)
    got = _density(n, k, forced=True)
    # nearest: neither neighbour is closer to the target
    for other in (k - 1, k + 1):
        assert abs(got - frac) <= abs(_density(n, other, forced=True) - frac) + 1e-12
    assert abs(got - frac) < 2.0 / n


def test_forced_zero_is_the_smallest_k_reaching_the_target(bench_model):
    n = 1024
    k = bench_model.topk_for_density(n, 0.2, forced=0)
    assert k == 109  # the sizing of the session-5 8B results (density 0.204 at 128K)
    assert _density(n, k, forced=False) >= 0.2 > _density(n, k - 1, forced=False)


def test_topk_policy_sizes_k_with_the_policy_block_size(bench_model):
    cfg = bench_model.Defaults()
    kw128 = bench_model.policy_kwargs("topk:0.2", 131072, cfg)
    kw64 = bench_model.policy_kwargs("topk:0.2:block_size=64", 131072, cfg)
    assert kw128["top_k"] == bench_model.topk_for_density(1024, 0.2)
    assert kw64["block_size"] == 64
    assert kw64["top_k"] == bench_model.topk_for_density(math.ceil(131072 / 64), 0.2)
    assert kw64["top_k"] > kw128["top_k"]


@pytest.mark.parametrize(
    "name,path,extra",
    [
        ("cfg:p.yaml", "p.yaml", {}),
        ("cfg:p.yaml:placement=shared", "p.yaml", {"placement": "shared"}),
        ("cfg:C:/x/p.yaml", "C:/x/p.yaml", {}),  # a ':' inside the path
        (
            "cfg:C:/x/p.yaml:probes=4+placement=ends",
            "C:/x/p.yaml",
            {"probes": 4, "placement": "ends"},
        ),
    ],
)
def test_cfg_policy_splits_path_and_overrides(bench_model, name, path, extra):
    kw = bench_model.policy_kwargs(name, 8192, bench_model.Defaults())
    assert kw["config"] == path
    assert {k: v for k, v in kw.items() if k in extra} == extra
    assert not set(extra) - set(kw)


def test_proportional_bound_is_amdahl(bench_model):
    # abstract costs, no clock: dense 100 of which 80 attention; a kernel at a quarter of it
    # leaves 20 + 20
    assert bench_model.proportional_bound(100.0, 20.0, 0.25) == pytest.approx(2.5)
    assert bench_model.proportional_bound(100.0, 20.0, 1.0) == pytest.approx(1.0)
    # density -> 0: only the non-attention work is left
    assert bench_model.proportional_bound(100.0, 20.0, 0.0) == pytest.approx(5.0)


def test_null_real_returns_a_captured_real_attention_output(bench_model):
    """The ``null_real`` forward: a dense forward through ``bench_outcap`` keeps the middle
    layer's attention output; ``bench_null_real`` then hands exactly that tensor to every layer
    (so the non-attention work runs on real data), and refuses a shape it has not captured."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip
    conf._attn_implementation = "sdpa"
    model = LlamaForCausalLM(conf).eval()
    bench_model.register_helpers()
    ids = torch.randint(0, 64, (2, 37))
    seen = []
    real = bench_model._real_null_attention

    def spy(module, query, key, value, attention_mask, **kwargs):
        out, w = real(module, query, key, value, attention_mask, **kwargs)
        seen.append(out)
        return out, w

    store = bench_model._NULL_REAL
    store.clear()
    store["layer"] = 2
    try:
        with torch.no_grad():
            with bench_model.attn_impl(model, "bench_outcap"):
                h_dense = model.model(input_ids=ids).last_hidden_state
            captured = store[(2, 37, 4, 8)]
            # the capture is the real attention of layer 2: the SDPA output of its Q/K/V
            assert captured.shape == (2, 37, 4, 8) and captured.abs().sum() > 0
            from transformers import AttentionInterface

            AttentionInterface.register("bench_null_real", spy)
            with bench_model.attn_impl(model, "bench_null_real"):
                h_null = model.model(input_ids=ids).last_hidden_state
            assert len(seen) == 4 and all(t is captured for t in seen)
            assert torch.isfinite(h_null).all() and not torch.allclose(h_null, h_dense)
            with bench_model.attn_impl(model, "bench_null_real"):
                with pytest.raises(RuntimeError, match="no captured attention output"):
                    model.model(input_ids=ids[:, :20])
    finally:
        store.clear()
        bench_model.register_helpers()
