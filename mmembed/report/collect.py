"""Find the runs behind each ablation table in an MLflow store, as the kit logs them (``mmembed.tracking``).

* Tables 8, 9, 10: a Hydra multirun's sweep parent (tag ``mmembed.sweep_parent``) whose children are that table's
  experiments (tag ``mmembed.experiment``: ``ablation_hn{n}[_rule]``, ``ablation_vtc{s}``, ``ablation_lora_r{r}``).
  Jobs that failed before their run existed are only recorded on the parent (``mmembed.sweep.job.*``); they come back
  here as FAILED records, so a failed point is listed, never silently missing.
* Table 7: pipeline parents (tag ``mmembed.pipeline``), one per seed, with the ``pipeline_summary/summary.csv``
  artifact (one row per cumulative step) written by ``mmembed.tracking.log_pipeline_summary``.
"""

from __future__ import annotations

import math
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmembed import tracking

SWEEP_TABLES: dict[str, re.Pattern[str]] = {
    "8": re.compile(r"ablation_hn(\d+)(_rule)?"),
    "9": re.compile(r"ablation_vtc(\d+)(_tower)?"),
    "10": re.compile(r"ablation_lora_r(\d+)"),
}
PIPELINE_SUMMARY = "pipeline_summary/summary.csv"
FINAL = ("FINISHED", "FAILED")  # a sweep parent ends FAILED when some point failed: still reported, points listed


class ReportError(ValueError):
    """A problem with the report's inputs (store, experiment, pinned run), said in one line with the fix."""


@dataclass
class RunRecord:
    """One job of a table: a child run, or a job that failed before its run existed.

    Attributes:
        run_id: MLflow run id (None for a job that never got a run).
        name: Run name (or the job's point name).
        status: ``FINISHED``, ``FAILED``, ``KILLED``, ``RUNNING``.
        experiment: The exp name (tag ``mmembed.experiment``).
        seed: The ``seed`` param (as text), None when unknown.
        params: The run's params.
        metrics: The run's metrics (last values).
        start_ms: Start time (ms since the epoch).
        end_ms: End time (ms since the epoch), None while running.
        error: Why it failed, when known.
    """

    run_id: str | None
    name: str
    status: str
    experiment: str | None
    seed: str | None
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    start_ms: int | None = None
    end_ms: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "FINISHED"

    @property
    def seconds(self) -> float | None:
        """Wall time from MLflow's start/end times."""
        if self.start_ms is None or self.end_ms is None:
            return None
        return (self.end_ms - self.start_ms) / 1000.0

    def metric(self, key: str) -> float:
        value = self.metrics.get(key, math.nan)
        return value if math.isfinite(value) else math.nan


def record(run: Any) -> RunRecord:
    """A :class:`RunRecord` of an MLflow run."""
    info, data = run.info, run.data
    return RunRecord(run_id=info.run_id, name=info.run_name or info.run_id, status=info.status,
                     experiment=data.tags.get(tracking.EXPERIMENT_TAG), seed=data.params.get("seed"),
                     params=dict(data.params), metrics=dict(data.metrics), start_ms=info.start_time,
                     end_ms=info.end_time, error=data.tags.get(tracking.END_REASON_TAG))


