"""``python -m prism.eval CONFIG [key=value ...]``: run an accuracy experiment.

CONFIG is a YAML path or a name under configs/experiments/. Overrides use omegaconf dotted keys
(``length=[4096,8192]``, ``scorers.0.threshold=[0.9,0.95]``, ``recall.layers=[0,10,20]``); a list
for a scalar key sweeps it. Results are appended to ``<output.dir>/<name>.jsonl`` (+ ``.csv``);
finished points are skipped on re-runs. The command's own switches are keys too:
``dry_run=true`` (or ``--dry-run``), ``summary=true``, ``report=true``; ``config=NAME`` is the same
as the bare CONFIG.
"""

from __future__ import annotations

import dataclasses
import sys


@dataclasses.dataclass
class EvalArgs:
    """The command's own options; every other ``key=value`` is an experiment override."""

    config: str | None = dataclasses.field(
        default=None, metadata={"help": "experiment YAML (path or name under configs/experiments/)"}
    )
    dry_run: bool = dataclasses.field(
        default=False, metadata={"help": "list the grid points and exit"}
    )
    summary: bool = dataclasses.field(
        default=False, metadata={"help": "print the summary of existing results and exit"}
    )
    report: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "from every record in the results file (whatever config made it): rewrite "
            "the CSV and the plots, print the summary, and exit"
        },
    )


def main(argv=None) -> int:
    from ..cli import parse_cli

    args, overrides = parse_cli(
        EvalArgs,
        argv,
        description=__doc__ + "\nAny other key=value is an experiment override.",
        positional="config",
        prog="python -m prism.eval",
        passthrough=True,
    )
    if args.config is None:
        print("error: an experiment config is needed (a YAML path or a name)", file=sys.stderr)
        return 2

    from .config import ConfigError, load_experiment, scorer_label
    from .runner import Runner, read_records, summary

    try:
        cfg = load_experiment(args.config, overrides)
        runner = Runner(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        done = {r.get("key") for r in read_records(runner.jsonl)}
        for p in runner.points:
            mark = "done" if p["key"] in done else "todo"
            extra = f" task={p['ruler']['task']}" if p["metric"] == "ruler" else ""
            print(
                f"{mark}  {p['key']}  {p['metric']:<7} L={p['length']:<6} {scorer_label(p['scorer'])}{extra}"
            )
        print(f"{len(runner.points)} points -> {runner.jsonl}")
        return 0
    if args.report:
        from .plots import make_plots
        from .runner import write_csv

        records = read_records(runner.jsonl)
        write_csv(records, runner.out_dir / f"{runner.name}.csv")
        print(summary(records))
        out = runner.points[0]["output"]
        for path in make_plots(records, runner.out_dir, runner.name, out["speedup_csv"]):
            print(f"[prism.eval] wrote {path}")
        return 0
    if args.summary:
        keys = {p["key"] for p in runner.points}
        print(summary([r for r in read_records(runner.jsonl) if r.get("key") in keys]))
        return 0
    runner.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
