"""The fused estimators inside ``torch.compile`` (``prism.scorers._fused_ops``).

Dynamo cannot trace the estimators' launchers, so under compile the scorers with
``impl="triton"`` call opaque ``torch.library`` ops. Checked on CPU under Triton's interpreter:
``torch.library.opcheck`` (schema, fake shapes vs the real outputs), and a ``fullgraph``
compile of scorer -> BlockMask -> flex (dynamic shapes over two ragged lengths; a cached prefix
with static shapes) giving the eager block lists and outputs exactly.
"""

from __future__ import annotations

import pytest
import torch

import prism
from prism.kernels import get_backend
from prism.kernels.estimation import op
from prism.scorers._fused_ops import config_key, probe_params_key

needs_interpreter = pytest.mark.skipif(
    not (op.triton_available() and op.interpreter_on()),
    reason="needs Triton's interpreter (TRITON_INTERPRET=1, no CUDA)",
)

SCORERS = {
    "prism": dict(scorer="prism", impl="triton", threshold=0.8, block_size=64),
    "probe": dict(scorer="probe", impl="triton", threshold=0.8, block_size=64, probes=2),
    "meanpool": dict(scorer="meanpool", impl="triton", threshold=0.8, block_size=64),
    # the pooled-key mixture: the probe_select_lists op (launch 1, the pooled launches, launch 2
    # mixing them); its block_probs through the opaque probe_block_probs op
    "probe_pooled": dict(
        scorer="probe", impl="triton", threshold=0.8, block_size=64, pooled_mix=0.3
    ),
}


def _qkv(sq, sk, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, sq, 32, generator=g)
    k = torch.randn(1, 2, sk, 32, generator=g)
    k[:, :, ::37] *= 3.0  # a few strong keys: an uneven selection
    return q, k, torch.randn(1, 2, sk, 32, generator=g)


@needs_interpreter
def test_opcheck_both_ops():
    q, k, _ = _qkv(200, 330)
    pr = prism.build_scorer(SCORERS["prism"])
    pb = prism.build_scorer(SCORERS["probe"])
    torch.library.opcheck(
        torch.ops.prism.prism_select_lists.default, (q, k, config_key(pr.config, "prism"))
    )
    key = probe_params_key(pb.kernel_params(), 2, "ends")
    torch.library.opcheck(torch.ops.prism.probe_select_lists.default, (q, k, key))
    mix = prism.build_scorer(SCORERS["probe_pooled"])
    torch.library.opcheck(torch.ops.prism.probe_block_probs.default, (q, k, mix.config_key))
    torch.library.opcheck(torch.ops.prism.probe_select_lists.default, (q, k, mix.op_key))


def _check_fullgraph_matches_eager(params, dynamic, shapes, to=lambda t: t, tol=1e-5):
    """scorer -> BlockMask -> flex, compiled with ``fullgraph`` vs eager: the same block lists
    exactly, the same finite output (within ``tol``), and a real selection (density < 1)."""
    scorer = prism.build_scorer(params)
    flex = get_backend("flex")

    def run(q, k, v):
        sel = scorer(q, k)
        return flex(q, k, v, sel.block_mask()), sel.lists

    compiled = torch.compile(run, fullgraph=True, dynamic=dynamic)
    for sq, sk in shapes:
        q, k, v = (to(t) for t in _qkv(sq, sk, seed=sq + sk))
        want_out, want_lists = run(q, k, v)
        got_out, got_lists = compiled(q, k, v)
        for a, b in zip(got_lists, want_lists):
            assert torch.equal(a, b)
        assert torch.isfinite(got_out).all()
        torch.testing.assert_close(got_out, want_out, atol=tol, rtol=tol)
        density = prism.BlockSelection.from_lists(want_lists, sq, sk, params["block_size"]).density
        assert density < 1.0


@needs_interpreter
@pytest.mark.parametrize("name", list(SCORERS))
@pytest.mark.parametrize(
    "dynamic,shapes",
    [
        (True, ((300, 300), (421, 421))),  # dynamic shapes, two ragged lengths
        (False, ((250, 421),)),  # a cached prefix (static: see tests/test_flex_fa4_safe.py)
    ],
)
def test_fullgraph_compile_matches_eager(name, dynamic, shapes):
    _check_fullgraph_matches_eager(SCORERS[name], dynamic, shapes)


