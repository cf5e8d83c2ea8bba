"""The fused Prism estimator (``impl="triton"``) on CPU, in-process under Triton's interpreter.

``tests/conftest.py`` switches the interpreter on (``TRITON_INTERPRET=1``) before Triton's first
import when there is no CUDA; the kernel cases are skipped where it is off (a GPU machine runs
``test_prism_fused_gpu.py`` instead). fp32 / fp16 only (bf16 ``tl.dot`` is wrong in the
interpreter), <= 1K tokens. Every case compares the fused selection with the PyTorch path
(``impl="torch"``, which uses ``prism.masks.select.top_p``): bool mask and the four BlockMask
lists, exactly; for top-p also with the float64 loop reference ``naive_prism``.

Also here (no kernel needed): the ``impl`` knob and its deprecated spellings (``fused``, the
``prism_fused`` scorer, ``ListBlockSelection``), the kernel's parameter contract, and the
layering rule (nothing under ``prism/kernels`` or ``prism/masks`` imports scorers).
"""

from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import pytest
import torch
from naive_scorers import naive_prism

import prism
from prism.kernels.estimation import op
from prism.masks import BlockSelection, block_causal, block_mask_to_bool, bool_to_block_lists
from prism.masks.select import top_p
from prism.scorers.prism import PrismConfig, PrismScorer
from prism.scorers.prism_fused import PrismFusedScorer
from prism.synthetic import synthetic_qkv

REPO = Path(__file__).resolve().parents[1]


def _interpreter_on() -> bool:
    return op.triton_available() and op.interpreter_on()


needs_interpreter = pytest.mark.skipif(
    not _interpreter_on(), reason="needs Triton's interpreter (TRITON_INTERPRET=1, no CUDA)"
)

