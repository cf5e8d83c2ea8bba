"""Run an experiment: expand the grid, skip finished points, evaluate, append results, summarise.

Results go to ``<output.dir>/<output.name>.jsonl`` (one JSON object per point, appended as each
point finishes, so an interrupted run loses at most the point in flight) and are mirrored to
``<name>.csv`` (scalar metrics) at the end. Re-running the same config skips every point whose key
(:func:`prism.eval.config.point_key`) is already in the JSONL file.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..masks import grid_block_size
from ..utils.tables import markdown_table
from .config import BASELINE, expand, point_key, scorer_label, scorer_params

# the parameters that move a scorer along its density axis (what a Pareto sweep varies)
SWEEP_KNOBS = (
    "threshold",
    "threshold_high",
    "threshold_low",
    "top_k",
    "min_prob",
    "vertical",
    "slash",
)
CSV_METRICS = (
    "density",
    "recall",
    "recall_min",
    "recall_p10",
    "oracle_density",
    "oracle_row_density",
    "ppl",
    "ppl_tail",
    "dppl",
    "dppl_tail",
    "ppl_dense",
    "accuracy",
    "accuracy_dense",
    "samples",
    "time_s",
)


def family(variant: Mapping[str, Any]) -> str:
    """A scorer variant without its density knobs: the curve it belongs to."""
    return scorer_label({k: v for k, v in variant.items() if k not in SWEEP_KNOBS and k != "label"})


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a results JSONL file (a truncated last line, from a killed run, is ignored)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def write_csv(records: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    cols = ["experiment", "metric", "length", "scorer", "family", "scorer_name", "params", "task"]
    cols += list(CSV_METRICS)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in records:
            res = r.get("result", {})
            row = [
                r.get("experiment"),
                r.get("metric"),
                r.get("length"),
                r.get("scorer"),
                r.get("family"),
                r.get("scorer_name"),
                json.dumps(r.get("params", {}), sort_keys=True),
                r.get("task", ""),
            ]
            for m in CSV_METRICS:
                v = r.get("time_s") if m == "time_s" else res.get(m)
                row.append("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v))
            w.writerow(row)


class Runner:
    """``Runner(cfg).run()``. ``model`` / ``tokenizer`` may be given (otherwise loaded from
    ``cfg.model``): that is how tests run the tiny model."""

    def __init__(self, cfg: Mapping[str, Any], model=None, tokenizer=None, out=None):
        self.cfg = dict(cfg)
        self.points = self._build_points(expand(self.cfg))
        if not self.points:
            raise ValueError("the experiment expands to no points")
        first_out = self.points[0]["output"]
        self.name = first_out["name"] or self.points[0]["name"]
        self.out_dir = Path(first_out["dir"])
        self.jsonl = self.out_dir / f"{self.name}.jsonl"
        self._given_model = (model, tokenizer) if model is not None else None
        self._model_key: str | None = None
        self._model = None
        self._tok = None
        self._capture: dict[str, Any] = {}
        self._out = out

    @property
    def out(self):
        return self._out if self._out is not None else sys.stdout

    # -- the grid -----------------------------------------------------------------------------
    def _build_points(self, points: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        seen: set[str] = set()

        def add(p: dict[str, Any]) -> None:
            p["key"] = point_key(p)
            if p["key"] not in seen:
                seen.add(p["key"])
                out.append(p)

        for p in points:
            if p["metric"] in ("ppl", "ruler", "lm_eval") and p["baseline"]:
                add({**p, "scorer": {"scorer": BASELINE}})
        for p in points:
            if p["metric"] == "recall" and p["scorer"]["scorer"] == BASELINE:
                continue
            add(p)
        for p in points:
            if p["metric"] == "recall" and p["recall"]["oracle"]:
                bs = p["scorer"].get("block_size", 128)
                for mode in ("head", "row"):
                    for t in p["recall"]["targets"]:
                        add(
                            {
                                **p,
                                "scorer": {
                                    "scorer": f"oracle-{mode}",
                                    "target": float(t),
                                    "block_size": bs,
                                },
                            }
                        )
        order = {"recall": 0, "ppl": 1, "ruler": 2, "lm_eval": 3}

        def sort_key(p: dict[str, Any]):
            return (
                json.dumps(p["model"], sort_keys=True),
                order[p["metric"]],
                p["length"],
                p["ruler"]["task"] if p["metric"] == "ruler" else "",
                p["scorer"]["scorer"] != BASELINE,
            )

        return sorted(out, key=sort_key)

    # -- model and data -----------------------------------------------------------------------
    def model(self, mcfg: Mapping[str, Any]):
        from .modeling import apply_rope_scaling, load_model

        if mcfg.get("threads"):
            torch.set_num_threads(int(mcfg["threads"]))
        key = json.dumps(
            {k: v for k, v in mcfg.items() if k not in ("backend", "threads")}, sort_keys=True
        )
        if self._model_key != key:
            self._model = self._tok = None
            self._capture.clear()
            if self._given_model is not None:
                self._model, self._tok = self._given_model
                apply_rope_scaling(self._model, mcfg.get("rope_scaling"))
            else:
                self._model, self._tok = load_model(
                    mcfg["name"], mcfg["dtype"], mcfg.get("gguf_file"), mcfg.get("rope_scaling")
                )
            self._model_key = key
        return self._model, self._tok

    def tokens(self, point: Mapping[str, Any]) -> torch.Tensor:
        from .modeling import corpus_tokens

        model, tok = self.model(point["model"])
        return corpus_tokens(tok, point["data"]["corpus"], model.config.vocab_size)

    def layer_data(self, point: Mapping[str, Any]):
        """Captured Q/K (+ lazily computed mass) of the point's layers at its length.

        One capture serves every length of the same (model, data, layers): it runs at the longest
        length asked for and shorter windows take its prefix, which a causal model computes
        identically (not with a length-dependent ``dynamic`` RoPE, which is captured per length)."""
        from .modeling import capture_qk
        from .recall import LayerData

        model, _ = self.model(point["model"])
        rope = point["model"].get("rope_scaling") or {}
        dynamic = "dynamic" in str(rope.get("rope_type", rope.get("type", "")))
        group = json.dumps([point["data"], point["recall"]["layers"]], sort_keys=True)
        lengths = [
            p["length"]
            for p in self.points
            if p["metric"] == "recall"
            and json.dumps([p["data"], p["recall"]["layers"]], sort_keys=True) == group
            and p["model"] == point["model"]
        ]
        cap_len = point["length"] if dynamic else max(lengths + [point["length"]])
        cap_key = f"{group}|{cap_len}"
        if cap_key not in self._capture:
            self._capture.clear()
            toks = self.tokens(point)
            off = point["data"]["offset"]
            if off + cap_len > toks.numel():
                raise ValueError(f"corpus too short: {toks.numel()} tokens < {off + cap_len}")
            ids = toks[off : off + cap_len][None]
            self._capture[cap_key] = capture_qk(model, ids, point["recall"]["layers"])
            self._capture["_mass"] = {}
        qk = self._capture[cap_key]
        bk = int(point["scorer"].get("block_size", 128))
        bs = grid_block_size(int(point["scorer"].get("q_block_size", 0) or bk), bk)
        mkey = (point["length"], bs, point["recall"]["chunk"])
        masses = self._capture["_mass"]
        if mkey not in masses:
            length = point["length"]
            masses[mkey] = {
                i: LayerData(q[:, :, :length], k[:, :, :length], bs, point["recall"]["chunk"])
                for i, (q, k) in qk.items()
            }
        return masses[mkey]

    def resolve(self, point: dict[str, Any]) -> dict[str, Any]:
        """Apply ``match_density``: set the scorer's knob so that its mean density over the
        captured layers (``recall.layers`` of ``data``, at the point's length) hits the target."""
        sc = point["scorer"]
        if "match_density" not in sc or sc["scorer"] == BASELINE:
            return point
        from .recall import match_density

        knob = sc.get("match_knob", "threshold")
        layers = self.layer_data({**point, "metric": "recall"})
        value, dens = match_density(sc, layers, float(sc["match_density"]), knob)
        self._matched = {"knob": knob, "value": value, "calibration_density": dens}
        return {**point, "scorer": {**sc, knob: value}}

    # -- metrics ------------------------------------------------------------------------------
    def eval_recall(self, point: Mapping[str, Any]) -> dict[str, Any]:
        from .modeling import build_variant
        from .recall import evaluate_oracle, evaluate_scorer

        layers = self.layer_data(point)
        name = point["scorer"]["scorer"]
        if name.startswith("oracle-"):
            return evaluate_oracle(layers, point["scorer"]["target"], name.split("-", 1)[1])
        return evaluate_scorer(build_variant(point["scorer"]), layers)

    def _baseline_record(self, point: Mapping[str, Any]) -> dict[str, Any] | None:
        key = point_key({**point, "scorer": {"scorer": BASELINE}})
        return self.done.get(key)

    def eval_ppl(self, point: Mapping[str, Any], bar) -> dict[str, Any]:
        from .perplexity import perplexity

        model, _ = self.model(point["model"])
        pc = point["ppl"]
        res = perplexity(
            model,
            self.tokens(point),
            point["length"],
            pc["windows"],
            point["data"]["offset"],
            pc["tail"],
            pc["chunk"],
            scorer=point["scorer"],
            backend=point["model"]["backend"],
        )
        base = self._baseline_record(point)
        if base is not None and point["scorer"]["scorer"] != BASELINE:
            b = base["result"]
            res["ppl_dense"] = b["ppl"]
            res["dppl"] = res["ppl"] / b["ppl"] - 1.0
            if "ppl_tail" in res and "ppl_tail" in b:
                res["dppl_tail"] = res["ppl_tail"] / b["ppl_tail"] - 1.0
        return res

    def eval_ruler(self, point: Mapping[str, Any], bar_factory) -> dict[str, Any]:
        from .modeling import greedy_generate, sparse_model
        from .tasks import TASKS, generate_samples, score

        model, tok = self.model(point["model"])
        if tok is None:
            raise ValueError("RULER-style tasks need a model with a tokenizer (not 'tiny')")
        rc = point["ruler"]
        count = lambda s: len(_encode(tok, s, rc["template"]))  # noqa: E731
        samples = generate_samples(
            rc["task"],
            point["length"],
            count,
            rc["samples"],
            point["seed"],
            rc["haystack"],
            rc["max_new_tokens"],
        )
        newline = TASKS[rc["task"]]["stop_at_newline"]

        def should_stop(tokens: list[int]) -> bool:
            return newline and "\n" in tok.decode(tokens).strip()

        stop_ids = [
            i for i in {tok.eos_token_id, getattr(tok, "pad_token_id", None)} if i is not None
        ]
        rows = []
        inner = bar_factory(len(samples), rc["task"])
        with sparse_model(model, point["scorer"], point["model"]["backend"]) as stats:
            for s in samples:
                ids = torch.tensor([_encode(tok, s.prompt, rc["template"])])
                out = greedy_generate(model, ids, s.max_new_tokens, stop_ids, should_stop)
                pred = tok.decode(out, skip_special_tokens=True)
                if newline:
                    pred = pred.strip().split("\n")[0]
                rows.append(
                    {
                        "prediction": pred,
                        "answers": s.answers,
                        "score": score(s, pred),
                        "prompt_tokens": ids.shape[1],
                    }
                )
                inner.update(1)
            density = getattr(stats, "overall_density", None) if stats is not None else None
        inner.close()
        res: dict[str, Any] = {
            "accuracy": sum(r["score"] for r in rows) / len(rows),
            "samples": len(rows),
            "per_sample": rows,
        }
        if density is not None:
            res["density"] = float(density)
        base = self._baseline_record(point)
        if base is not None and point["scorer"]["scorer"] != BASELINE:
            res["accuracy_dense"] = base["result"]["accuracy"]
        return res

    def eval_lm_eval(self, point: Mapping[str, Any]) -> dict[str, Any]:
        from .lm_eval_adapter import evaluate

        model, tok = self.model(point["model"])
        lc = point["lm_eval"]
        return evaluate(
            model,
            tok,
            lc["tasks"],
            scorer=point["scorer"],
            backend=point["model"]["backend"],
            limit=lc["limit"],
            num_fewshot=lc["num_fewshot"],
            include_path=lc["include_path"],
            batch_size=lc["batch_size"],
            max_length=point["length"],
        )

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        from tqdm.auto import tqdm

        self.out_dir.mkdir(parents=True, exist_ok=True)
        resume = self.points[0]["output"]["resume"] if self.points else True
        existing = read_records(self.jsonl) if resume else []
        self.done = {r["key"]: r for r in existing if "key" in r}
        todo = [p for p in self.points if p["key"] not in self.done]
        show = bool(self.points and self.points[0]["progress"])
        print(
            f"[prism.eval] {self.name}: {len(self.points)} points, {len(self.points) - len(todo)} "
            f"already in {self.jsonl}, {len(todo)} to run",
            file=self.out,
        )
        bar = tqdm(total=len(todo), disable=not show, desc=self.name, unit="pt", dynamic_ncols=True)

        def bar_factory(total: int, desc: str):
            return tqdm(total=total, disable=not show, desc=desc, leave=False, dynamic_ncols=True)

        mode = "a" if resume else "w"
        if resume and self.jsonl.is_file() and self.jsonl.stat().st_size:
            with open(self.jsonl, "rb") as fh:
                fh.seek(-1, 2)
                if fh.read(1) != b"\n":  # a killed run's partial line: close it off
                    with open(self.jsonl, "a", encoding="utf-8") as fa:
                        fa.write("\n")
        with open(self.jsonl, mode, encoding="utf-8") as fh:
            for p in todo:
                label = scorer_label(p["scorer"])
                bar.set_postfix_str(f"{p['metric']} L={p['length']} {label}"[:80])
                t0 = time.perf_counter()
                p = self.resolve(p)
                if p["metric"] == "recall":
                    res = self.eval_recall(p)
                elif p["metric"] == "ppl":
                    res = self.eval_ppl(p, bar)
                elif p["metric"] == "ruler":
                    res = self.eval_ruler(p, bar_factory)
                else:
                    res = self.eval_lm_eval(p)
                if getattr(self, "_matched", None):
                    res = {**res, "matched": self._matched}
                    self._matched = None
                rec = self._record(p, res, time.perf_counter() - t0)
                fh.write(json.dumps(rec, default=_json_default) + "\n")
                fh.flush()
                self.done[p["key"]] = rec
                bar.update(1)
        bar.close()
        records = [self.done[p["key"]] for p in self.points]
        if self.points and self.points[0]["output"]["csv"]:
            write_csv(records, self.out_dir / f"{self.name}.csv")
        print(summary(records), file=self.out)
        if self.points and self.points[0]["output"]["plots"]:
            from .plots import make_plots

            for path in make_plots(
                records, self.out_dir, self.name, self.points[0]["output"]["speedup_csv"]
            ):
                print(f"[prism.eval] wrote {path}", file=self.out)
        return records

    def _record(
        self, p: Mapping[str, Any], res: Mapping[str, Any], seconds: float
    ) -> dict[str, Any]:
        rec = {
            "key": p["key"],
            "experiment": p["name"],
            "metric": p["metric"],
            "length": p["length"],
            "scorer": scorer_label(p["scorer"]),
            "family": family(p["scorer"]),
            "scorer_name": p["scorer"]["scorer"],
            "params": scorer_params(p["scorer"]),
            "model": p["model"],
            "time_s": round(seconds, 3),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "result": dict(res),
        }
        if p["metric"] == "ruler":
            rec["task"] = p["ruler"]["task"]
            rec["ruler"] = p["ruler"]
            rec["seed"] = p["seed"]
        elif p["metric"] in ("recall", "ppl"):
            rec["data"] = p["data"]
            rec[p["metric"]] = p[p["metric"]]
        return rec


def _encode(tok, text: str, template: str) -> list[int]:
    if template == "chat":
        msgs = [{"role": "user", "content": text}]
        return list(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True))
    if template != "plain":
        raise ValueError(f"unknown template {template!r}; valid: ['plain', 'chat']")
    return tok(text, add_special_tokens=False).input_ids


