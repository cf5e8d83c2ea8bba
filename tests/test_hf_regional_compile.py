"""``prism.compile_regions(model)``: every decoder layer compiled, the attention call eager.

CPU, tiny random Llama / Qwen3 models (tests/_tiny_models.py), flex backend. The compiled model
must give the eager model's logits (sparse and dense), keep the per-layer statistics (the
attention call runs outside the graphs, so ``collect_stats`` still sees every call), break the
graph exactly at the attention call, and not recompile for a second length (``dynamic=True``).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from _tiny_models import ids_of, rel_err, tiny_model  # noqa: E402

import prism  # noqa: E402
from prism.integrations.hf import decoder_layers  # noqa: E402

SPARSE = {"threshold": 0.3, "block_size": 32, "backend": "flex"}


def run(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family,backend", [("llama", "inductor"), ("qwen3", "counter")])
def test_regional_compile_matches_eager_sparse_and_keeps_stats(family, backend):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = tiny_model(family)
    a, b = ids_of(384, seed=1), ids_of(300, seed=2)
    dense_a = run(model, a)
    prism.patch_model(model, **SPARSE)
    with prism.collect_stats(model) as st_eager:
        eager_a = run(model, a)
    eager_b = run(model, b)

    counter = CompileCounter()
    prism.compile_regions(model, backend=counter if backend == "counter" else backend)
    assert all(hasattr(layer, "_compiled_call_impl") for layer in decoder_layers(model))
    with prism.collect_stats(model) as st:
        out_a = run(model, a)
    torch.testing.assert_close(out_a, eager_a, atol=2e-5, rtol=1e-4)
    assert rel_err(out_a, dense_a) > 0.02  # really sparse
    # the eager attention call recorded every layer, with the eager model's selections
    assert len(st.layers) == len(decoder_layers(model))
    assert st.overall_density == pytest.approx(st_eager.overall_density)
    frames = counter.frame_count
    out_b = run(model, b)  # another length
    torch.testing.assert_close(out_b, eager_b, atol=2e-5, rtol=1e-4)
    if backend == "counter":
        # the layers' two graphs (plus one recompile of a transformers decorator frame), shared
        # by every layer and, dynamic, by every length: a 4-layer model compiles as many
        assert frames <= 4
        assert counter.frame_count == frames
        bigger = tiny_model(family, layers=4)
        prism.patch_model(bigger, **SPARSE)
        counter4 = CompileCounter()
        torch._dynamo.reset()
        prism.compile_regions(bigger, backend=counter4)
        run(bigger, a)
        assert counter4.frame_count == frames


def test_regional_compile_breaks_only_at_the_attention_call():
    torch._dynamo.reset()
    model = tiny_model("llama")
    prism.patch_model(model, **SPARSE)
    layer = decoder_layers(model)[0]
    layer.self_attn._prism_eager_region = True
    ids = ids_of(256, seed=4)
    with torch.no_grad():
        emb = model.model.embed_tokens(ids)
        pos = torch.arange(ids.shape[1])[None]
        cos_sin = model.model.rotary_emb(emb, pos)
        explained = torch._dynamo.explain(layer)(
            emb, attention_mask=None, position_ids=pos, position_embeddings=cos_sin
        )
    # the one break is the eager attention call (reported once per nested frame it sits in)
    assert explained.graph_break_count >= 1
    for reason in explained.break_reasons:
        assert "torch.compiler.disable" in reason.reason
        assert "prism_attention_forward" in reason.reason


def test_regional_compile_dense_model_unchanged():
    torch._dynamo.reset()
    model = tiny_model("llama")
    ids = ids_of(200, seed=5)
    want = run(model, ids)
    prism.compile_regions(model)
    torch.testing.assert_close(run(model, ids), want, atol=2e-5, rtol=1e-4)


def test_no_decoder_layers_is_a_clear_error():
    with pytest.raises(TypeError, match="no decoder layers"):
        prism.compile_regions(torch.nn.Linear(2, 2))
