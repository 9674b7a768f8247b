"""``mmembed-report``: the paper's ablation Tables 7-10 from the runs in MLflow, as a markdown report with plots.

    mmembed-report                        # -> <run root>/reports/reproduction.md (run root: $MMEMBED_ROOT or cwd)
    mmembed-report --out -                # print the markdown (plots still go under <run root>/reports/img)
    mmembed-report --tables 8,10 --parent 8=<run id>
    mmembed-report --out docs/reproduction.md --img-dir docs/img    # only this way over the shipped report

The run root is the one ``experiments/configs/paths/default.yaml`` uses (``paths.root_dir``): ``$MMEMBED_ROOT``, else
the current folder; the MLflow store is ``logs/mlflow.db`` under it, and the report goes to ``reports/`` beside it, so
a report of some runs never overwrites ``docs/reproduction.md`` unless ``--out`` names it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path


def run_root() -> Path:
    """``$MMEMBED_ROOT``, else the current folder (``paths.root_dir`` of the Hydra configs)."""
    return Path(os.environ.get("MMEMBED_ROOT") or Path.cwd()).expanduser().resolve()


def default_uri() -> str:
    """``sqlite:///<run root>/logs/mlflow.db``: where ``experiments/run.py`` logs by default."""
    return f"sqlite:///{run_root() / 'logs' / 'mlflow.db'}"


def default_out() -> Path:
    """``<run root>/reports/reproduction.md``: a report of the runs, kept with them."""
    return run_root() / "reports" / "reproduction.md"


def read_times(path: str | Path) -> list[tuple[str, float]]:
    """``(part, seconds)`` from a file of ``part<TAB>seconds`` lines (blank lines and ``#`` comments skipped).

    Raises:
        ReportError: a line is not ``part<TAB>number``.
    """
    from mmembed.report.collect import ReportError

    out = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        part, _, seconds = line.rpartition("\t")
        try:
            value = float(seconds)
        except ValueError:
            value = None
        if value is None or not part.strip():
            raise ReportError(f"--times {path}: line {i} {line!r} is not 'part<TAB>seconds'")
        out.append((part.strip(), value))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmembed-report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: sqlite:///<MMEMBED_ROOT or "
                   "cwd>/logs/mlflow.db)")
    p.add_argument("--experiment", default="mmembed", help="MLflow experiment name (default: mmembed)")
    p.add_argument("--out", default=None, help="the markdown report to write ('-': print it; default "
                   "<run root>/reports/reproduction.md, never docs/ unless named here)")
    p.add_argument("--img-dir", default=None, help="folder of the plots repro_table{7,8,9,10}.png (default: img/ "
                   "beside --out)")
    p.add_argument("--parent", action="append", default=[], metavar="TABLE=RUN_ID",
                   help="use this parent run for a table (repeat; several for one table are merged)")
    p.add_argument("--tables", default="7,8,9,10", help="comma-separated tables to report (default: 7,8,9,10)")
    p.add_argument("--commands", default=None, metavar="FILE",
                   help="optional text file of commands, quoted after the command lines the runs recorded")
    p.add_argument("--pipeline-exp", default="pipeline",
                   help="exp name of the Table 7 pipeline runs (default: pipeline; 'any' for every pipeline run)")
    p.add_argument("--times", default=None, metavar="FILE",
                   help="tab-separated 'part<TAB>seconds' lines (experiments/reproduce.sh writes them): the script's "
                        "wall time per table, shown in the report's header")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="REPS",
                   help="replicates of the paired bootstrap over queries (0: skip it; default 1000)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per downloaded eval folder
    from mmembed.report.collect import ReportError, Store, parse_pins
    from mmembed.report.document import build_report

    tables = [t.strip().removeprefix("table") for t in args.tables.split(",") if t.strip()]
    bad = [t for t in tables if t not in ("7", "8", "9", "10")]
    if bad:
        print(f"error: --tables {args.tables!r}: {', '.join(bad)} not among 7, 8, 9, 10 (e.g. --tables 8,10)",
              file=sys.stderr)
        return 2
    try:
        pins = parse_pins(args.parent)
        if args.commands is not None and not Path(args.commands).is_file():
            raise ReportError(f"--commands {args.commands}: no such file (leave it out: the report lists the command "
                              "lines the runs recorded)")
        if args.times is not None and not Path(args.times).is_file():
            raise ReportError(f"--times {args.times}: no such file (experiments/reproduce.sh writes it; leave it out "
                              "to report without the script's wall times)")
        store = Store(args.tracking_uri or default_uri(), args.experiment)
        to_stdout = args.out == "-"
        out = None if to_stdout else Path(args.out) if args.out else default_out()
        img_dir = Path(args.img_dir) if args.img_dir else (out.parent if out else default_out().parent) / "img"
        call = "mmembed-report " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        text, sections = build_report(store, out, img_dir, tables, pins, args.commands,
                                      None if args.pipeline_exp == "any" else args.pipeline_exp, call.strip(),
                                      args.bootstrap, times=read_times(args.times) if args.times else None)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if out is None:
        sys.stdout.write(text)
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    for s in sections:
        state = f"{len(s.claims)} claims" if s.ran else "not run"
        print(f"table {s.table}: {state}")
    print(f"wrote {out} (plots in {img_dir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
