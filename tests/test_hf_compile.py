"""``torch.compile(model, fullgraph=True)`` of a patched model: CPU, flex backend, tiny random
Qwen3 and Llama models.

Without a KV cache transformers cannot rule out packed sequences while tracing, so the compiled
model hands Prism an explicit mask; Prism runs sparse over each row's key span (exact), which these
tests check against the eager sparse model and the dense one.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config  # noqa: E402

import prism  # noqa: E402

BS = 64
CONFIGS = {"qwen3": Qwen3Config, "llama": LlamaConfig}


def tiny_model(family: str):
    cfg = CONFIGS[family](
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def ids_of(n: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, 512, (batch, n), generator=torch.Generator().manual_seed(seed))


def run(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, **kw).logits


@pytest.mark.parametrize("family", list(CONFIGS))
def test_compiled_model_is_one_graph_sparse_and_does_not_recompile(family):
    model = tiny_model(family)
    a, b = ids_of(384, seed=1), ids_of(384, seed=2)
    dense_a = run(model, a)
    prism.patch_model(model, threshold=0.7, block_size=BS, backend="flex")
    with prism.collect_stats(model) as st_a:
        eager_a = run(model, a)
    with prism.collect_stats(model) as st_b:
        eager_b = run(model, b)
    # the two inputs select different blocks: the second call gets a new mask, same shape
    assert st_a.overall_density < 1.0 and st_a.density != st_b.density

    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda ids: run(model, ids))(a)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    out_a = run(compiled, a)
    torch.testing.assert_close(out_a, eager_a, atol=1e-5, rtol=1e-4)
    assert float((out_a - dense_a).norm() / dense_a.norm()) > 1e-4  # really sparse
    with torch._dynamo.config.patch(error_on_recompile=True):
        out_b = run(compiled, b)
    torch.testing.assert_close(out_b, eager_b, atol=1e-5, rtol=1e-4)


def test_compiled_padded_batch_runs_each_row_on_its_span():
    model = tiny_model("llama")
    ids = ids_of(384, seed=3, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :100] = 0  # left padding
    ids[1, :100] = 0
    dense = run(model, ids, attention_mask=mask)
    prism.patch_model(model, threshold=1.0, block_size=BS, backend="flex")
    torch._dynamo.reset()
    out = run(torch.compile(model, fullgraph=True), ids, attention_mask=mask)
    valid = mask.bool()
    torch.testing.assert_close(out[valid], dense[valid], atol=2e-5, rtol=1e-4)