# ---------------------------------------------------------------------------------------------
# summary tables


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{100 * v:+.2f}%" if pct else f"{v:.4f}"
    return str(v)


def pareto_table(
    records: Sequence[Mapping[str, Any]], targets: Sequence[float] = (0.9, 0.95, 0.99)
) -> str:
    """Density at which each scorer family's sweep reaches each recall target, per length."""
    from .recall import density_at_recall

    rec = [r for r in records if r["metric"] == "recall"]
    groups: dict[tuple[int, str], list[tuple[float, float]]] = {}
    oracle: dict[tuple[int, str], dict[float, float]] = {}
    for r in rec:
        fam = r["family"]
        if r["scorer_name"].startswith("oracle-"):
            fam = r["scorer_name"]
            oracle.setdefault((r["length"], fam), {})[float(r["params"]["target"])] = r["result"][
                "density"
            ]
        groups.setdefault((r["length"], fam), []).append(
            (r["result"]["density"], r["result"]["recall"])
        )
    rows = []
    for (length, fam), pts in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1].startswith("oracle"), kv[0][1])
    ):
        cells = []
        for t in targets:
            if fam.startswith(
                "oracle-"
            ):  # the oracle at exactly this target (rows: every row >= t)
                d = oracle[(length, fam)].get(float(t))
            else:
                d = density_at_recall(pts, t)
            cells.append("–" if d is None else f"{d:.3f}")
        rows.append([length, fam, len(pts), *cells])
    header = ["length", "scorer", "points", *(f"density @ recall {t}" for t in targets)]
    return markdown_table(header, rows)


