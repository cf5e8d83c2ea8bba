"""``torch.compile(model, fullgraph=True)`` of a patched model: CPU, flex backend, tiny random
Qwen3 and Llama models (tests/_tiny_models.py).

Without a KV cache transformers cannot rule out packed sequences while tracing, so the compiled
model hands Prism an explicit mask; Prism runs sparse over each row's key span (exact), which these
tests check against the eager sparse model, the dense one and the oracle model (the scorer's
selection AND the model's mask, as a float64 token mask). Sparse settings as in test_hf.py: block
32, threshold 0.3, density < 0.7.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from _tiny_models import ids_of, oracle_run, rel_err, tiny_model  # noqa: E402

import prism  # noqa: E402

SPARSE = {"threshold": 0.3, "block_size": 32}
MAX_DENSITY = 0.7


def run(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, **kw).logits


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_compiled_model_is_one_graph_sparse_and_does_not_recompile(family):
    model = tiny_model(family)
    a, b = ids_of(384, seed=1), ids_of(384, seed=2)
    dense_a = run(model, a)
    prism.patch_model(model, backend="flex", **SPARSE)
    with prism.collect_stats(model) as st_a:
        eager_a = run(model, a)
    with prism.collect_stats(model) as st_b:
        eager_b = run(model, b)
    # the two inputs select different blocks: the second call gets a new mask, same shape
    assert st_a.overall_density < MAX_DENSITY and st_a.density != st_b.density

    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda ids: run(model, ids))(a)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    out_a = run(compiled, a)
    torch.testing.assert_close(out_a, eager_a, atol=1e-5, rtol=1e-4)
    assert rel_err(out_a, dense_a) > 0.02  # really sparse
    with torch._dynamo.config.patch(error_on_recompile=True):
        out_b = run(compiled, b)
    torch.testing.assert_close(out_b, eager_b, atol=1e-5, rtol=1e-4)


def _left_padded(total=384, pad=100):
    ids = ids_of(total, seed=3, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, mask


def test_compiled_padded_batch_runs_each_row_on_its_span():
    """Compiled and sparse: the padding mask reaches the span path, which selects on the whole
    padded row and masks every selected block to the row's keys, as the oracle model does."""
    model = tiny_model("llama")
    ids, mask = _left_padded()
    scorer = prism.build_scorer("prism", **SPARSE)
    ref, oracle = oracle_run(model, scorer, lambda m: run(m, ids, attention_mask=mask))
    dense = run(model, ids, attention_mask=mask)
    assert all(oracle.density(layer) < MAX_DENSITY for layer in (0, 1))
    prism.patch_model(model, backend="flex", **SPARSE)
    torch._dynamo.reset()
    out = run(torch.compile(model, fullgraph=True), ids, attention_mask=mask)
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-5, rtol=1e-4)
    assert rel_err(ref[valid], dense[valid]) > 0.02
