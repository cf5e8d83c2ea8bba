"""Quality-targeted policies: per-layer thresholds calibrated to a target attention recall.

    python -m prism.calibrate target_recall=0.97 length=4096 out=policy.yaml
    python -m prism.calibrate model=PATH scorer=prism target_recall=0.95 out=policy.yaml
    prism.patch_model(model, config="policy.yaml")

On one calibration prompt (real text), for every layer, the exact block attention mass of the
dense model (:func:`prism.metrics.block_attention_mass`, blockwise, never Sq x Sk) is compared
with the selections of the scorer at each candidate threshold. A layer gets the *smallest*
candidate whose recall (the share of the true softmax mass inside the selected blocks, averaged
over heads and batch; ``statistic=min`` takes the worst head instead) reaches the target, and
is made dense when none does. The result is a YAML policy that :class:`prism.PrismPolicy` loads:
the scorer's base config, ``layers: {i: {threshold: t}}`` and ``dense_layers: [...]``; the
measured recall and density per layer are written as comments.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .metrics import attention_recall, block_attention_mass
from .scorers import available_scorers, build_scorer

DEFAULT_THRESHOLDS = [0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999]


@dataclass
class CalibrateArgs:
    model: str = field(default="default", metadata={"help": "'default' or a local HF folder"})
    scorer: str = field(default="probe", metadata={"help": "a registered scorer name"})
    target_recall: float = 0.97
    statistic: str = field(default="mean", metadata={"help": "mean | min over heads"})
    length: int = 4096
    thresholds: list[float] = field(default_factory=lambda: list(DEFAULT_THRESHOLDS))
    block_size: int = 128
    backend: str = "flex"
    corpus: str = "pydoc"
    offset: int = 0
    out: str = "policy.yaml"


@dataclass
class LayerChoice:
    """What calibration picked for one layer (threshold None = dense)."""

    layer: int
    threshold: float | None
    recall: float
    density: float


def layer_recall(scorer, q, k, mass, statistic: str = "mean") -> tuple[float, float]:
    """(recall, density) of ``scorer`` on one layer's q [B, Hq, S, D] / k [B, Hkv, S, D]
    against the true block mass [B, Hq, NQB, NKB]."""
    sel = scorer(q, k)
    per_head = attention_recall(mass, sel)  # [B, Hq]
    rec = float(per_head.min() if statistic == "min" else per_head.mean())
    return rec, sel.density


def choose_thresholds(
    qk: dict[int, tuple[torch.Tensor, torch.Tensor]],
    scorer: str,
    target: float,
    thresholds: Sequence[float],
    block_size: int = 128,
    statistic: str = "mean",
    **scorer_params: Any,
) -> list[LayerChoice]:
    """Per layer, the smallest threshold in ``thresholds`` whose recall reaches ``target``
    (``threshold=None``: no candidate does, the layer runs dense). ``qk``: {layer: (q, k)}."""
    if statistic not in ("mean", "min"):
        raise ValueError(f"statistic must be 'mean' or 'min', got {statistic!r}")
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {target}")
    cands = sorted(float(t) for t in thresholds)
    if not cands:
        raise ValueError("give at least one candidate threshold")
    choices = []
    # the mass on the scorers' block grid (rectangular with a q_block_size in scorer_params)
    grid = build_scorer(scorer, threshold=cands[0], block_size=block_size, **scorer_params)
    for layer, (q, k) in sorted(qk.items()):
        mass = block_attention_mass(q, k, grid.block_size)
        pick = LayerChoice(layer, None, 1.0, 1.0)
        for t in cands:  # ascending: the first that reaches the target is the sparsest
            s = build_scorer(scorer, threshold=t, block_size=block_size, **scorer_params)
            rec, dens = layer_recall(s, q, k, mass, statistic)
            if rec >= target:
                pick = LayerChoice(layer, t, rec, dens)
                break
        choices.append(pick)
    return choices


def policy_yaml(
    choices: Sequence[LayerChoice], scorer: str, args: CalibrateArgs, **scorer_params: Any
) -> str:
    """The YAML text of the calibrated policy (loadable by ``PrismPolicy.from_config``)."""
    import yaml

    sparse = [c for c in choices if c.threshold is not None]
    base = max((c.threshold for c in sparse), default=max(args.thresholds))
    cfg: dict[str, Any] = {"scorer": scorer, "block_size": args.block_size, "threshold": base}
    cfg.update(scorer_params)
    cfg["backend"] = args.backend
    dense = [c.layer for c in choices if c.threshold is None]
    if dense:
        cfg["dense_layers"] = dense
    layers = {c.layer: {"threshold": c.threshold} for c in sparse if c.threshold != base}
    if layers:
        cfg["layers"] = layers
    head = [
        f"# Prism policy calibrated by prism.calibrate: target recall {args.target_recall} "
        f"({args.statistic} over heads), {args.length} tokens of {args.corpus!r}, model {args.model!r}",
        "# layer  threshold  recall  density",
    ]
    for c in choices:
        t = "dense" if c.threshold is None else f"{c.threshold:g}"
        head.append(f"#  {c.layer:4d}  {t:>9}  {c.recall:.4f}  {c.density:.3f}")
    return "\n".join(head) + "\n" + yaml.safe_dump(cfg, sort_keys=False)


def calibrate(model, input_ids: torch.Tensor, args: CalibrateArgs, **scorer_params: Any):
    """(choices, yaml text) for ``model`` on ``input_ids`` [1, S]."""
    from .eval.modeling import capture_qk

    if args.scorer not in available_scorers():
        raise ValueError(f"unknown scorer {args.scorer!r}; valid scorers: {available_scorers()}")
    with torch.no_grad():
        qk = capture_qk(model, input_ids, stop_early=False)
    choices = choose_thresholds(
        qk,
        args.scorer,
        args.target_recall,
        args.thresholds,
        args.block_size,
        args.statistic,
        **scorer_params,
    )
    return choices, policy_yaml(choices, args.scorer, args, **scorer_params)


def main(argv: Sequence[str] | None = None) -> int:
    from pathlib import Path

    from .cli import parse_cli
    from .eval.modeling import corpus_tokens, load_model

    args = parse_cli(CalibrateArgs, argv, description=__doc__)
    model, tok = load_model(args.model)
    vocab = model.config.vocab_size
    ids = corpus_tokens(tok, args.corpus, vocab)[args.offset : args.offset + args.length]
    if ids.numel() < args.length:
        raise SystemExit(f"the corpus has only {ids.numel()} tokens past offset {args.offset}")
    choices, text = calibrate(model, ids[None], args)
    Path(args.out).write_text(text)
    sparse = [c for c in choices if c.threshold is not None]
    dens = sum(c.density for c in choices) / max(len(choices), 1)
    print(text)
    print(
        f"wrote {args.out}: {len(sparse)}/{len(choices)} layers sparse, mean density "
        f"{dens:.3f} (dense layers count as 1), min recall "
        f"{min((c.recall for c in choices), default=math.nan):.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
