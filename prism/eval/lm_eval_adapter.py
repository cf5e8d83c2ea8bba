"""Run EleutherAI lm-evaluation-harness tasks (LongBench, RULER, ...) with a sparse pre-fill.

lm-eval is an optional dependency (``pip install lm_eval``); this module imports without it and
fails with a clear message only when used.

Python::

    from prism.eval.lm_eval_adapter import evaluate
    res = evaluate(model, tokenizer, ["ruler_niah_single_1"], scorer={"scorer": "prism"},
                   limit=20, max_length=32768)

Command line (lm-eval's own CLI, with a ``prism`` model type registered first)::

    python -m prism.eval.lm_eval_adapter run --model prism \\
        --model_args pretrained=Qwen/Qwen3-8B,scorer=prism,threshold=0.95,prism_backend=flex \\
        --tasks longbench_hotpotqa --batch_size 1

The ``prism`` model is lm-eval's HF model (``HFLM``) with the scorer patched into every attention
layer (:func:`prism.patch_model`): pre-fill is block-sparse, decoding is dense. Scorer parameters
are any ``model_args`` key the scorer's config knows; ``prism_backend`` picks the kernel backend.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

_MISSING = (
    "the lm-eval adapter needs lm-evaluation-harness: pip install lm_eval "
    "(tasks such as LongBench / RULER also need their datasets, downloaded by lm-eval)"
)


def lm_eval_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def _require():
    try:
        import lm_eval
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(_MISSING) from e
    return lm_eval


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def evaluate(
    model,
    tokenizer,
    tasks: Sequence[str | Mapping[str, Any]],
    scorer: Any = None,
    backend: str = "flex",
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    include_path: str | None = None,
    batch_size: int = 1,
    max_length: int | None = None,
    device: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Evaluate ``tasks`` (names, or inline lm-eval task config dicts) on ``model`` with
    ``scorer`` patched in (None / ``{"scorer": "none"}`` = dense). Returns the JSON-able part of
    lm-eval's results: ``{"results": {task: {metric: value}}, "n-samples": ..., "versions": ...}``
    and, when sparse, ``density`` (mean pre-fill density over the sparse attention calls).
    Extra ``kwargs`` go to ``lm_eval.simple_evaluate``."""
    lm_eval = _require()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from .modeling import sparse_model

    dev = device or str(next(model.parameters()).device)
    with sparse_model(model, scorer, backend) as stats:
        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=batch_size,
            max_length=max_length,
            device=dev,
        )
        manager = TaskManager(
            include_path=include_path,
            include_defaults=not all(isinstance(t, Mapping) for t in tasks),
        )
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=[dict(t) if isinstance(t, Mapping) else t for t in tasks],
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            **kwargs,
        )
        density = getattr(stats, "overall_density", None) if stats is not None else None
    if out is None:  # non-zero ranks in a distributed run
        return {}
    keep = {k: out[k] for k in ("results", "versions", "n-shot", "n-samples") if k in out}
    keep = _jsonable(keep)
    if density is not None:
        keep["density"] = float(density)  # mean pre-fill density over the sparse calls
    return keep


def register() -> None:
    """Register lm-eval model type ``prism`` (HFLM + a patched scorer). Idempotent."""
    _require()
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM

    from ..scorers import SCORERS

    try:
        from lm_eval.api.registry import get_model

        get_model("prism")
        return
    except Exception:
        pass

    @register_model("prism")
    class PrismHFLM(HFLM):  # noqa: F841 - registered by the decorator
        """HFLM with a Prism scorer patched in. model_args: scorer (default "prism"),
        prism_backend (default "flex") and the scorer's own parameters."""

        def __init__(
            self, *args: Any, scorer: str = "prism", prism_backend: str = "flex", **kw: Any
        ):
            cfg_fields = SCORERS[scorer].Config.__dataclass_fields__ if scorer in SCORERS else {}
            params = {k: kw.pop(k) for k in list(kw) if k in cfg_fields}
            super().__init__(*args, **kw)
            if scorer != "none":
                import prism

                from ..scorers import build_scorer

                prism.patch_model(
                    self.model, scorer=build_scorer(scorer, **params), backend=prism_backend
                )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m prism.eval.lm_eval_adapter [run] <lm_eval CLI args>``."""
    _require()
    register()
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
