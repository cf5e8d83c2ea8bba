"""Hugging Face integration on tiny random models (Llama, Qwen2, Qwen3, Mistral; built offline).

Tests about exactness use threshold 1.0 (must equal SDPA). Tests about sparsity use block size 32
and threshold 0.3 on a few hundred tokens: random weights give nearly uniform block scores, and
these settings select ~60% of the causal blocks (asserted < 0.7). Those are checked against
:class:`_tiny_models.OracleAttention`, an unpatched model whose attention makes the scorer's
selection and applies it as a float64 token mask (nothing of Prism but the scorer). Tests about
the integration rather than the kernel use the fp32 "reference" backend (no compilation).
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402
from _tiny_models import (  # noqa: E402
    FAMILIES,
    cache_kw,
    ids_of,
    logits,
    oracle_run,
    rel_err,
    tiny_model,
)
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config  # noqa: E402

import prism  # noqa: E402
from prism.integrations import hf  # noqa: E402
from prism.integrations.hf import attention as hf_attention  # noqa: E402
from prism.policy import reset_default_policy  # noqa: E402
from prism.utils import patch as seed_patch  # noqa: E402

BS = 64  # exactness tests
SPARSE = {"threshold": 0.3, "block_size": 32}  # sparsity tests: density ~0.6
MAX_DENSITY = 0.7
REF = "reference"  # the fp32 oracle backend, for tests about the integration rather than flex


def sparse_scorer(**kw):
    return prism.build_scorer("prism", **{**SPARSE, **kw})


def oracle_logits(model, ids, **kw):
    """(logits, oracle) of ``model`` with :class:`OracleAttention` over the SPARSE scorer."""
    return oracle_run(model, sparse_scorer(), lambda m: logits(m, ids, **kw))


# ------------------------------------------------------------------------------------------
# exactness at threshold 1.0, sparsity below it
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
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


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_equals_the_oracle_model(family):
    """Really sparse (density < 0.7) and exact: the patched model (flex backend) gives the
    oracle model's logits, density and recall, and is far from dense."""
    model = tiny_model(family)
    ids = ids_of(512)  # 16 blocks of 32
    dense = logits(model, ids)
    ref, oracle = oracle_logits(model, ids)
    prism.patch_model(model, backend="flex", **SPARSE)
    with prism.collect_stats(model, recall=True) as st:
        out = logits(model, ids)
    assert set(st.density) == {0, 1}
    for layer, density in st.density.items():
        assert density < MAX_DENSITY, st.summary()
        assert density == pytest.approx(oracle.density(layer), abs=1e-12)
        assert st.recall[layer] == pytest.approx(oracle.recall(layer), abs=1e-5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert rel_err(ref, dense) > 0.02  # the comparison can tell sparse from dense


def test_backends_agree_inside_the_model():
    model = tiny_model("qwen3")
    ids = ids_of(448)
    prism.patch_model(model, backend="flex", **SPARSE)
    with prism.collect_stats(model) as st:
        a = logits(model, ids)
    assert st.overall_density < MAX_DENSITY
    prism.patch_model(model, backend="reference", **SPARSE)
    b = logits(model, ids)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_stats_batch_of_two_is_the_mean_of_the_rows():
    """Two equal-length rows in one batch: each layer's density is the mean of the densities
    the oracle counts for each row alone, and every row's logits are those of the row alone."""
    model = tiny_model("llama")
    ids = ids_of(448, batch=2, seed=5)
    prism.patch_model(model, backend=REF, **SPARSE)
    with prism.collect_stats(model) as st:
        out = logits(model, ids)
    rows = [oracle_logits(model, ids[r : r + 1]) for r in range(2)]
    for layer in (0, 1):
        per_row = [oracle.density(layer) for _, oracle in rows]
        assert per_row[0] != per_row[1]  # the mean is not trivially either row
        assert st.density[layer] == pytest.approx(sum(per_row) / 2, abs=1e-12)
        assert st.density[layer] < MAX_DENSITY
        assert st.layers[layer].sparse_calls == 1
    for r, (ref, _) in enumerate(rows):
        torch.testing.assert_close(out[r : r + 1], ref, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------
# decode, short prompts, chunked pre-fill, padding
# ------------------------------------------------------------------------------------------
def test_generate_prefill_sparse_decode_dense():
    model = tiny_model("llama")
    ids = ids_of(384)
    gen = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    with torch.no_grad():
        ref = model.generate(ids, **gen)
    prism.patch_model(model, threshold=1.0, block_size=BS)
    with prism.collect_stats(model) as st, torch.no_grad():
        out = model.generate(ids, **gen)
    assert torch.equal(out, ref)
    for layer in (0, 1):
        s = st.layers[layer]
        assert s.sparse_calls == 1  # the pre-fill
        assert s.dense_calls == {"decode": 5}  # every decode step

    # sparse pre-fill, dense decode: the oracle model's tokens and logits (it decodes densely)
    gen.update(output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        dense = model.generate(ids, **gen)
        expected, _ = oracle_run(model, sparse_scorer(), lambda m: m.generate(ids, **gen))
    prism.patch_model(model, backend=REF, **SPARSE)
    with prism.collect_stats(model) as st, torch.no_grad():
        out = model.generate(ids, **gen)
    assert st.overall_density < MAX_DENSITY
    assert torch.equal(out.sequences, expected.sequences)
    for step, (got, want) in enumerate(zip(out.logits, expected.logits)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        assert rel_err(want, dense.logits[step]) > 1e-3  # the sparse pre-fill shows in every step


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


@pytest.mark.parametrize("split", [192, 250])
def test_chunked_prefill_sparse_uses_the_prefix_offset(split):
    """Below 1.0 the second chunk runs sparse over the whole cache (Sk = P + Sq, the prefix a
    block multiple or not): both chunks equal the oracle model's chunks, which select with the
    cached-prefix geometry, and the density is the oracle's."""
    model = tiny_model("llama")
    ids = ids_of(448)

    def chunks(m):
        kw = cache_kw(m)
        return torch.cat([logits(m, ids[:, :split], **kw), logits(m, ids[:, split:], **kw)], 1)

    dense = logits(model, ids)
    ref, oracle = oracle_run(model, sparse_scorer(), chunks)
    prism.patch_model(model, backend="flex", **SPARSE)
    with prism.collect_stats(model) as st:
        out = chunks(model)
    for layer in (0, 1):
        assert st.layers[layer].sparse_calls == 2
        assert st.density[layer] == pytest.approx(oracle.density(layer), abs=1e-12)
        assert st.density[layer] < MAX_DENSITY
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert rel_err(ref, dense) > 0.02


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
    """Left padding, eager: every row runs sparse on its own span as if alone, so each row's
    logits and block counts are those of the oracle model on the unpadded row."""
    lengths, total = [448, 330], 448
    model = tiny_model("qwen3")
    ids, mask = _padded_batch(lengths, total)
    prism.patch_model(model, backend=REF, **SPARSE)
    with prism.collect_stats(model) as st:
        out = logits(model, ids, attention_mask=mask)
    oracles = []
    for r, n in enumerate(lengths):
        alone, oracle = oracle_logits(model, ids[r : r + 1, total - n :])
        torch.testing.assert_close(out[r : r + 1, total - n :], alone, atol=1e-4, rtol=1e-4)
        oracles.append(oracle)
    for layer in (0, 1):
        s = st.layers[layer]
        assert (s.calls, s.sparse_calls) == (1, 1)
        assert s.selected_blocks == sum(o.selected[layer] for o in oracles)
        assert s.causal_blocks == sum(o.causal[layer] for o in oracles)
        assert s.density < MAX_DENSITY


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


def _span_case(kind):
    """(model, ids, forward kwargs) whose attention reaches Prism as an explicit mask of one key
    span per query row: a binding sliding window (Mistral, window 128 < 320 tokens) or two
    packed documents in one row."""
    ids = ids_of(320)
    if kind == "window":
        return tiny_model("mistral", sliding_window=128), ids, {}
    pos = torch.cat([torch.arange(200), torch.arange(120)])[None]
    return tiny_model("llama"), ids, {"position_ids": pos}


@pytest.mark.parametrize("kind", ["window", "packed"])
def test_span_masks_run_sparse_exactly(kind):
    """Threshold 1.0 on a span mask: the flex span path runs and equals SDPA with the mask."""
    model, ids, kw = _span_case(kind)
    ref = logits(model, ids, **kw)
    unmasked = logits(tiny_model("mistral"), ids) if kind == "window" else logits(model, ids)
    assert rel_err(ref, unmasked) > 1e-3  # the mask changes the result
    prism.patch_model(model, threshold=1.0, block_size=BS)
    with prism.collect_stats(model) as st:
        out = logits(model, ids, **kw)
    assert st.layers[0].sparse_calls == 1
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["window", "packed"])
def test_span_masks_run_sparse_like_the_oracle(kind):
    """Below 1.0 the span path selects on the whole row and masks every selected block to the
    row's span: the oracle model (selection AND the model's mask) gives the same logits."""
    model, ids, kw = _span_case(kind)
    ref, oracle = oracle_logits(model, ids, **kw)
    prism.patch_model(model, backend="flex", **SPARSE)
    with prism.collect_stats(model) as st:
        out = logits(model, ids, **kw)
    for layer in (0, 1):
        assert st.layers[layer].sparse_calls == 1
        assert st.density[layer] == pytest.approx(oracle.density(layer), abs=1e-12)
        assert st.density[layer] < MAX_DENSITY
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------
# policy: per-layer control, configs, re-patching, undo
# ------------------------------------------------------------------------------------------
def test_per_layer_control():
    model = tiny_model("qwen2", layers=3)
    ids = ids_of(512)
    prism.patch_model(
        model,
        backend=REF,
        dense_layers=1,
        layers={2: {"threshold": 1.0}},
        **SPARSE,
    )
    with prism.collect_stats(model) as st:
        logits(model, ids)
    assert st.layers[0].dense_calls == {"dense_layer": 1}
    assert st.density[1] < MAX_DENSITY and st.density[2] == 1.0
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
    ids = ids_of(384)
    _, oracle = oracle_logits(model, ids)
    prism.patch_model(model, backend=REF, **SPARSE)
    assert hf.get_policy(model).stats is None
    with prism.collect_stats(model, recall=[1], defer_recall=True) as st:
        logits(model, ids)
        assert st.pending_recalls == 1 and not st.layers[1].recall_calls  # not computed yet
    assert set(st.recall) == {1}
    assert st.recall[1] == pytest.approx(oracle.recall(1), abs=1e-5)
    assert st.recall[1] < 0.9  # a sparse selection misses some of the mass
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
        hf.set_default_policy(backend=REF, **SPARSE)
        with prism.collect_stats() as st:
            logits(model, ids_of(320))
        assert st.overall_density < MAX_DENSITY
    finally:
        reset_default_policy()


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
        reset_default_policy()
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


def test_old_and_new_import_paths():
    import prism.policy
    import prism.stats
    from prism.integrations.hf import PrismPolicy, PrismStats, collect_stats

    assert PrismPolicy is prism.policy.PrismPolicy is prism.PrismPolicy
    assert PrismStats is prism.stats.PrismStats is prism.PrismStats
    assert collect_stats is prism.stats.collect_stats is prism.collect_stats
    assert prism.patch_model is hf.patch_model and prism.patched is hf.patched
    assert prism.prism_attention_forward is hf_attention.prism_attention_forward
    for name in hf.__all__:
        assert getattr(hf, name) is not None
    assert transformers.AttentionInterface._global_mapping["prism"] is hf.prism_attention_forward


def test_lazy_exports():
    for name in ("patch_model", "unpatch_model", "patched", "collect_stats", "PrismPolicy"):
        assert callable(getattr(prism, name))
    with pytest.raises(AttributeError):
        prism.not_a_name  # noqa: B018
