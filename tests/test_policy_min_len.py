"""The policy's default min_len: the measured crossover on CUDA, two blocks on a CPU; logged."""

import logging

import pytest
import torch

import prism
from prism.policy import CUDA_MIN_LEN, PrismPolicy


def test_default_min_len_depends_on_the_device():
    pol = PrismPolicy("meanpool", block_size=64)
    assert pol.min_len_for(torch.device("cpu")) == 128
    assert pol.min_len_for(torch.device("cuda", 0)) == CUDA_MIN_LEN
    explicit = PrismPolicy("meanpool", min_len=1000)
    assert explicit.min_len_for(torch.device("cuda", 0)) == 1000
    assert explicit.min_len_for(torch.device("cpu")) == 1000
    assert "min_len=auto" in pol.describe()
    with pytest.raises(ValueError, match="min_len"):
        PrismPolicy("meanpool", min_len=0)


def test_choice_is_logged_and_short_prefill_runs_dense(caplog):
    pytest.importorskip("transformers")
    from prism.models import tiny_model

    model = tiny_model("llama", layers=1)
    ids = torch.randint(0, model.config.vocab_size, (1, 300))
    prism.patch_model(model, scorer="meanpool", block_size=32, min_len=512, threshold=0.5)
    try:
        with caplog.at_level(logging.INFO, logger="prism"), torch.no_grad():
            with prism.collect_stats(model) as st:
                model(ids)
            assert st.overall_density is None  # 300 keys < min_len 512: dense
            assert "dense" in caplog.text and "min_len 512" in caplog.text
            prism.patch_model(model, scorer="meanpool", block_size=32, min_len=256, threshold=0.5)
            with prism.collect_stats(model) as st:
                model(ids)
            assert st.overall_density < 1
            assert "sparse" in caplog.text
    finally:
        prism.unpatch_model(model)