class Store:
    """Every run of one MLflow experiment, read once, indexed by id and by parent."""

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        from mlflow.tracking import MlflowClient

        if tracking_uri.startswith("sqlite:///"):
            db = Path(tracking_uri[len("sqlite:///"):].split("?", 1)[0])
            if not db.is_file():
                raise ReportError(f"no MLflow store at {db}; run the experiments first (experiments/reproduce.sh) "
                                  "or pass --tracking-uri sqlite:///<root>/logs/mlflow.db")
        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.query_bootstrap: Any = None  # a mmembed.report.bootstrap.QueryBootstrap when the report computes one
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            names = [e.name for e in self.client.search_experiments()]
            raise ReportError(f"no MLflow experiment {experiment!r} in {tracking_uri} (it has: "
                              f"{', '.join(names) or 'none'}); pass --experiment NAME")
        self.experiment = experiment
        self.runs: dict[str, Any] = {}
        token = None
        while True:
            page = self.client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
            self.runs.update({r.info.run_id: r for r in page})
            token = page.token
            if not token:
                break
        self.children: dict[str, list[Any]] = {}
        for run in self.runs.values():
            parent = run.data.tags.get(tracking.PARENT_RUN_TAG)
            if parent:
                self.children.setdefault(parent, []).append(run)

    def get(self, run_id: str) -> Any:
        """The run ``run_id`` of this experiment."""
        if run_id not in self.runs:
            raise ReportError(f"run {run_id} is not in experiment {self.experiment!r} of {self.uri}; check the "
                              "--parent value (the run id is in the MLflow UI or `mlflow runs list`)")
        return self.runs[run_id]

    def newest_first(self, runs: Iterable[Any]) -> list[Any]:
        return sorted(runs, key=lambda r: r.info.start_time or 0, reverse=True)

    # ------------------------------------------------------------------------------------------------ sweeps
    def sweep_records(self, parent_id: str) -> list[RunRecord]:
        """The parent's children, plus its failed jobs that have no child run (from the job records)."""
        parent = self.get(parent_id)
        out = [record(c) for c in self.children.get(parent_id, [])]
        have = {r.run_id for r in out}
        for job in tracking.sweep_jobs(parent):
            if job.get("status") != "FAILED" or (job.get("run_id") and job["run_id"] in have):
                continue
            seed = re.search(r"\bseed=(\S+)", str(job.get("point") or ""))
            out.append(RunRecord(run_id=job.get("run_id"), name=str(job.get("point")), status="FAILED",
                                 experiment=job.get("experiment"), seed=seed.group(1) if seed else None,
                                 error=job.get("error")))
        return out

    def sweep_table(self, parent_id: str) -> str | None:
        """Which of Tables 8/9/10 a sweep parent holds: the one whose pattern matches all its jobs' exp names."""
        exps = {r.experiment for r in self.sweep_records(parent_id) if r.experiment}
        for table, pattern in SWEEP_TABLES.items():
            if exps and all(pattern.fullmatch(e) for e in exps):
                return table
        return None

    def sweep_parents(self, table: str) -> list[Any]:
        """The sweep parents of ``table``, newest first (any status)."""
        parents = [r for r in self.runs.values() if r.data.tags.get(tracking.SWEEP_PARENT_TAG) == "true"]
        return self.newest_first(p for p in parents if self.sweep_table(p.info.run_id) == table)

    def sweep_cells(self, parent_id: str) -> set[tuple[str | None, ...]]:
        """The (exp name, judge, curation strategy, seed) points a sweep parent ran: two sweeps of one table overlap
        when they share one (Table 8's MLLM-judge column, run as its own sweep, does not overlap the simulated one)."""
        return {(r.experiment, judge_kind(r), r.params.get("judge.strategy"), r.seed)
                for r in self.sweep_records(parent_id)}

    def pick_sweeps(self, table: str) -> tuple[list[Any], str | None]:
        """``(parents, note)``: the newest FINISHED (or partly FAILED) parent of ``table``, plus older finished parents
        that ran other points (a table's seeds may come from several sweeps, e.g. ``seed=0`` then ``seed=1,2``; Table
        8's MLLM-judge column from a sweep of its own): newest first, a parent sharing an (exp, judge, strategy,
        seed) point with those already taken is passed over. A note names newer parents that were not used (still
        running, killed)."""
        parents = self.sweep_parents(table)
        chosen: list[Any] = []
        seeds: set[tuple[str | None, ...]] = set()
        for p in parents:
            if p.info.status not in FINAL:
                continue
            mine = self.sweep_cells(p.info.run_id)
            if not chosen or not (mine & seeds):
                chosen.append(p)
                seeds |= mine
        first = (chosen[0].info.start_time or 0) if chosen else None
        skipped = [p for p in parents if p.info.status not in FINAL and
                   (first is None or (p.info.start_time or 0) > first)]
        note = None
        if skipped:
            note = "newer sweep(s) not used: " + ", ".join(f"`{p.info.run_id}` ({p.info.status})" for p in skipped)
        return chosen, note

    # -------------------------------------------------------------------------------------------- pipelines
    def pipeline_seed(self, parent: Any) -> str | None:
        """A pipeline parent's seed: its tag, else the ``seed`` param most of its stage runs carry."""
        if parent.data.tags.get(tracking.SEED_TAG) is not None:
            return parent.data.tags[tracking.SEED_TAG]
        seeds = Counter(c.data.params["seed"] for c in self.children.get(parent.info.run_id, [])
                        if "seed" in c.data.params)
        return seeds.most_common(1)[0][0] if seeds else None

    def pipeline_parents(self, experiment: str | None = "pipeline") -> list[Any]:
        """Pipeline parents (of exp ``experiment``; None: any), newest first."""
        runs = [r for r in self.runs.values() if r.data.tags.get(tracking.PIPELINE_TAG) == "true"
                and (experiment is None or r.data.tags.get(tracking.EXPERIMENT_TAG) == experiment)]
        return self.newest_first(runs)

    def pick_pipelines(self, experiment: str | None = "pipeline") -> list[Any]:
        """The newest finished (or failed: partial rows) pipeline parent per seed."""
        chosen: dict[str | None, Any] = {}
        for run in self.pipeline_parents(experiment):
            if run.info.status in FINAL:
                chosen.setdefault(self.pipeline_seed(run), run)
        return list(chosen.values())

    def pipeline_steps(self, run_id: str) -> list[dict[str, Any]]:
        """The rows of a pipeline parent's ``pipeline_summary/summary.csv`` (empty when it has none)."""
        import pandas as pd
        from mlflow.exceptions import MlflowException

        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = self.client.download_artifacts(run_id, PIPELINE_SUMMARY, tmp)
            except (MlflowException, OSError):
                return []
            return pd.read_csv(path).to_dict("records")


