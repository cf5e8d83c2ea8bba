"""Hugging Face integration on tiny random models (Llama, Qwen2, Qwen3, Mistral; built offline).

Block size 64 and a few hundred tokens keep them fast. Every tiny model shares the attention
shapes (Hq=4, Hkv=2, D=32) so the compiled flex kernel is reused across tests; tests about the
integration rather than the kernel use the fp32 "reference" backend (no compilation). Random weights
give nearly uniform block scores, so densities stay high here (the real-model test in
test_default_model.py sees real sparsity); the tests check exactness and that the sparse path
really runs.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    DynamicCache,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

import prism  # noqa: E402
from prism.integrations import hf  # noqa: E402
from prism.utils import patch as seed_patch  # noqa: E402

BS = 64
REF = "reference"  # the fp32 oracle backend, for tests about the integration rather than flex
CONFIGS = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "mistral": MistralConfig,
}


def tiny_model(family: str = "llama", seed: int = 0, layers: int = 2, **cfg_kw):
    cfg = CONFIGS[family](
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        **cfg_kw,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def ids_of(n: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (batch, n), generator=g)


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def cache_kw(model) -> dict:
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: DynamicCache(config=model.config), "use_cache": True}


def rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------
# exactness at threshold 1.0, sparsity below it
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(CONFIGS))
def test_threshold_one_equals_sdpa(family):
    model = tiny_model(family)
    ids = ids_of(320)  # 5 blocks
    ref = logits(model, ids)
    prism.patch_model(model, scorer="prism", threshold=1.0, block_size=BS)
    assert model.config._attn_implementation == "prism"
    with prism.collect_stats(model) as st:
        out = logits(model, ids)
    assert set(st.density) == {0, 1} and all(d == 1.0 for d in st.density.values())
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_sparse_differs_a_little(family):
    model = tiny_model(family)
    ids = ids_of(640)  # 10 blocks
    ref = logits(model, ids)
    prism.patch_model(model, threshold=0.9, block_size=BS)
    with prism.collect_stats(model, recall=True) as st:
        out = logits(model, ids)
    # measured (seeded): density 0.995-0.998, recall >= 0.995, relative logits error ~0.5%,
    # 99.5-99.8% of the positions keep their argmax token, in all four families
    assert st.overall_density < 1.0
    assert all(r > 0.95 for r in st.recall.values()), st.summary()
    err = rel_err(out, ref)
    assert 1e-4 < err < 0.02, err
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree > 0.95


def test_backends_agree_inside_the_model():
    model = tiny_model("qwen3")
    ids = ids_of(448)
    prism.patch_model(model, threshold=0.9, block_size=BS, backend="flex")
    a = logits(model, ids)
    prism.patch_model(model, threshold=0.9, block_size=BS, backend="reference")
    b = logits(model, ids)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------
# decode, short prompts, chunked pre-fill, padding
# ------------------------------------------------------------------------------------------
def test_generate_prefill_sparse_decode_dense():
    model = tiny_model("llama")
    ids = ids_of(384)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    prism.patch_model(model, threshold=1.0, block_size=BS)
    with prism.collect_stats(model) as st, torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert torch.equal(out, ref)
    for layer in (0, 1):
        s = st.layers[layer]
        assert s.sparse_calls == 1  # the pre-fill
        assert s.dense_calls == {"decode": 5}  # every decode step

    prism.patch_model(model, threshold=0.5, block_size=BS)
    with prism.collect_stats(model) as st, torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1] and st.overall_density < 1.0


def test_short_prompt_runs_dense_exactly():
    model = tiny_model("qwen2")
    ids = ids_of(100)  # < min_len = 2 blocks
    ref = logits(model, ids)
    prism.patch_model(model, threshold=0.5, block_size=BS, backend=REF)
    with prism.collect_stats(model) as st:
        out = logits(model, ids)
    assert torch.equal(out, ref)
    assert st.layers[0].dense_calls == {"short": 1} and st.layers[0].sparse_calls == 0

    prism.patch_model(model, threshold=0.5, block_size=BS, backend=REF, min_len=64)
    with prism.collect_stats(model) as st:
        logits(model, ids)
    assert st.layers[0].sparse_calls == 1


@pytest.mark.parametrize("split", [192, 250])  # the prefix a multiple of the block, or not
def test_chunked_prefill_equals_one_shot(split):
    model = tiny_model("qwen3")
    ids = ids_of(448)
    ref = logits(model, ids)
    prism.patch_model(model, threshold=1.0, block_size=BS, backend=REF)
    kw = cache_kw(model)
    with prism.collect_stats(model) as st, torch.no_grad():
        first = model(input_ids=ids[:, :split], **kw).logits
        second = model(input_ids=ids[:, split:], **kw).logits
    assert st.layers[0].sparse_calls == 2  # both chunks ran sparse, the second with P = split
    torch.testing.assert_close(torch.cat([first, second], 1), ref, atol=2e-5, rtol=1e-4)


def test_chunked_prefill_sparse_uses_the_prefix_offset():
    """Below 1.0 the second chunk runs sparse over the whole cache (Sk = P + Sq): its attention
    equals the fp32 reference of the same selection made with the cached-prefix geometry."""
    model = tiny_model("llama")
    ids = ids_of(448)
    prism.patch_model(model, threshold=0.8, block_size=BS, backend="flex")
    calls = []
    orig = hf._sparse

    def capture(policy, scorer, q, k, v, scaling):
        out, sel = orig(policy, scorer, q, k, v, scaling)
        calls.append((q, k, v, scaling, out, sel))
        return out, sel

    kw = cache_kw(model)
    with torch.no_grad():
        model(input_ids=ids[:, :250], **kw)
        hf._sparse = capture
        try:
            model(input_ids=ids[:, 250:], **kw)
        finally:
            hf._sparse = orig
    assert len(calls) == 2  # one per layer
    for q, k, v, scaling, out, sel in calls:
        assert q.shape[2] == 198 and k.shape[2] == 448  # P = 250, not a block multiple
        assert (sel.q_len, sel.kv_len) == (198, 448) and sel.density < 1.0
        ref = prism.sparse_attention(
            q, k, v, scorer="prism", backend="reference", threshold=0.8, block_size=BS,
            scale=scaling,
        )  # fmt: skip
        dense = prism.sparse_attention(q, k, v, scorer="dense", block_size=BS, scale=scaling)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        assert rel_err(ref, dense) > 1e-4  # the comparison can tell sparse from dense


def _padded_batch(lengths, total):
    """Left-padded batch: row r has ``lengths[r]`` real tokens."""
    ids = ids_of(total, batch=len(lengths), seed=3)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        mask[r, total - n :] = 1
        ids[r, : total - n] = 0
    return ids, mask


def test_padded_batch_threshold_one_matches_sdpa():
    model = tiny_model("llama")
    ids, mask = _padded_batch([384, 300], 384)
    ref = logits(model, ids, attention_mask=mask)
    prism.patch_model(model, threshold=1.0, block_size=BS, backend=REF)
    with prism.collect_stats(model) as st:
        out = logits(model, ids, attention_mask=mask)
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=2e-5, rtol=1e-4)
    assert st.layers[0].sparse_calls == 1


def test_padded_rows_run_sparse_like_unpadded_sequences():
    model = tiny_model("qwen3")
    ids, mask = _padded_batch([448, 330], 448)
    prism.patch_model(model, threshold=0.8, block_size=BS, backend=REF)
    with prism.collect_stats(model) as st:
        out = logits(model, ids, attention_mask=mask)
    assert st.overall_density < 1.0
    for r, n in enumerate([448, 330]):
        alone = logits(model, ids[r : r + 1, 448 - n :])
        torch.testing.assert_close(out[r : r + 1, 448 - n :], alone, atol=1e-4, rtol=1e-4)


def test_padding_dense_fallback_warns_once_and_is_exact():
    model = tiny_model("mistral")
    ids, mask = _padded_batch([320, 256], 320)
    ref = logits(model, ids, attention_mask=mask)
    prism.patch_model(model, threshold=0.5, block_size=BS, backend=REF, padding="dense")
    hf.reset_warnings()
    with pytest.warns(UserWarning, match="exact dense SDPA"):
        out = logits(model, ids, attention_mask=mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logits(model, ids, attention_mask=mask)  # no second warning
    assert torch.equal(out[mask.bool()], ref[mask.bool()])


def test_unpadded_attention_mask_stays_sparse():
    model = tiny_model("llama")
    ids = ids_of(320)
    prism.patch_model(model, threshold=0.5, block_size=BS, backend=REF)
    with prism.collect_stats(model) as st:
        logits(model, ids, attention_mask=torch.ones_like(ids))
    assert st.layers[0].sparse_calls == 1


def test_sliding_window_mask_runs_sparse_exactly():
    """A binding sliding window (Mistral, window 128 < 320 tokens) reaches Prism as an explicit
    mask of one key span per row: it runs sparse (flex, span mask_mod) and stays exact."""
    model = tiny_model("mistral", sliding_window=128)
    ids = ids_of(320)
    ref = logits(model, ids)
    prism.patch_model(model, threshold=1.0, block_size=BS)
    with prism.collect_stats(model) as st:
        out = logits(model, ids)
    assert st.layers[0].sparse_calls == 1
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_packed_sequences_run_sparse_exactly():
    model = tiny_model("llama")
    ids = ids_of(320)
    pos = torch.cat([torch.arange(200), torch.arange(120)])[None]  # two documents, one row
    ref = logits(model, ids, position_ids=pos)
    assert rel_err(ref, logits(model, ids)) > 1e-3  # packing changes the result
    prism.patch_model(model, threshold=1.0, block_size=BS)
    with prism.collect_stats(model) as st:
        out = logits(model, ids, position_ids=pos)
    assert st.layers[0].sparse_calls == 1
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------
# policy: per-layer control, configs, re-patching, undo
# ------------------------------------------------------------------------------------------
def test_per_layer_control():
    model = tiny_model("qwen2", layers=3)
    ids = ids_of(512)
    prism.patch_model(
        model,
        threshold=0.7,
        block_size=BS,
        backend=REF,
        dense_layers=1,
        layers={2: {"threshold": 1.0}},
    )
    with prism.collect_stats(model) as st:
        logits(model, ids)
    assert st.layers[0].dense_calls == {"dense_layer": 1}
    assert st.density[1] < 1.0 and st.density[2] == 1.0
    pol = hf.get_policy(model)
    assert pol.scorer_for(0) is None and pol.scorer_for(7) is pol.scorer


def test_policy_layer_keys():
    pol = hf.PrismPolicy(
        "prism",
        block_size=BS,
        dense_layers=[5],
        layers={"1-3": {"threshold": 0.5}, "8,9": {"dense": True}, 10: {"scorer": "meanpool"}},
    )
    assert [pol.scorer_for(i) is None for i in (0, 5, 8, 9)] == [False, True, True, True]
    assert pol.scorer_for(2).config.threshold == 0.5 and pol.scorer_for(4) is pol.scorer
    assert pol.scorer_for(10).name == "meanpool" and pol.scorer_for(10).block_size == BS
    with pytest.raises(ValueError, match="layer"):
        hf.PrismPolicy(layers={"x": {}})
    with pytest.raises(ValueError, match="backend"):
        hf.PrismPolicy(backend="nope")
    with pytest.raises(ValueError, match="padding"):
        hf.PrismPolicy(padding="maybe")
    with pytest.raises(ValueError, match="unknown config key"):
        hf.PrismPolicy(thresold=0.9)


def test_config_files_load_and_patch():
    from prism.config import CONFIG_DIR

    files = sorted((CONFIG_DIR / "hf").glob("*.yaml"))
    assert files
    for path in files:
        pol = hf.PrismPolicy.from_config(path)
        assert pol.scorer is not None
    model = tiny_model("llama", layers=3)
    prism.patch_model(model, config=files[0], block_size=BS, min_len=128)
    with prism.collect_stats(model) as st:
        logits(model, ids_of(320))
    assert st.layers  # it ran through Prism


def test_repatch_replaces_policy_and_unpatch_restores():
    model = tiny_model("llama")
    ids = ids_of(448)
    ref = logits(model, ids)
    prism.patch_model(model, threshold=0.5, block_size=BS, backend=REF)
    sparse = logits(model, ids)
    assert rel_err(sparse, ref) > 1e-4
    prism.patch_model(model, threshold=1.0, block_size=BS, backend=REF)
    assert hf.get_policy(model).scorer.config.threshold == 1.0
    torch.testing.assert_close(logits(model, ids), ref, atol=2e-5, rtol=1e-4)
    prism.unpatch_model(model)
    assert model.config._attn_implementation == "sdpa" and hf.get_policy(model) is None
    assert torch.equal(logits(model, ids), ref)

    with prism.patched(model, threshold=0.5, block_size=BS, backend=REF):
        torch.testing.assert_close(logits(model, ids), sparse)
    assert model.config._attn_implementation == "sdpa"
    prism.patch_model(model, threshold=1.0, block_size=BS, backend=REF)
    with prism.patched(model, threshold=0.5, block_size=BS, backend=REF):
        pass
    assert hf.get_policy(model).scorer.config.threshold == 1.0  # the previous policy is back


def test_stats_are_off_by_default_and_recall_can_be_deferred():
    model = tiny_model("llama")
    prism.patch_model(model, threshold=0.8, block_size=BS, backend=REF)
    assert hf.get_policy(model).stats is None
    with prism.collect_stats(model, recall=[1], defer_recall=True) as st:
        logits(model, ids_of(384))
        assert len(st._pending) == 1
    assert set(st.recall) == {1} and 0.0 < st.recall[1] <= 1.0
    assert "density" in st.summary() and hf.get_policy(model).stats is None


def test_patch_model_rejects_non_hf_modules():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        prism.patch_model(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------
# attn_implementation="prism" and the published repository's apply_patch usage
# ------------------------------------------------------------------------------------------
def test_attn_implementation_prism_from_pretrained(tmp_path):
    tiny_model("qwen3").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="prism").eval()
    assert model.config._attn_implementation == "prism"
    try:
        hf.set_default_policy(threshold=0.5, block_size=BS, backend=REF)
        with prism.collect_stats() as st:
            logits(model, ids_of(320))
        assert st.overall_density < 1.0
    finally:
        hf._DEFAULT_POLICY = None


def test_apply_patch_seed_usage(tmp_path):
    from prism import prism_attention_forward
    from prism.utils.patch import apply_patch, remove_patch

    tiny_model("qwen3").save_pretrained(tmp_path / "qwen3")
    tiny_model("llama").save_pretrained(tmp_path / "llama")
    hf.set_default_policy(block_size=BS, backend=REF)
    try:
        assert (
            apply_patch(forward_fn=prism_attention_forward, model_id=tmp_path / "qwen3") == "qwen3"
        )
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "qwen3")
        assert model.config._attn_implementation == "prism"
        with prism.collect_stats() as st:
            logits(model.eval(), ids_of(320))
        assert st.layers[0].sparse_calls == 1
        # other families are untouched, an explicit choice still wins
        assert (
            AutoModelForCausalLM.from_pretrained(tmp_path / "llama").config._attn_implementation
            == "sdpa"
        )
        explicit = AutoModelForCausalLM.from_pretrained(
            tmp_path / "qwen3", attn_implementation="sdpa"
        )
        assert explicit.config._attn_implementation == "sdpa"
        # the published README's hub id picks the family offline
        assert apply_patch(forward_fn=prism_attention_forward, model_id="Qwen/Qwen3-8B") == "qwen3"
        assert apply_patch(model_id=LlamaConfig, block_size=BS, backend=REF) == "llama"
        assert seed_patch.patched_families() == {"qwen3": "prism", "llama": "prism"}
        assert (
            AutoModelForCausalLM.from_pretrained(tmp_path / "llama").config._attn_implementation
            == "prism"
        )
    finally:
        remove_patch()
        hf._DEFAULT_POLICY = None
    assert (
        AutoModelForCausalLM.from_pretrained(tmp_path / "qwen3").config._attn_implementation
        == "sdpa"
    )
    assert "get_correct_attn_implementation" not in transformers.Qwen3PreTrainedModel.__dict__


@pytest.mark.parametrize(
    "model_id, expected",
    [
        ("Qwen/Qwen3-8B", "qwen3"),
        ("meta-llama/Llama-3.1-8B-Instruct", "llama"),
        ("mistralai/Mistral-7B-v0.1", "mistral"),
        ("Qwen/Qwen2.5-7B-Instruct", "qwen2"),
        ("google/gemma-2-9b", "gemma2"),
        ("llama", "llama"),
    ],
)
def test_resolve_model_type_offline(model_id, expected):
    assert seed_patch.resolve_model_type(model_id) == expected


def test_resolve_model_type_unknown_name_says_what_to_pass():
    with pytest.raises(ValueError, match="local model directory"):
        seed_patch.resolve_model_type("someone/SmolThing-135M")
    assert seed_patch.resolve_model_type(Qwen2Config()) == "qwen2"


def test_lazy_exports():
    for name in ("patch_model", "unpatch_model", "patched", "collect_stats", "PrismPolicy"):
        assert callable(getattr(prism, name))
    with pytest.raises(AttributeError):
        prism.not_a_name  # noqa: B018
