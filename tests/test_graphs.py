"""``prism.CUDAGraphPrefill``: a patched model's pre-fill captured in a CUDA graph and replayed.

CPU: the argument checks and the ``"prism"`` mask builder's capture rule (plain causal without
reading tensor data; sliding windows and padding masks still built). GPU (marker ``gpu``): a tiny
random Llama patched with Prism (every layer sparse), the replay against the eager forward on the
same and on new inputs, several shapes, least-recently-used eviction, and with
``prism.compile_regions``.
"""

from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import and_masks, causal_mask_function

import prism
from prism.graphs import CUDAGraphPrefill, capturing_plain_prefill, plain_prefill_assumed
from prism.integrations.hf.masks import prism_mask
from prism.models.tiny import tiny_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_rejects_non_cuda_and_bad_arguments():
    run = CUDAGraphPrefill(lambda x: x * 2)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        run(torch.ones(3))
    with pytest.raises(TypeError, match="must be tensors"):
        run(3)
    with pytest.raises(ValueError, match="at least one input"):
        run()
    with pytest.raises(ValueError, match="max_graphs"):
        CUDAGraphPrefill(lambda x: x, max_graphs=0)
    with pytest.raises(ValueError, match="warmup"):
        CUDAGraphPrefill(lambda x: x, warmup=0)


def _packed_guess(b, h, q_idx, kv_idx):  # what transformers adds when it cannot read position_ids
    return q_idx >= 0


def test_mask_builder_under_capture_is_plain_causal_without_reading_data():
    fn = and_masks(causal_mask_function, _packed_guess)
    kw = dict(batch_size=1, q_length=64, kv_length=64, mask_function=fn)
    assert prism_mask(**kw, allow_is_causal_skip=False) is not None  # outside: built as asked
    assert not plain_prefill_assumed()
    with capturing_plain_prefill():
        assert plain_prefill_assumed()
        assert prism_mask(**kw, allow_is_causal_skip=False) is None
        # a binding sliding window and a padding mask are still built
        assert prism_mask(**kw, local_size=16) is not None
        pad = torch.ones(1, 64, dtype=torch.bool)
        pad[0, :5] = False
        m = prism_mask(batch_size=1, q_length=64, kv_length=64, attention_mask=pad)
        assert m is not None and not bool(m[0, 0, 10, :5].any())
        # a cached prefix is not a plain pre-fill
        assert prism_mask(batch_size=1, q_length=16, kv_length=64, q_offset=10) is not None
    assert not plain_prefill_assumed()


def _patched(layers=3, **policy):
    model = tiny_model("llama", layers=layers, max_position_embeddings=8192)
    model = model.to("cuda", torch.bfloat16)  # bf16: flex runs on FA4 where it is installed
    prism.patch_model(model, scorer="prism", threshold=0.8, min_len=1, block_size=64, **policy)
    return model


def _hidden(model, ids):
    return model.model(input_ids=ids, use_cache=False).last_hidden_state


@pytest.mark.gpu
@needs_cuda
@torch.no_grad()
def test_replay_matches_eager_sparse_forward():
    model = _patched()
    run = CUDAGraphPrefill(lambda x: _hidden(model, x), max_graphs=2)
    g = torch.Generator().manual_seed(0)
    for n in (1000, 1000, 777):  # same shape twice (replay), then a new shape (second graph)
        ids = torch.randint(0, 512, (2, n), generator=g).cuda()
        want = _hidden(model, ids)
        got = run(ids)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=0, rtol=0)  # the same kernels
    assert run.num_graphs == 2
    ids = torch.randint(0, 512, (1, 500), generator=g).cuda()  # a third shape evicts the oldest
    torch.testing.assert_close(run(ids), _hidden(model, ids), atol=0, rtol=0)
    assert run.num_graphs == 2
    with prism.collect_stats(model) as st:
        _hidden(model, ids)
    assert st.overall_density is not None and st.overall_density < 1.0  # really sparse


@pytest.mark.gpu
@needs_cuda
@torch.no_grad()
def test_replay_with_compiled_regions_and_static_outputs():
    model = _patched()
    ids = torch.randint(0, 512, (1, 1500)).cuda()
    prism.compile_regions(model)
    want = _hidden(model, ids)
    run = CUDAGraphPrefill(lambda x: (_hidden(model, x), x.sum()), clone_outputs=False)
    got, total = run(ids)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert int(total) == int(ids.sum())
    other = torch.randint(0, 512, (1, 1500)).cuda()
    got2, _ = run(other)
    assert got2.data_ptr() == got.data_ptr()  # static outputs: overwritten by the replay
    torch.testing.assert_close(got2, _hidden(model, other), atol=0, rtol=0)


def test_default_min_len_inside_a_graph_capture():
    from prism.policy import CUDA_GRAPH_MIN_LEN, CUDA_MIN_LEN, PrismPolicy

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    auto, fixed = PrismPolicy(), PrismPolicy(min_len=1000)
    assert auto.min_len_for(cuda) == CUDA_MIN_LEN and fixed.min_len_for(cuda) == 1000
    with capturing_plain_prefill():
        assert auto.min_len_for(cuda) == CUDA_GRAPH_MIN_LEN < CUDA_MIN_LEN
        assert fixed.min_len_for(cuda) == 1000 and auto.min_len_for(cpu) == 256