def parse_pins(pins: Sequence[str]) -> dict[str, list[str]]:
    """``["8=abc", "8=def", "7=x"]`` -> ``{"8": ["abc", "def"], "7": ["x"]}``.

    Raises:
        ReportError: For a value that is not ``TABLE=RUN_ID`` with a table among 7-10.
    """
    out: dict[str, list[str]] = {}
    for pin in pins:
        table, sep, run_id = pin.partition("=")
        table = table.strip().removeprefix("table")
        if not sep or table not in ("7", "8", "9", "10") or not run_id.strip():
            raise ReportError(f"--parent {pin!r} must be TABLE=RUN_ID with TABLE in 7, 8, 9, 10 (e.g. --parent "
                              "8=0123abcd...)")
        out.setdefault(table, []).append(run_id.strip())
    return out


def unique(values: Iterable[str | None]) -> list[str]:
    return list(dict.fromkeys(v for v in values if v))


def commits(runs: Iterable[Any]) -> list[str]:
    """The git commits (tag ``mlflow.source.git.commit``) the runs were made at."""
    return unique(r.data.tags.get(tracking.GIT_COMMIT_TAG) for r in runs)


def latest_per_seed(records: Sequence[RunRecord]) -> dict[str, RunRecord]:
    """The newest finished record per seed (duplicates, e.g. from two pinned sweeps, keep the newest); a run without
    a seed param counts as its own seed (``?<run id>``), never paired with another."""
    out: dict[str, RunRecord] = {}
    for r in sorted(records, key=lambda r: r.start_ms or 0):
        if r.ok:
            out[r.seed if r.seed is not None else f"?{r.run_id}"] = r
    return out


def params_of(records: Sequence[RunRecord], key: str) -> list[str]:
    return unique(r.params.get(key) for r in records)



def recorded_commands(parents: Sequence[Any], runs: Iterable[Any]) -> tuple[list[tuple[str, list[str]]], int]:
    """``([(command line, [run ids that recorded it])], parents without one)``: the command lines the runs recorded
    at start (tag ``mmembed.command``, :func:`mmembed.tracking.command_line`), parents first, in order; runs made
    before the kit recorded commands have none and are counted among the parents that lack one."""
    found: dict[str, list[str]] = {}
    for run in [*parents, *runs]:
        line = run.data.tags.get(tracking.COMMAND_TAG)
        if line:
            ids = found.setdefault(line, [])
            if run.info.run_id not in ids:
                ids.append(run.info.run_id)
    missing = sum(not p.data.tags.get(tracking.COMMAND_TAG) for p in parents)
    return list(found.items()), missing


def judge_kind(r: RunRecord) -> str | None:
    """Which judge a run's ``judge.model`` names: ``"simulated"`` (the simulated expert judge), ``"mllm"`` (a model
    folder), or None (no judge set)."""
    from mmembed.judge.simulated import SIMULATED

    model = r.params.get("judge.model")
    return None if model in (None, "None") else ("simulated" if model == SIMULATED else "mllm")


def split_judges(runs: dict[int, list[RunRecord]]) -> tuple[dict[int, list[RunRecord]], dict[int, list[RunRecord]]]:
    """Table 8's judge-strategy runs as (judge column, MLLM column): when both the simulated expert judge and an
    MLLM judge ran, the MLLM judge's runs move to a column of their own; otherwise all stay in the judge column."""
    def simulated(r: RunRecord) -> bool:
        return judge_kind(r) == "simulated"

    flat = [r for n, rs in runs.items() if n > 0 for r in rs]
    if not (any(simulated(r) for r in flat) and not all(simulated(r) for r in flat)):
        return runs, {}
    sim = {n: [r for r in rs if n == 0 or simulated(r)] for n, rs in runs.items()}
    mllm = {n: [r for r in rs if not simulated(r)] for n, rs in runs.items() if n > 0}
    return sim, {n: rs for n, rs in mllm.items() if rs}


def judge_column_label(runs: dict[int, list[RunRecord]]) -> str:
    """What judged the runs of Table 8's judge column: "simulated expert judge", "MLLM judge", or both named.

    n = 0 is left out: with no hard negatives nothing is judged (the point is shared by both columns).
    """
    from mmembed.judge.simulated import judge_label

    labels = {judge_label(r.params.get("judge.model") or "kit stage-1 model")
              for n, rs in runs.items() if n > 0 for r in rs}
    labels.discard(None)
    return " + ".join(sorted(labels)) if labels else "MLLM judge"
