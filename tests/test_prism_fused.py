"""CPU tests of the fused Prism estimator (``prism_fused``) under Triton's interpreter.

The interpreter must be switched on (``TRITON_INTERPRET=1``) before Triton is first imported in a
process, and other test modules may import Triton first, so the kernel cases run in ONE subprocess
(this file executed as a script with ``--worker``) that prints a JSON line per case; each pytest
case asserts on its line. fp32 / fp16 only (bf16 ``tl.dot`` is wrong in the interpreter), <= 1K
tokens. Every case compares the fused selection with the unfused ``PrismScorer`` (bool mask and the
four BlockMask lists, exactly) and, for top-p, with the float64 loop reference ``naive_prism``.

In-process tests (no Triton needed) cover ``ListBlockSelection`` and the PyTorch fallback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# name: (B, Hq, Hkv, Sq, Sk, D, dtype, scorer params)
CASES = {
    "ragged127_d64": (1, 2, 1, 127, 127, 64, "float32", {}),
    "ragged300_gqa82_batch2_d128": (2, 8, 2, 300, 300, 128, "float32", {"threshold": 0.9}),
    "ragged1000_gqa82_d64": (1, 8, 2, 1000, 1000, 64, "float32", {"threshold": 0.9}),
    "len1000_d128_nocalib": (1, 4, 2, 1000, 1000, 128, "float32", {"calibrate": False}),
    "prefix700_not_multiple": (1, 4, 1, 300, 1000, 64, "float32", {"threshold": 0.8}),
    "prefix256_multiple": (2, 4, 2, 640, 896, 64, "float32", {}),
    "per_band_thresholds": (
        1,
        4,
        2,
        1000,
        1000,
        128,
        "float32",
        {"threshold_high": 0.7, "threshold_low": 0.99},
    ),
    "interleaved": (1, 4, 2, 1000, 1000, 64, "float32", {"rope_layout": "interleaved"}),
    "bands32_d64": (1, 4, 2, 900, 900, 64, "float32", {"high_dims": 32, "low_dims": 32}),
    "block64": (1, 4, 2, 1000, 1000, 64, "float32", {"block_size": 64, "threshold": 0.9}),
    "no_forced": (
        1,
        4,
        2,
        1000,
        1000,
        64,
        "float32",
        {"force_sink": False, "force_diagonal": False, "threshold": 0.8},
    ),
    "threshold1_dense": (1, 4, 2, 700, 1000, 64, "float32", {"threshold": 1.0}),
    "fp16_gqa": (1, 8, 2, 1000, 1000, 128, "float16", {}),
    "group3": (1, 6, 2, 1000, 1000, 64, "float32", {"threshold": 0.9}),
    "mqa_group8": (1, 8, 1, 800, 800, 64, "float32", {}),
    "single_query": (1, 4, 2, 1, 500, 64, "float32", {}),
    "top_k": (1, 4, 2, 1000, 1000, 64, "float32", {"rule": "top_k", "top_k": 3}),
    "min_prob": (1, 4, 2, 1000, 1000, 64, "float32", {"rule": "min_prob", "min_prob": 0.05}),
    "threshold_0p9999": (1, 4, 2, 1000, 1000, 64, "float32", {"threshold": 0.9999}),
    # explicit launch shapes with the causal tiers on (narrow register rows for early query tiles,
    # identity tails of the lists): small blocks make NKB large enough for the tiers at <= 1K tokens
    "tiers3_block16": (
        1,
        4,
        2,
        1000,
        1000,
        64,
        "float32",
        {"block_size": 16, "threshold": 0.9},
    ),
    "tiers3_block16_prefix": (1, 8, 2, 700, 1000, 64, "float16", {"block_size": 16}),
    "tiers2_block32_prefix_topk": (
        1,
        4,
        1,
        500,
        1000,
        64,
        "float32",
        {"block_size": 32, "rule": "top_k", "top_k": 5},
    ),
}
LAUNCH = {  # case -> SelectConfig kwargs (other cases use the default launch shape)
    "tiers3_block16": dict(block_g=4, block_q=4, num_warps=4, tiers=3),
    "tiers3_block16_prefix": dict(block_g=4, block_q=4, num_warps=2, tiers=3),
    "tiers2_block32_prefix_topk": dict(block_g=1, block_q=16, num_warps=4, tiers=2),
}


# ------------------------------------------------------------------------------------------------
# worker (runs in a subprocess with TRITON_INTERPRET=1)
# ------------------------------------------------------------------------------------------------
def _worker(names: list[str]) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))
    from naive_scorers import naive_prism

    import prism
    from prism.kernels.estimation import (
        SelectConfig,
        block_lists_to_block_mask,
        block_lists_to_selection,
        prism_select_block_lists,
    )
    from prism.masks import block_causal, block_mask_to_bool, bool_to_block_lists
    from prism.scorers.prism import PrismScorer
    from prism.synthetic import synthetic_qkv

    for name in names:
        b, hq, hkv, sq, sk, d, dtype, params = CASES[name]
        seed = sum(map(ord, name))
        q, k, _ = synthetic_qkv(
            batch=b, q_heads=hq, kv_heads=hkv, length=sk, q_len=sq, head_dim=d, seed=seed
        )
        q, k = q.to(getattr(torch, dtype)), k.to(getattr(torch, dtype))
        res = {"case": name}
        try:
            scorer = prism.build_scorer("prism_fused", **params)
            if name in LAUNCH:  # the API with an explicit launch shape, wrapped as the scorer does
                lists = prism_select_block_lists(q, k, scorer.config, SelectConfig(**LAUNCH[name]))
                sel = block_lists_to_selection(lists, sq, sk, scorer.config.block_size)
                scorer.last_path = "fused"
            else:
                sel = scorer(q, k)
            ref = PrismScorer(**params)(q, k).mask
            bs = scorer.config.block_size
            visible, part = block_causal(sq, sk, bs)
            res["path"] = scorer.last_path
            res["mask_equal"] = bool(torch.equal(sel.mask, ref))
            res["diff_rows"] = int((sel.mask != ref).any(-1).sum())
            exp = bool_to_block_lists(ref & part) + bool_to_block_lists(ref & ~part)
            res["lists_equal"] = all(torch.equal(a, e) for a, e in zip(sel.lists, exp))
            res["dtypes_int32"] = all(t.dtype == torch.int32 for t in sel.lists)
            res["density"] = sel.density
            res["density_equal"] = (
                abs(
                    sel.density
                    - float((ref & visible).sum() / (visible.sum() * ref.shape[0] * ref.shape[1]))
                )
                < 1e-6
            )
            if scorer.config.rule == "top_p":
                c = scorer.config
                nv = naive_prism(
                    q,
                    k,
                    bs=bs,
                    p_high=c.threshold if c.threshold_high is None else c.threshold_high,
                    p_low=c.threshold if c.threshold_low is None else c.threshold_low,
                    high_dims=c.high_dims,
                    low_dims=c.low_dims,
                    calibrate=c.calibrate,
                    layout=c.rope_layout,
                    force_sink=c.force_sink,
                    force_diagonal=c.force_diagonal,
                )
                res["naive_equal"] = bool(torch.equal(sel.mask, nv))
            # the public API and the BlockMask helper
            launch = SelectConfig(**LAUNCH[name]) if name in LAUNCH else None
            lists = prism_select_block_lists(q, k, scorer.config, launch)
            res["api_equal"] = all(torch.equal(a, e) for a, e in zip(lists, sel.lists))
            bm = block_lists_to_block_mask(*lists, sq, sk, bs)
            p_bool, f_bool = block_mask_to_bool(bm)
            res["block_mask_ok"] = bool(
                torch.equal(p_bool, ref & part)
                and torch.equal(f_bool, ref & ~part)
                and bm.seq_lengths == (sq, sk)
                and bm.BLOCK_SIZE == (bs, bs)
            )
            sel2 = block_lists_to_selection(lists, sq, sk, bs)
            res["selection_ok"] = bool(torch.equal(sel2.mask, ref))
        except Exception as e:  # reported to the pytest case
            res["error"] = repr(e)
        print("RESULT " + json.dumps(res), flush=True)


# ------------------------------------------------------------------------------------------------
# pytest side
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def interp_results():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", *CASES],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(REPO),
        timeout=900,
    )
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT ") :])
            out[r["case"]] = r
    if not out:
        pytest.fail(f"interpreter worker produced no results:\n{proc.stdout}\n{proc.stderr}")
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_fused_matches_unfused_in_interpreter(interp_results, name):
    r = interp_results.get(name)
    assert r is not None, f"no result for {name}"
    assert "error" not in r, r.get("error")
    assert r["path"] == "fused"
    assert r["mask_equal"], f"{r['diff_rows']} query-block rows differ from PrismScorer"
    assert r["lists_equal"] and r["dtypes_int32"] and r["api_equal"]
    assert r["block_mask_ok"] and r["selection_ok"] and r["density_equal"]
    if "naive_equal" in r:
        assert r["naive_equal"]


def test_cases_exercise_sparsity(interp_results):
    """The cases must not all be trivially dense."""
    dens = {n: r["density"] for n, r in interp_results.items() if "density" in r}
    assert dens["threshold1_dense"] == pytest.approx(1.0)
    assert min(dens.values()) < 0.6


# -- in-process (no Triton) ----------------------------------------------------------------------
def _random_lists(b, h, sq, sk, bs, seed=0):
    from prism.masks import block_causal, bool_to_block_lists

    g = torch.Generator().manual_seed(seed)
    visible, part = block_causal(sq, sk, bs)
    nqb, nkb = visible.shape
    m = (torch.rand(b, h, nqb, nkb, generator=g) < 0.4) & visible
    m[..., 0] = True
    m |= part
    return m, bool_to_block_lists(m & part) + bool_to_block_lists(m & ~part)


def test_list_selection_mask_density_and_block_mask():
    from prism.masks import block_mask_to_bool, selection_to_block_mask
    from prism.masks.selection import BlockSelection
    from prism.scorers.prism_fused import ListBlockSelection

    m, lists = _random_lists(2, 3, 700, 1000, 128)
    sel = ListBlockSelection(lists, 700, 1000, 128)
    ref = BlockSelection(m, 700, 1000, 128)
    assert torch.equal(sel.mask, m)
    assert sel.density == pytest.approx(ref.density)
    torch.testing.assert_close(sel.density_per_head(), ref.density_per_head())
    bm = sel.block_mask()
    assert bm is sel.block_mask()  # built once
    for a, e in zip(
        block_mask_to_bool(bm), block_mask_to_bool(selection_to_block_mask(m, 700, 1000, 128))
    ):
        assert torch.equal(a, e)
    assert torch.equal((sel | ref).mask, m) and torch.equal((sel & ref).mask, m)
    with pytest.raises(ValueError):
        sel.block_mask(600, 1000)
    with pytest.raises(AttributeError):
        sel.mask = m


def test_list_selection_narrow_lists():
    """Lists narrower than NKB (only the first ``num`` entries matter) expand correctly."""
    from prism.scorers.prism_fused import ListBlockSelection

    m, (kn, ki, fn, fi) = _random_lists(1, 2, 512, 512, 128, seed=3)
    wk, wf = int(kn.max()), int(fn.max())
    sel = ListBlockSelection((kn, ki[..., :wk].clone(), fn, fi[..., :wf].clone()), 512, 512, 128)
    assert torch.equal(sel.mask, m)


def test_fallback_to_pytorch_without_interpreter(monkeypatch):
    import prism
    from prism.scorers.prism import PrismConfig, PrismScorer
    from prism.synthetic import synthetic_qkv

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, _ = synthetic_qkv(batch=1, q_heads=4, kv_heads=2, length=600, head_dim=64)
    sc = prism.build_scorer("prism_fused", threshold=0.9)
    assert isinstance(sc, PrismScorer) and sc.Config is PrismConfig
    sel = sc(q, k)
    assert sc.last_path == "torch"
    assert torch.equal(sel.mask, PrismScorer(threshold=0.9)(q, k).mask)


def test_registered_and_configurable():
    import prism

    assert "prism_fused" in prism.available_scorers()
    with pytest.raises(ValueError):
        prism.build_scorer("prism_fused", no_such_knob=1)


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker([a for a in sys.argv[sys.argv.index("--worker") + 1 :]])