def equal_density_table(
    records: Sequence[Mapping[str, Any]], densities: Sequence[float] = (0.1, 0.2, 0.3, 0.4)
) -> str:
    """Mean recall (and worst-head recall) of each scorer family's sweep, interpolated at equal
    densities; "–" outside a family's swept density range."""
    from .recall import recall_at_density

    groups: dict[tuple[int, str], list[tuple[float, float, float]]] = {}
    for r in records:
        if r["metric"] != "recall" or r["scorer_name"].startswith("oracle-"):
            continue
        res = r["result"]
        groups.setdefault((r["length"], r["family"]), []).append(
            (res["density"], res["recall"], res["recall_min"])
        )
    rows = []
    for (length, fam), pts in sorted(groups.items()):
        cells = []
        for d in densities:
            mean = recall_at_density([(p[0], p[1]) for p in pts], d)
            worst = recall_at_density([(p[0], p[2]) for p in pts], d)
            cells.append("–" if mean is None else f"{mean:.3f} / {worst:.2f}")
        rows.append([length, fam, *cells])
    header = ["length", "scorer", *(f"recall (mean / worst head) @ density {d}" for d in densities)]
    return markdown_table(header, rows)


def summary(records: Sequence[Mapping[str, Any]]) -> str:
    """Markdown summary tables of the finished points."""
    parts = []
    rec = [
        r for r in records if r["metric"] == "recall" and not r["scorer_name"].startswith("oracle-")
    ]
    if rec:
        rows = [
            [
                r["length"],
                r["scorer"],
                _fmt(r["result"]["density"]),
                _fmt(r["result"]["recall"]),
                _fmt(r["result"]["recall_min"]),
                _fmt(r["result"]["oracle_density"]),
                _fmt(r["result"]["oracle_row_density"]),
            ]
            for r in rec
        ]
        hdr = [
            "length",
            "scorer",
            "density",
            "recall",
            "worst head",
            "oracle (head)",
            "oracle (row)",
        ]
        parts.append("## Attention recall vs density\n\n" + markdown_table(hdr, rows))
        parts.append("## Pareto: density needed per recall target\n\n" + pareto_table(records))
        parts.append("## Recall at equal density\n\n" + equal_density_table(records))
    ppl = [r for r in records if r["metric"] == "ppl"]
    if ppl:
        rows = [
            [
                r["length"],
                r["scorer"],
                _fmt(r["result"]["ppl"]),
                _fmt(r["result"].get("dppl"), pct=True),
                _fmt(r["result"].get("ppl_tail")),
                _fmt(r["result"].get("dppl_tail"), pct=True),
                _fmt(r["result"].get("density")),
            ]
            for r in ppl
        ]
        hdr = ["length", "scorer", "PPL", "ΔPPL", "PPL (tail)", "ΔPPL (tail)", "density"]
        parts.append("## Perplexity\n\n" + markdown_table(hdr, rows))
    ruler = [r for r in records if r["metric"] == "ruler"]
    if ruler:
        tasks = sorted({r["task"] for r in ruler})
        by: dict[tuple[int, str], dict[str, float]] = {}
        dense_pred = {
            (r["length"], r["task"], json.dumps(r.get("ruler"), sort_keys=True)): [
                s["prediction"] for s in r["result"]["per_sample"]
            ]
            for r in ruler
            if r["scorer_name"] == BASELINE
        }
        same: dict[tuple[int, str], list[bool]] = {}
        for r in ruler:
            by.setdefault((r["length"], r["scorer"]), {})[r["task"]] = r["result"]["accuracy"]
            ref = dense_pred.get(
                (r["length"], r["task"], json.dumps(r.get("ruler"), sort_keys=True))
            )
            if ref is not None and r["scorer_name"] != BASELINE:
                preds = [s["prediction"] for s in r["result"]["per_sample"]]
                same.setdefault((r["length"], r["scorer"]), []).extend(
                    a.strip() == b.strip() for a, b in zip(preds, ref)
                )
        rows = []
        for (length, label), accs in by.items():
            vals = [accs.get(t) for t in tasks]
            have = [v for v in vals if v is not None]
            mean = sum(have) / len(have) if have else None
            agree = same.get((length, label))
            agree_s = f"{sum(agree)}/{len(agree)}" if agree else "–"
            rows.append([length, label, *(_fmt(v) for v in vals), _fmt(mean), agree_s])
        n = sorted({r["result"]["samples"] for r in ruler})
        parts.append(
            f"## RULER-style accuracy (samples per task: {n})\n\n"
            + markdown_table(["length", "scorer", *tasks, "mean", "same output as dense"], rows)
        )
    lm = [r for r in records if r["metric"] == "lm_eval"]
    if lm:
        rows = []
        for r in lm:
            for task, metrics in (r["result"].get("results") or {}).items():
                for m, v in metrics.items():
                    if isinstance(v, (int, float)) and not m.endswith("stderr"):
                        rows.append([r["scorer"], task, m, _fmt(float(v))])
        parts.append("## lm-eval\n\n" + markdown_table(["scorer", "task", "metric", "value"], rows))
    return "\n\n".join(parts)


def run_experiment(
    source: str | Path | Mapping[str, Any],
    overrides: Sequence[str] = (),
    model=None,
    tokenizer=None,
) -> list[dict[str, Any]]:
    """Load, expand and run an experiment; return the records of all its points."""
    from .config import load_experiment

    cfg = load_experiment(source, overrides)
    return Runner(cfg, model=model, tokenizer=tokenizer).run()