# name: (B, Hq, Hkv, Sq, Sk, D, dtype, scorer params)
CASES = {
    "ragged127_d64": (1, 2, 1, 127, 127, 64, "float32", {}),
    "ragged300_gqa82_batch2_d128": (2, 8, 2, 300, 300, 128, "float32", {"threshold": 0.9}),
    "ragged1000_gqa82_d64": (1, 8, 2, 1000, 1000, 64, "float32", {"threshold": 0.9}),
    "len1000_d128_nocalib": (1, 4, 2, 1000, 1000, 128, "float32", {"calibrate": False}),
    "prefix700_not_multiple": (1, 4, 1, 300, 1000, 64, "float32", {"threshold": 0.8}),
    "prefix256_multiple": (2, 4, 2, 640, 896, 64, "float32", {}),
    "per_band_thresholds": (
        1, 4, 2, 1000, 1000, 128, "float32", {"threshold_high": 0.7, "threshold_low": 0.99},
    ),
    "interleaved": (1, 4, 2, 1000, 1000, 64, "float32", {"rope_layout": "interleaved"}),
    "bands32_d64": (1, 4, 2, 900, 900, 64, "float32", {"high_dims": 32, "low_dims": 32}),
    "block64": (1, 4, 2, 1000, 1000, 64, "float32", {"block_size": 64, "threshold": 0.9}),
    "no_forced": (
        1, 4, 2, 1000, 1000, 64, "float32",
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
    "tiers3_block16": (1, 4, 2, 1000, 1000, 64, "float32", {"block_size": 16, "threshold": 0.9}),
    "tiers3_block16_prefix": (1, 4, 2, 700, 1000, 64, "float16", {"block_size": 16}),
    "tiers2_block32_prefix_topk": (
        1, 4, 1, 500, 1000, 64, "float32", {"block_size": 32, "rule": "top_k", "top_k": 5},
    ),
}  # fmt: skip
LAUNCH = {  # case -> SelectConfig kwargs (other cases use the default launch shape)
    "tiers3_block16": dict(block_g=4, block_q=4, num_warps=4, tiers=3),
    "tiers3_block16_prefix": dict(block_g=4, block_q=4, num_warps=2, tiers=3),
    "tiers2_block32_prefix_topk": dict(block_g=1, block_q=16, num_warps=4, tiers=2),
}
# cases whose selection must be sparse (checks that the cases are not trivially dense)
SPARSE = {"ragged1000_gqa82_d64", "prefix700_not_multiple", "no_forced", "tiers3_block16"}


def _inputs(name):
    b, hq, hkv, sq, sk, d, dtype, params = CASES[name]
    q, k, _ = synthetic_qkv(
        batch=b, q_heads=hq, kv_heads=hkv, length=sk, q_len=sq, head_dim=d,
        seed=sum(map(ord, name)),
    )  # fmt: skip
    return q.to(getattr(torch, dtype)), k.to(getattr(torch, dtype)), params


def _split(mask, sq, sk, bs):
    _, part = block_causal(sq, sk, bs)
    return bool_to_block_lists(mask & part) + bool_to_block_lists(mask & ~part)


@needs_interpreter
@pytest.mark.parametrize("name", list(CASES))
def test_fused_matches_torch_path(name):
    q, k, params = _inputs(name)
    sq, sk = q.shape[2], k.shape[2]
    scorer = prism.build_scorer("prism", impl="triton", **params)
    c, bs = scorer.config, scorer.config.block_size
    if name in LAUNCH:  # the kernel API with an explicit launch shape
        from prism.kernels.estimation import SelectConfig, prism_select_block_lists

        launch = SelectConfig(**LAUNCH[name])
        lists = prism_select_block_lists(q, k, scorer.kernel_params(q.shape[-1]), launch)
        sel = BlockSelection.from_lists(lists, sq, sk, bs)
    else:
        sel = scorer(q, k)
        assert scorer.last_path == "triton"
    assert sel.stored_as == "lists"
    assert all(t.dtype == torch.int32 for t in sel.lists)
    # statistics come from the lists, without expanding them into a mask
    density = sel.density
    assert sel._mask is None

    torch_scorer = PrismScorer(**params, impl="torch")
    ref = torch_scorer(q, k).mask
    assert torch_scorer.last_path == "torch"
    diff_rows = int((sel.mask != ref).any(-1).sum())
    assert diff_rows == 0, f"{diff_rows} query-block rows differ from the PyTorch path"
    for got, exp in zip(sel.lists, _split(ref, sq, sk, bs)):
        assert torch.equal(got, exp)  # the exact layout of bool_to_block_lists
    visible, part = block_causal(sq, sk, bs)
    want = float((ref & visible).sum()) / (visible.sum().item() * ref.shape[0] * ref.shape[1])
    assert density == pytest.approx(want, abs=1e-6)
    bm = sel.block_mask()
    p_bool, f_bool = block_mask_to_bool(bm)
    assert torch.equal(p_bool, ref & part) and torch.equal(f_bool, ref & ~part)
    assert bm.seq_lengths == (sq, sk) and bm.BLOCK_SIZE == (bs, bs)
    if name == "threshold1_dense":
        assert density == pytest.approx(1.0)
    if name in SPARSE:
        assert density < 0.6
    if c.rule == "top_p":
        p_high, p_low = scorer.band_thresholds()
        nv = naive_prism(
            q, k, bs=bs, p_high=p_high, p_low=p_low, high_dims=c.high_dims,
            low_dims=c.low_dims, calibrate=c.calibrate, layout=c.rope_layout,
            force_sink=c.force_sink, force_diagonal=c.force_diagonal,
        )  # fmt: skip
        assert torch.equal(sel.mask, nv)


@needs_interpreter
def test_threshold_search_ties_are_kept_together():
    """At an exact tie straddling the target, ``masks.select.top_p`` keeps the lower KV block
    index only; the kernel's threshold search keeps the whole tie (the documented superset):
    it keeps block j iff the mass of the strictly larger probabilities is < p."""
    from prism.kernels.estimation.op import Plan, PrismKernelParams
    from prism.kernels.estimation.select import select_from_pooled

    bs, s, d = 16, 64, 32  # NQB = NKB = 4
    params = PrismKernelParams(
        block_size=bs, high_dims=16, low_dims=16, threshold_high=0.5, threshold_low=0.01,
        calibrate=False, force_sink=False, force_diagonal=False,
    )  # fmt: skip
    q = torch.zeros(1, 1, s, d)
    plan = Plan(q, q, params)
    # pooled inputs made by hand: high band (dims 0-7, 16-23) scores 2, 1, 1, 0 in row 3 (a tie
    # of blocks 1 and 2); the low band (dims 8-15, 24-31) prefers block 0 (in its set anyway)
    qbar = torch.zeros(1, 1, 4, d)
    qbar[..., 0] = 4.0  # * kbar / sqrt(16) = kbar
    qbar[..., 8] = 1.0
    kbarT = torch.zeros(1, 1, d, plan.nkb_p)
    kbarT[0, 0, 0, :4] = torch.tensor([2.0, 1.0, 1.0, 0.0])
    kbarT[0, 0, 8, :4] = torch.tensor([40.0, 0.0, 0.0, 0.0])
    stats = (torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4))
    logits = torch.tensor([2.0, 1.0, 1.0, 0.0])
    probs = logits.softmax(-1)
    a, b = float(probs[0]), float(probs[1])
    visible, _ = block_causal(s, s, bs)
    for p in (a + 0.5 * b, a + 1.5 * b, 0.5 * a):
        params_p = dataclasses.replace(params, threshold_high=p)
        lists = select_from_pooled((qbar, kbarT, *stats), Plan(q, q, params_p))
        got = BlockSelection.from_lists(lists, s, s, bs).mask[0, 0, 3]
        sorted_rule = top_p(probs, visible[3], p)
        greater_mass = (probs[None, :] > probs[:, None]).float() @ probs  # F(v) per block
        tie_rule = greater_mass < p
        assert torch.equal(got, tie_rule), (p, got, tie_rule)
        assert (sorted_rule & ~got).sum() == 0  # a superset of top_p's set
    # the first p straddles the tie: top_p keeps block 1 only, the kernel both
    lists = select_from_pooled(
        (qbar, kbarT, *stats),
        Plan(q, q, dataclasses.replace(params, threshold_high=a + 0.5 * b)),
    )
    got = BlockSelection.from_lists(lists, s, s, bs).mask[0, 0, 3]
    assert got.tolist() == [True, True, True, False]
    assert top_p(probs, visible[3], a + 0.5 * b).tolist() == [True, True, False, False]


