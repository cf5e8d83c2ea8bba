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
from transformers.masking_utils import causal_mask_function

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


def _causal_or_first(b, h, q_idx, kv_idx):  # a custom mask function (not plain causal)
    return kv_idx == 0


def test_capture_context_answers_only_the_packed_sequence_guess():
    import threading

    import transformers.masking_utils as mu
    from transformers.masking_utils import or_masks, sliding_window_causal_mask_function

    packed = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])  # two sequences packed in one row
    assert plain_prefill_assumed() is False
    with capturing_plain_prefill():
        assert plain_prefill_assumed()
        assert mu.find_packed_sequence_indices(packed) is None  # "one sequence per row"
        seen = []
        t = threading.Thread(target=lambda: seen.append(mu.find_packed_sequence_indices(packed)))
        t.start()
        t.join()
        assert seen[0] is not None  # other threads keep transformers' own answer
        # every other mask is still built: a custom mask function, a window, padding
        fn = or_masks(causal_mask_function, _causal_or_first)
        assert prism_mask(batch_size=1, q_length=64, kv_length=64, mask_function=fn) is not None
        window = sliding_window_causal_mask_function(16)
        assert prism_mask(batch_size=1, q_length=64, kv_length=64, mask_function=window,
                          local_size=16) is not None  # fmt: skip
        pad = torch.ones(1, 64, dtype=torch.bool)
        pad[0, :5] = False
        m = prism_mask(batch_size=1, q_length=64, kv_length=64, attention_mask=pad)
        assert m is not None and not bool(m[0, 0, 10, :5].any())
        assert prism_mask(batch_size=1, q_length=64, kv_length=64) is None  # plain causal
    assert not plain_prefill_assumed()
    assert mu.find_packed_sequence_indices(packed) is not None


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
    calls = []  # every eager run of the function: warm-up + capture of a new shape

    def fn(x):
        calls.append(tuple(x.shape))
        return _hidden(model, x)

    run = CUDAGraphPrefill(fn, max_graphs=2, warmup=1)
    g = torch.Generator().manual_seed(0)
    ids = {n: torch.randint(0, 512, (2 if n > 500 else 1, n), generator=g).cuda()
           for n in (1000, 777, 500)}  # fmt: skip
    # shape, eager runs it costs: new shapes 2 (warm-up + capture), held ones 0 (replay)
    steps = [(1000, 2), (1000, 0), (777, 2), (1000, 0), (500, 2), (1000, 0), (777, 2)]
    for n, cost in steps:  # 500 evicts the least recently used (777, not 1000)
        before = len(calls)
        got = run(ids[n])
        assert len(calls) - before == cost, (n, calls)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, _hidden(model, ids[n]), atol=0, rtol=0)  # same kernels
        assert run.num_graphs <= 2
    other = torch.randint(0, 512, (2, 1000), generator=g).cuda()  # new data, same shape
    torch.testing.assert_close(run(other), _hidden(model, other), atol=0, rtol=0)
    with prism.collect_stats(model) as st:
        _hidden(model, ids[500])
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
