"""Perplexity with a patched scorer (prism.eval.perplexity) on a tiny random Llama."""

import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("prism.integrations.hf")

from prism.eval.modeling import corpus_tokens, greedy_generate, sparse_model, tiny_llama  # noqa: E402
from prism.eval.perplexity import perplexity, window_nll, windows  # noqa: E402


@pytest.fixture(scope="module")
def model_tokens():
    model = tiny_llama()
    return model, corpus_tokens(None, "pydoc", model.config.vocab_size)


def _manual_nll(model, ids):
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()


def test_dense_window_nll_matches_the_model_loss(model_tokens):
    model, toks = model_tokens
    ids = windows(toks, 300, 1, 10)[0]
    r = window_nll(model, ids, tail=0.5, chunk=64)
    assert r["tokens"] == 299 and r["tail_tokens"] == 150
    assert r["nll_sum"] == pytest.approx(_manual_nll(model, ids), rel=1e-5)


@pytest.fixture(scope="module")
def dense_512(model_tokens):
    """The dense perplexity of two 512-token windows (computed once for the parametrised test)."""
    model, toks = model_tokens
    return perplexity(model, toks, 512, count=2, tail=0.5)


@pytest.mark.parametrize("scorer", ["prism", "meanpool", "xattn"])
def test_threshold_one_equals_dense(model_tokens, dense_512, scorer):
    model, toks = model_tokens
    dense = dense_512
    sparse = perplexity(
        model,
        toks,
        512,
        count=2,
        tail=0.5,
        scorer={"scorer": scorer, "threshold": 1.0, "block_size": 64},
        backend="reference",
    )
    assert sparse["density"] == pytest.approx(1.0)
    assert sparse["ppl"] == pytest.approx(dense["ppl"], rel=1e-5)
    assert sparse["ppl_tail"] == pytest.approx(dense["ppl_tail"], rel=1e-5)
    assert dense["tokens"] == 2 * 511 and math.isfinite(dense["ppl"])


def test_sparse_changes_the_result_and_unpatches(model_tokens):
    model, toks = model_tokens
    dense = perplexity(model, toks, 512, count=1)
    sparse = perplexity(
        model,
        toks,
        512,
        count=1,
        scorer={"scorer": "window", "window": 1, "block_size": 64},
        backend="reference",
    )
    assert sparse["density"] < 0.5
    assert sparse["ppl"] != pytest.approx(dense["ppl"], rel=1e-6)
    # the context manager restored the dense model
    assert perplexity(model, toks, 512, count=1)["ppl"] == pytest.approx(dense["ppl"], rel=1e-7)
    assert model.config._attn_implementation == "sdpa"


def test_windows_and_errors(model_tokens):
    _, toks = model_tokens
    ws = windows(toks, 100, 3, offset=5)
    assert [w.shape for w in ws] == [(1, 100)] * 3 and torch.equal(ws[1][0], toks[105:205])
    with pytest.raises(ValueError, match="corpus has"):
        windows(toks, toks.numel(), 2)


def test_greedy_generation_sparse_prefill_threshold_one_equals_dense(model_tokens):
    model, toks = model_tokens
    ids = toks[:384][None]
    dense = greedy_generate(model, ids, 6)
    with sparse_model(
        model, {"scorer": "prism", "threshold": 1.0, "block_size": 64}, "reference"
    ) as st:
        sparse = greedy_generate(model, ids, 6)
    assert len(dense) == 6 and dense == sparse
    assert st.overall_density == pytest.approx(1.0)
    # reference: plain argmax decoding without a cache
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            nxt = model(seq).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    assert seq[0, 384:].tolist() == dense


def test_yarn_rope_scaling_option():
    from prism.eval.modeling import apply_rope_scaling

    model = tiny_llama()
    before = model.model.rotary_emb.inv_freq.clone()
    ids = torch.randint(
        0, model.config.vocab_size, (1, 200), generator=torch.Generator().manual_seed(1)
    )
    dense = window_nll(model, ids)["nll_sum"]
    apply_rope_scaling(model, {"rope_type": "yarn", "factor": 2.0})
    assert model.config.max_position_embeddings == 2 * 4096
    assert model.config.rope_parameters["original_max_position_embeddings"] == 4096
    rot = model.model.rotary_emb
    assert rot.attention_scaling > 1.0  # YaRN's attention temperature
    assert not torch.allclose(rot.inv_freq, before)  # low frequencies interpolated
    scaled = window_nll(model, ids)["nll_sum"]
    assert math.isfinite(scaled) and scaled != pytest.approx(dense, rel=1e-7)


def test_greedy_decode_stops_and_times_only_the_prefill(model_tokens):
    from prism.models import greedy_decode

    model, toks = model_tokens
    ids = toks[:200][None]
    free = greedy_decode(model, ids, 5)
    forwards = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: forwards.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    entered = []

    class Ctx:
        def __enter__(self):
            entered.append(len(forwards))

        def __exit__(self, *exc):
            entered.append(len(forwards))

    try:
        stopped = greedy_decode(model, ids, 5, stop_ids=[free.tokens[2]], prefill_context=Ctx)
    finally:
        hook.remove()
    first_stop = free.tokens.index(free.tokens[2])
    assert stopped.tokens == free.tokens[:first_stop]  # the stop token itself is not kept
    assert entered == [0, 1] and forwards[0] == 200  # the context wraps the pre-fill alone
    assert all(n == 1 for n in forwards[1:])  # decode steps: one token each
