"""``mmembed-report``: turn the ablation runs in MLflow into ``docs/reproduction.md`` (Tables 7-10 of the paper).

    mmembed-report                                   # logs/mlflow.db under $MMEMBED_ROOT or the current folder
    mmembed-report --tables 8,10 --parent 8=<run id> --commands experiments/reproduce.sh
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path


def default_uri() -> str:
    """``sqlite:///<MMEMBED_ROOT or cwd>/logs/mlflow.db``: where ``experiments/run.py`` logs by default."""
    root = Path(os.environ.get("MMEMBED_ROOT") or Path.cwd()).expanduser().resolve()
    return f"sqlite:///{root / 'logs' / 'mlflow.db'}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmembed-report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: sqlite:///<MMEMBED_ROOT or "
                   "cwd>/logs/mlflow.db)")
    p.add_argument("--experiment", default="mmembed", help="MLflow experiment name (default: mmembed)")
    p.add_argument("--out", default="docs/reproduction.md", help="the markdown report to write")
    p.add_argument("--img-dir", default="docs/img", help="folder of the plots repro_table{7,8,9,10}.png")
    p.add_argument("--parent", action="append", default=[], metavar="TABLE=RUN_ID",
                   help="use this parent run for a table (repeat; several for one table are merged)")
    p.add_argument("--tables", default="7,8,9,10", help="comma-separated tables to report (default: 7,8,9,10)")
    p.add_argument("--commands", default="experiments/reproduce.sh",
                   help="text file with the commands that made the runs, quoted in the report")
    p.add_argument("--pipeline-exp", default="pipeline",
                   help="exp name of the Table 7 pipeline runs (default: pipeline; 'any' for every pipeline run)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="REPS",
                   help="replicates of the paired bootstrap over queries (0: skip it; default 1000)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per downloaded eval folder
    from mmembed.report.collect import ReportError, Store, parse_pins
    from mmembed.report.document import write_report

    tables = [t.strip().removeprefix("table") for t in args.tables.split(",") if t.strip()]
    bad = [t for t in tables if t not in ("7", "8", "9", "10")]
    if bad:
        print(f"error: --tables {args.tables!r}: {', '.join(bad)} not among 7, 8, 9, 10 (e.g. --tables 8,10)",
              file=sys.stderr)
        return 2
    try:
        pins = parse_pins(args.parent)
        store = Store(args.tracking_uri or default_uri(), args.experiment)
        commands = args.commands if Path(args.commands).is_file() else None
        call = "mmembed-report " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        sections = write_report(store, args.out, args.img_dir, tables, pins, commands,
                                None if args.pipeline_exp == "any" else args.pipeline_exp, call.strip(),
                                args.bootstrap)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for s in sections:
        state = f"{len(s.claims)} claims" if s.ran else "not run"
        print(f"table {s.table}: {state}")
    print(f"wrote {args.out} (plots in {args.img_dir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
