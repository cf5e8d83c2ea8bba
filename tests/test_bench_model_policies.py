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
