"""The lm-eval adapter: importable without lm-eval; with it, a tiny model on a local task."""

import importlib
import json

import pytest


def test_adapter_imports_without_lm_eval():
    mod = importlib.import_module("prism.eval.lm_eval_adapter")
    assert callable(mod.evaluate) and callable(mod.register)
    assert isinstance(mod.lm_eval_available(), bool)


def _word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>"
    )


def _loglik(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), computed directly (no lm-eval): one forward over context +
    continuation without its last token (whose prediction is not needed; a sparse pre-fill's
    blocks depend on the sequence length, so this is the input that matters), summing the
    log-probabilities of the continuation's tokens."""
    import torch

    ctx = tok(context, add_special_tokens=False).input_ids
    cont = tok(continuation, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([(ctx + cont)[:-1]])).logits[0].float()
    logp = logits.log_softmax(-1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def _tasks(tmp_path, docs):
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in docs))
    common = {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "doc_to_text": "{{q}} answer :",
    }
    mc = {
        **common,
        "task": "prism_local_mc",
        "output_type": "multiple_choice",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc"}],
    }
    ll = {
        **common,
        "task": "prism_local_ll",
        "output_type": "loglikelihood",
        "doc_to_target": "{{choices[label]}}",
        "metric_list": [{"metric": "perplexity"}],
    }
    return [mc, ll]


def _expected(model, tok, docs):
    """What lm-eval must report, computed by hand: multiple-choice accuracy (the choice with the
    highest log-likelihood, lm-eval's ``acc``) and the perplexity of the gold continuations
    (``exp(-mean log-likelihood)``, lm-eval's ``perplexity`` aggregation)."""
    import math

    hits, lls = [], []
    for d in docs:
        ctx = d["q"] + " answer :"
        scores = [_loglik(model, tok, ctx, " " + c) for c in d["choices"]]
        hits.append(max(range(len(scores)), key=scores.__getitem__) == d["label"])
        lls.append(scores[d["label"]])
    return sum(hits) / len(hits), math.exp(-sum(lls) / len(lls))


def test_tiny_model_on_a_local_task_matches_a_direct_computation(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    pytest.importorskip("prism.integrations.hf")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import prism
    from prism.eval.lm_eval_adapter import evaluate
    from prism.eval.modeling import tiny_llama

    words = "the sky is blue grass green sun yellow what colour ? answer :".split()
    filler = "the sky is blue the grass is green the sun is yellow " * 8  # 96 words: 6 blocks of 16
    docs = [
        {"q": filler + f"what colour is the {thing} ?", "choices": list(choices), "label": 0}
        for thing, choices in [
            ("sky", ("blue", "green")),
            ("grass", ("blue", "green")),
            ("sun", ("yellow", "green")),
            ("sky", ("green", "yellow")),
            ("grass", ("yellow", "blue")),
            ("sun", ("blue", "yellow")),
        ]
    ]
    model = tiny_llama(vocab_size=32)
    tok = _word_tokenizer(words)
    # gold labels: the model's own choice on even docs, the other one on odd docs, so the exact
    # accuracy is known (0.5) whatever the random weights prefer
    for i, d in enumerate(docs):
        ctx = d["q"] + " answer :"
        scores = [_loglik(model, tok, ctx, " " + c) for c in d["choices"]]
        best = int(scores[1] > scores[0])
        d["label"] = best if i % 2 == 0 else 1 - best
    tasks = _tasks(tmp_path, docs)
    acc, ppl = _expected(model, tok, docs)
    assert acc == 0.5

    dense = evaluate(model, tok, tasks, scorer=None, max_length=128, device="cpu")
    assert dense["results"]["prism_local_mc"]["acc,none"] == acc
    assert dense["results"]["prism_local_ll"]["perplexity,none"] == pytest.approx(ppl, rel=1e-5)
    assert "density" not in dense

    # really sparse (6 blocks, top-p 0.3): lm-eval's numbers are those of the patched model
    spec = {"scorer": "prism", "threshold": 0.3, "block_size": 16}
    sparse = evaluate(
        model, tok, tasks, scorer=spec, backend="reference", max_length=128, device="cpu"
    )
    assert model.config._attn_implementation == "sdpa"  # unpatched afterwards
    assert sparse["density"] < 0.9
    prism.patch_model(model, scorer=prism.build_scorer(dict(spec)), backend="reference")
    try:
        acc_s, ppl_s = _expected(model, tok, docs)
    finally:
        prism.unpatch_model(model)
    assert ppl_s != pytest.approx(ppl, rel=1e-4)  # the sparse pre-fill changed the model's output
    assert sparse["results"]["prism_local_mc"]["acc,none"] == acc_s
    assert sparse["results"]["prism_local_ll"]["perplexity,none"] == pytest.approx(ppl_s, rel=1e-5)
