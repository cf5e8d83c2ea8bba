"""``python -m prism.eval CONFIG.yaml [key=value ...]``: run an accuracy experiment.

CONFIG is a YAML path or a name under configs/experiments/. Overrides use omegaconf dotted keys
(``length=[4096,8192]``, ``scorers.0.threshold=[0.9,0.95]``, ``recall.layers=[0,10,20]``); a list
for a scalar key sweeps it. Results are appended to ``<output.dir>/<name>.jsonl`` (+ ``.csv``);
finished points are skipped on re-runs.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m prism.eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("config", help="experiment YAML (path or name under configs/experiments/)")
    ap.add_argument(
        "overrides", nargs="*", help="key=value overrides (a list value sweeps the key)"
    )
    ap.add_argument("--dry-run", action="store_true", help="list the grid points and exit")
    ap.add_argument(
        "--summary", action="store_true", help="print the summary of existing results and exit"
    )
    ap.add_argument(
        "--report",
        action="store_true",
        help="from every record in the results file (whatever config made it): rewrite the CSV "
        "and the plots, print the summary, and exit",
    )
    args = ap.parse_intermixed_args(argv)

    from .config import ConfigError, load_experiment, scorer_label
    from .runner import Runner, read_records, summary

    try:
        cfg = load_experiment(args.config, args.overrides)
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
