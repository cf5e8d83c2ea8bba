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


def test_tiny_model_on_a_local_task(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    pytest.importorskip("prism.integrations.hf")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from prism.eval.lm_eval_adapter import evaluate
    from prism.eval.modeling import tiny_llama

    words = "the sky is blue grass green sun yellow what colour ? answer :".split()
    data = tmp_path / "qa.jsonl"
    filler = "the sky is blue the grass is green the sun is yellow " * 4  # > 2 blocks of 16
    rows = [
        {"q": filler + "what colour is the sky ?", "choices": ["blue", "green"], "label": 0},
        {"q": filler + "what colour is the grass ?", "choices": ["blue", "green"], "label": 1},
        {"q": filler + "what colour is the sun ?", "choices": ["yellow", "green"], "label": 0},
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    task = {
        "task": "prism_local_qa",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{q}} answer :",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc"}],
    }
    model = tiny_llama(vocab_size=32)
    tok = _word_tokenizer(words)
    dense = evaluate(model, tok, [task], scorer=None, max_length=64, device="cpu")
    sparse = evaluate(
        model,
        tok,
        [task],
        scorer={"scorer": "prism", "threshold": 1.0, "block_size": 16},
        backend="reference",
        max_length=64,
        device="cpu",
    )
    acc = dense["results"]["prism_local_qa"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    # threshold 1.0 selects every block: the same answers as dense
    assert sparse["results"]["prism_local_qa"]["acc,none"] == acc
    assert "density" not in dense and sparse["density"] == pytest.approx(1.0)  # sparse path ran
    assert model.config._attn_implementation == "sdpa"  # unpatched afterwards