@needs_interpreter
@pytest.mark.parametrize(
    "name", ["tiers3_block16", "tiers2_block32_prefix_topk", "top_k", "no_forced", "group3"]
)
def test_quartering_search_keeps_the_bisection_set(name):
    """``SelectConfig(search="quad")`` (three thresholds a round) gives the bisection's lists."""
    from prism.kernels.estimation import SelectConfig, prism_select_block_lists
    from prism.kernels.estimation.select import pick_select_config

    q, k, params = _inputs(name)
    scorer = prism.build_scorer("prism", impl="triton", **params)
    kp = scorer.kernel_params(q.shape[-1])
    bs = scorer.config.block_size
    if name in LAUNCH:
        base = SelectConfig(**LAUNCH[name])
    else:
        base = pick_select_config(q.shape[1] // k.shape[1], -(-k.shape[2] // bs), "cpu")
    want = prism_select_block_lists(q, k, kp, dataclasses.replace(base, search="bisect"))
    got = prism_select_block_lists(q, k, kp, dataclasses.replace(base, search="quad"))
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    assert 1.0 < (want[0] + want[2]).float().mean() < 0.9 * -(-k.shape[2] // bs)


# -- the impl knob -------------------------------------------------------------------------------
def test_impl_torch_and_auto_on_cpu_take_the_torch_path():
    q, k, _ = synthetic_qkv(batch=1, q_heads=4, kv_heads=2, length=600, head_dim=64)
    ref = PrismScorer(threshold=0.9, impl="torch")
    sel_ref = ref(q, k)
    assert ref.last_path == "torch" and sel_ref.stored_as == "mask"
    auto = PrismScorer(threshold=0.9)  # impl="auto": Triton on CUDA only
    assert auto.config.impl == "auto"
    assert torch.equal(auto(q, k).mask, sel_ref.mask)
    assert auto.last_path == "torch"


@needs_interpreter
def test_impl_triton_on_cpu_under_the_interpreter():
    q, k, _ = synthetic_qkv(batch=1, q_heads=4, kv_heads=2, length=600, head_dim=64)
    sc = prism.build_scorer("prism", impl="triton", threshold=0.9)
    sel = sc(q, k)
    assert sc.last_path == "triton" and sel.stored_as == "lists"
    assert torch.equal(sel.mask, PrismScorer(threshold=0.9, impl="torch")(q, k).mask)


def test_impl_triton_errors_clearly_where_it_cannot_run(monkeypatch):
    q, k, _ = synthetic_qkv(batch=1, q_heads=4, kv_heads=2, length=300, head_dim=64)
    sc = PrismScorer(impl="triton")
    monkeypatch.setattr(op, "interpreter_on", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        sc(q, k)
    monkeypatch.setattr(op, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs Triton"):
        sc(q, k)
    with pytest.raises(ValueError, match="does not support"):
        sc(q.double(), k.double())
    with pytest.raises(ValueError, match="unknown impl"):
        PrismConfig(impl="cuda")


def test_kernel_takes_resolved_params_not_a_config():
    q, k, _ = synthetic_qkv(batch=1, q_heads=2, kv_heads=1, length=256, head_dim=64)
    with pytest.raises(TypeError, match="PrismKernelParams"):
        op.prism_select_block_lists(q, k, PrismConfig())
    p = PrismScorer(threshold=0.9, threshold_low=0.8, low_dims=32).kernel_params(64)
    assert (p.high_dims, p.low_dims, p.threshold_high, p.threshold_low) == (32, 32, 0.9, 0.8)
    assert PrismScorer().kernel_params(128).high_dims == 64
    assert PrismScorer().kernel_params(128).low_dims == 96
    with pytest.raises(ValueError, match="positive even"):
        op.PrismKernelParams(block_size=16, high_dims=3, low_dims=4, threshold_high=1.0,
                             threshold_low=1.0)  # fmt: skip
    assert not op.supports(q, k, PrismScorer(high_dims=96).kernel_params(128))  # > D = 64
    assert "odd head dim" in op.unsupported_reason(q[..., :63], k[..., :63], p)


def test_fused_flag_is_a_deprecated_alias_of_impl():
    with pytest.warns(DeprecationWarning, match="impl"):
        c = PrismConfig(fused=False)
    assert c.impl == "torch" and c.fused is None
    with pytest.warns(DeprecationWarning):
        assert PrismConfig(fused=True).impl == "auto"
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="contradicts"):
        PrismConfig(fused=False, impl="triton")
    with pytest.warns(DeprecationWarning):  # old YAML configs still load
        s = prism.build_scorer({"scorer": "prism", "fused": False, "threshold": 0.9})
    assert s.config.impl == "torch"
    assert PrismConfig() == PrismConfig(impl="auto")


def test_prism_fused_is_a_deprecated_alias_with_impl_triton():
    with pytest.warns(DeprecationWarning, match="prism_fused"):
        sc = prism.build_scorer("prism_fused", threshold=0.9)
    assert isinstance(sc, PrismScorer) and sc.Config is PrismConfig
    assert sc.config.impl == "triton" and sc.config.threshold == 0.9
    assert prism.SCORERS["prism_fused"].alias_of == "prism"
    assert "prism_fused" in prism.available_scorers()
    assert "prism_fused" not in prism.available_scorers(aliases=False)
    with pytest.warns(DeprecationWarning):
        assert PrismFusedScorer(PrismConfig()).config.impl == "triton"
    with pytest.warns(DeprecationWarning):
        tsc = prism.build_scorer("prism_fused", impl="torch")
    q, k, _ = synthetic_qkv(batch=1, q_heads=4, kv_heads=2, length=300, head_dim=64)
    assert torch.equal(tsc(q, k).mask, PrismScorer(impl="torch")(q, k).mask)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="valid keys"):
        prism.build_scorer("prism_fused", no_such_knob=1)


def test_list_block_selection_is_kept_importable():
    from prism.scorers.prism_fused import ListBlockSelection

    g = torch.Generator().manual_seed(0)
    visible, _ = block_causal(700, 1000, 128)
    m = (torch.rand(2, 3, *visible.shape, generator=g) < 0.4) & visible
    lists = BlockSelection(m, 700, 1000, 128).lists
    sel = ListBlockSelection(lists, 700, 1000, 128)
    assert isinstance(sel, BlockSelection) and sel.stored_as == "lists"
    assert torch.equal(sel.mask, m)
    from prism.kernels.estimation import block_lists_to_selection

    assert torch.equal(block_lists_to_selection(lists, 700, 1000, 128).mask, m)


def test_old_kernel_module_path_still_imports():
    if not op.triton_available():
        pytest.skip("needs Triton")
    from prism.kernels.estimation import prism_fused as old
    from prism.kernels.estimation import prism_select_block_lists

    assert old.prism_select_block_lists is prism_select_block_lists
    assert old.SelectConfig(block_g=4, block_q=4, num_warps=4).tiers == 1
    assert old.MAX_BLOCK_N == 4096


def test_default_launch_shapes():
    if not op.triton_available():
        pytest.skip("needs Triton")
    from prism.kernels.estimation import pick_select_config

    short = pick_select_config(4, 64)  # 8K tokens at BS=128
    assert short.block_g * short.block_q == 16 and short.tiers == 1 and short.dot_prec == "ieee"
    long = pick_select_config(4, 1024)  # 128K tokens
    assert long.tiers == 3 and long.dot_prec == "tf32x3"
    assert pick_select_config(4, 1024, "cpu").dot_prec == "ieee"
    assert 2 <= long.num_warps <= 16 and math.log2(long.num_warps).is_integer()
    # a group that is not a power of two runs one head per row group (no idle row slots)
    g3 = pick_select_config(3, 256)
    assert (g3.block_g, g3.block_q) == (1, 16) and (long.block_g, long.block_q) == (4, 4)


# -- layering ------------------------------------------------------------------------------------
def _prism_imports(path: Path) -> set[str]:
    """Absolute module names (``prism.x.y``) that ``path`` imports."""
    rel = path.relative_to(REPO).with_suffix("")
    pkg = list(rel.parts[:-1])  # the package holding the module (for __init__: itself)
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return {m for m in out if m.startswith("prism")}


@pytest.mark.parametrize("folder", ["prism/kernels", "prism/masks"])
def test_kernels_and_masks_do_not_import_scorers_or_integrations(folder):
    bad = {}
    for path in sorted((REPO / folder).rglob("*.py")):
        up = {
            m for m in _prism_imports(path) if m.startswith(("prism.scorers", "prism.integrations"))
        }
        if up:
            bad[str(path.relative_to(REPO))] = sorted(up)
    assert not bad, bad