def test_key_round_trip_and_errors():
    from prism.scorers._fused_ops import _prism_params, _probe_params

    scorer = prism.build_scorer("prism", threshold=0.9, high_dims=16)
    assert _prism_params(config_key(scorer.config, "prism"), 64) == scorer.kernel_params(64)
    # the key names its scorer: a mean-pool config runs mean pooling (one full-width band),
    # never Prism's two bands
    mp = prism.build_scorer("meanpool", threshold=0.9)
    mp_params = _prism_params(config_key(mp.config, "meanpool"), 64)
    assert mp_params == mp.kernel_params(64)
    assert mp_params.high_dims == mp_params.low_dims == 64
    assert _prism_params(config_key(scorer.config, "prism"), 64).high_dims == 16
    pb = prism.build_scorer("probe", probes=3, placement="uniform").kernel_params()
    assert _probe_params(probe_params_key(pb, 3, "uniform")) == (pb, 3, "uniform")
    if not (op.triton_available() and op.interpreter_on()):
        pytest.skip("the op's real implementation needs the interpreter on CPU")
    q, k, _ = _qkv(100, 100)
    with pytest.raises(ValueError):  # the launcher's own checks: Hq not a multiple of Hkv
        torch.ops.prism.prism_select_lists(q[:, :3], k, config_key(scorer.config, "prism"))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", list(SCORERS))
@pytest.mark.parametrize(
    "dynamic,shapes",
    [
        (True, ((1000, 1000), (1537, 1537))),  # dynamic shapes, two ragged lengths
        (False, ((900, 1537),)),  # a cached prefix (static, as on CPU above)
    ],
)
def test_gpu_fullgraph_compile_matches_eager(name, dynamic, shapes):
    """On CUDA (compiled Triton kernels, bf16, BS = 128): the opaque ops inside a fullgraph
    compile give the eager block lists exactly, and the same attention output."""
    _check_fullgraph_matches_eager(
        {**SCORERS[name], "block_size": 128}, dynamic, shapes,
        to=lambda t: t.to("cuda", torch.bfloat16), tol=2e-2,
    )  # fmt: skip


@needs_interpreter
@pytest.mark.parametrize("scorer", ["prism", "probe", "meanpool"])
def test_auto_route_under_fullgraph_compile_of_a_patched_model(scorer, monkeypatch):
    """``impl="auto"`` inside ``torch.compile(model, fullgraph=True)``: the route that CUDA takes
    (the opaque op; :func:`prism.scorers._fused_ops.auto_takes_fused`, forced here for CPU
    tensors under the interpreter) traces into one graph, does not recompile for a new input of
    the same shape, and gives the eager logits."""
    pytest.importorskip("transformers")
    from _tiny_models import ids_of, tiny_model

    import prism.scorers._fused_pooled as pooled_mod  # prism, meanpool
    import prism.scorers.probe as probe_mod

    for mod in (pooled_mod, probe_mod):
        monkeypatch.setattr(mod, "auto_takes_fused", lambda q: True)

    def run(model, ids):
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits

    model = tiny_model("llama")
    a, b = ids_of(384, seed=1), ids_of(384, seed=2)
    prism.patch_model(model, backend="flex", scorer=scorer, threshold=0.3, block_size=32)
    eager_a, eager_b = run(model, a), run(model, b)
    sc = prism.build_scorer(scorer, threshold=0.3, block_size=32)
    q = torch.randn(1, 4, 384, 16)
    assert sc.resolve_impl(q, q[:, :2]) == "triton"  # the forced route is the fused one
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda ids: run(model, ids))(a)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    op_name = f"{'prism' if scorer == 'meanpool' else scorer}_select_lists"
    assert op_name in str(explained.graphs[0].graph)  # the fused estimator's op is in the graph
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(run(compiled, a), eager_a, atol=1e-5, rtol=1e-4)
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(run(compiled, b), eager_b, atol=1e-5, rtol=1e-4)
