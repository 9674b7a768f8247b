"""Sweeps: every job of a Hydra multirun (``-m``) becomes a child run (tag ``mlflow.parentRunId``) of one parent run
keyed by the sweep folder (:func:`get_or_create_sweep_parent`, :func:`start_sweep`); each job's outcome is recorded on
the parent (:func:`record_sweep_job`); :func:`summarize_sweep` tabulates and plots the swept value against the main
metrics as artifacts of the parent (the statistics, tables and plot are ``mmembed.report``'s); and
:func:`update_sweep_parent` names the parent for what it sweeps and ends it FINISHED, or FAILED when a point failed.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mmembed.report.markdown import markdown_table
from mmembed.report.sweeps import GOOD_STATUSES, best_point, mean_std_table, plot_sweep, point_table
from mmembed.tracking.liveness import process_tags
from mmembed.tracking.store import (
    EXPERIMENT_TAG,
    GIT_COMMIT_TAG,
    MAX_KEY_LENGTH,
    PARENT_RUN_TAG,
    RUN_NAME_TAG,
    SWEEP_BEST_TAG,
    SWEEP_DIR_TAG,
    SWEEP_FAILED_TAG,
    SWEEP_JOB_TAG,
    SWEEP_JOBS_TAG,
    SWEEP_KEYS_TAG,
    SWEEP_PARAM_TAG,
    SWEEP_PARENT_TAG,
    SWEEP_VALUES_TAG,
    _client,
    _quote,
    default_artifact_location,
    default_tracking_uri,
    get_or_create_experiment,
    git_commit,
    is_local_store,
    sanitize_key,
)

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.tracking import MlflowClient


def get_or_create_sweep_parent(
    experiment_name: str,
    sweep_dir: str | Path,
    tracking_uri: str | None = None,
    output_dir: str | Path = "outputs",
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> str:
    """Run id of the parent run of a sweep, keyed by its (absolute) sweep folder; created on first call.

    Every job of a Hydra multirun calls this with the same ``hydra.sweep.dir`` and gets the same parent. With a
    parallel launcher, create it once before the jobs start (:func:`start_sweep`; ``mmembed.launch.sweep`` does so
    from a Hydra callback), else two jobs racing on an empty store could create two parents.

    Args:
        experiment_name: MLflow experiment (created like :func:`make_mlflow_logger` would).
        sweep_dir: The sweep folder (``hydra.sweep.dir``).
        tracking_uri: Store URI; default :func:`default_tracking_uri` of ``output_dir``.
        output_dir: Folder for the default store and artifacts.
        run_name: Parent run name (default: the sweep folder's name).
        tags: Extra tags for a newly created parent.
    """
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    uri = tracking_uri or default_tracking_uri(output_dir)
    client = _client(uri)
    location = default_artifact_location(output_dir, experiment_name) if is_local_store(uri) else None
    exp_id = get_or_create_experiment(client, experiment_name, location)
    key = str(Path(sweep_dir).expanduser().resolve())
    found = client.search_runs([exp_id], filter_string=f"tags.`{SWEEP_DIR_TAG}` = '{_quote(key)}'",
                               order_by=["attributes.start_time ASC"], max_results=1)
    if found:
        return found[0].info.run_id
    run_tags = {SWEEP_DIR_TAG: key, SWEEP_PARENT_TAG: "true", MLFLOW_RUN_NAME: run_name or Path(key).name,
                **process_tags(), **{str(k): str(v) for k, v in (tags or {}).items()}}
    commit = git_commit()
    if commit:
        run_tags[GIT_COMMIT_TAG] = commit
    return client.create_run(exp_id, tags=run_tags).info.run_id


def sweep_name(experiments: Sequence[str]) -> str:
    """The name the points of a sweep share: their experiments' common prefix (``ablation_lora_r8``,
    ``ablation_lora_r16`` -> ``ablation_lora_r``), or the one experiment's name."""
    names = sorted({str(e) for e in experiments if e})
    if not names:
        return "sweep"
    prefix = os.path.commonprefix(names) if len(names) > 1 else names[0]
    return prefix.rstrip("_-. ") or "sweep"


def sweep_point_name(param: str, value: Any, seed: Any | None = None) -> str:
    """A child run's name: its point (last part of the swept key) and seed, e.g. ``lora_r=8 seed=0``."""
    name = f"{str(param).rsplit('.', 1)[-1]}={value}"
    return name if seed is None else f"{name} seed={seed}"


def resolve_swept_param(param: str | None, swept_keys: Sequence[str]) -> str:
    """The config key a sweep is summarised by: ``param`` when set, else the first swept key other than the
    experiment and the seed (``exp_name`` when only experiments are swept, ``seed`` when only seeds are)."""
    if param:
        return param
    keys = [k.lstrip("+~") for k in swept_keys]
    for key in keys:
        if key not in ("exp", "seed"):
            return key
    return "exp_name" if "exp" in keys or not keys else "seed"


def _values_text(values: Sequence[Any]) -> str:
    nums = [_number(str(v)) for v in values]
    if values and all(n is not None for n in nums):
        pairs = sorted(zip(nums, values), key=lambda t: t[0])
        values = [str(int(n)) if float(n).is_integer() else str(v) for n, v in pairs]
    else:
        values = sorted(str(v) for v in values)
    return ", ".join(dict.fromkeys(values))


def swept_keys(parent_run_id: str, tracking_uri: str | None = None, output_dir: str | Path = "outputs") -> list[str]:
    """The override keys a sweep varies, as :func:`start_sweep` recorded them on its parent (may be empty)."""
    run = _client(tracking_uri or default_tracking_uri(output_dir)).get_run(parent_run_id)
    return [k for k in run.data.tags.get(SWEEP_KEYS_TAG, "").split(",") if k]


def swept_param_of(parent_run_id: str, tracking_uri: str | None = None) -> str | None:
    """The config key the sweep's summary was made over (tag ``mmembed.sweep.param``), or None before any."""
    return _client(tracking_uri).get_run(parent_run_id).data.tags.get(SWEEP_PARAM_TAG)


def start_sweep(
    experiment_name: str,
    sweep_dir: str | Path,
    swept: Mapping[str, Sequence[str]],
    num_jobs: int | None = None,
    tracking_uri: str | None = None,
    output_dir: str | Path = "outputs",
) -> str:
    """Create the parent run of a sweep before its jobs start (call it from the launching process).

    Args:
        experiment_name: MLflow experiment.
        sweep_dir: The sweep folder (``hydra.sweep.dir``); the parent is keyed by it.
        swept: ``{override key: values}`` of the sweep (e.g. ``{"+exp": ["ablation_lora_r8", ...], "seed": [...]}``).
        num_jobs: Number of jobs, when known: the parent ends when that many jobs have reported
            (:func:`record_sweep_job`).
        tracking_uri: Store URI; default :func:`default_tracking_uri` of ``output_dir``.
        output_dir: Folder for the default store and artifacts.

    Returns:
        The parent's run id.
    """
    exps = [str(v) for k, vals in swept.items() if k.lstrip("+~") == "exp" for v in vals]
    parts = [f"{k} \u2208 {{{_values_text(list(v))}}}" for k, v in swept.items()]
    title = f"{sweep_name(exps)}: {'; '.join(parts) or 'sweep'} \u2026"
    tags = {SWEEP_KEYS_TAG: ",".join(swept)}
    if num_jobs is not None:
        tags[SWEEP_JOBS_TAG] = str(num_jobs)
    return get_or_create_sweep_parent(experiment_name, sweep_dir, tracking_uri=tracking_uri, output_dir=output_dir,
                                      run_name=title[:MAX_KEY_LENGTH], tags=tags)


def record_sweep_job(
    parent_run_id: str,
    job: int,
    point: str,
    value: Any,
    status: Literal["COMPLETED", "FAILED"],
    tracking_uri: str | None = None,
    experiment: str | None = None,
    run_id: str | None = None,
    error: str | None = None,
) -> None:
    """Record one job's outcome on the sweep parent (a tag per job), including jobs that failed before their run
    existed, so the parent can tell which points failed."""
    record = {"point": point, "value": None if value is None else str(value), "status": status,
              "experiment": experiment, "run_id": run_id, "error": (error or "")[:500] or None}
    _client(tracking_uri).set_tag(parent_run_id, f"{SWEEP_JOB_TAG}{job:05d}", json.dumps(record))


def sweep_jobs(run: Any) -> list[dict[str, Any]]:
    """The job records of a sweep parent (see :func:`record_sweep_job`), in job order."""
    return [json.loads(v) for k, v in sorted(run.data.tags.items()) if k.startswith(SWEEP_JOB_TAG)]


def update_sweep_parent(
    parent_run_id: str,
    swept_param: str,
    metrics: Sequence[str] = ("val/mmeb/overall", "val/visdoc/overall"),
    tracking_uri: str | None = None,
    final: bool = False,
    reduce: Literal["last", "max", "min"] = "last",
) -> str:
    """Refresh a sweep parent: summary artifacts, name and tags; end it when every job has reported (or ``final``).

    The name says what is swept (``ablation_lora_r: backbone.finetune.lora_r \u2208 {8, 16, 32}``, with a trailing
    ellipsis while jobs are still to come). The parent ends FINISHED, or FAILED when a job or a child run failed;
    tag ``mmembed.sweep.failed`` and the summary say which points.

    Returns:
        The parent's status after the update.
    """
    client = _client(tracking_uri)
    parent = client.get_run(parent_run_id)
    jobs = sweep_jobs(parent)
    children = child_runs(client, parent_run_id)
    frame = None
    if any(sanitize_key(swept_param) in c.data.params for c in children):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jobs still running have not logged their config yet
            frame = summarize_sweep(parent_run_id, swept_param, metrics, tracking_uri, reduce)
    values = [j["value"] for j in jobs if j.get("value") is not None]
    if frame is not None:
        values += [str(v) for v in frame[swept_param]]
    exps = [j.get("experiment") for j in jobs] + [c.data.tags.get(EXPERIMENT_TAG) for c in children]
    expected = int(parent.data.tags.get(SWEEP_JOBS_TAG, "0") or 0)
    done = final or (expected > 0 and len(jobs) >= expected)
    name = f"{sweep_name([e for e in exps if e])}: {swept_param} \u2208 {{{_values_text(values)}}}"
    failed = _failed_points(jobs, children)
    tags = {RUN_NAME_TAG: (name if done else f"{name} \u2026")[:MAX_KEY_LENGTH], SWEEP_PARAM_TAG: swept_param,
            SWEEP_VALUES_TAG: _values_text(values), SWEEP_FAILED_TAG: "; ".join(failed) or "none"}
    for key, value in tags.items():
        client.set_tag(parent_run_id, key, value)
    status = parent.info.status
    # KILLED too: a parent made by a job (no launcher callback) looks dead once that job's process is gone.
    if done and status in ("RUNNING", "KILLED"):
        if frame is not None:
            points = point_table(frame[frame["status"].isin(GOOD_STATUSES)], swept_param, list(metrics))
            client.log_table(parent_run_id, points, "sweep_summary/points.json")
        status = "FAILED" if failed else "FINISHED"
        client.set_terminated(parent_run_id, status)
    return status


def _failed_points(jobs: Sequence[Mapping[str, Any]], children: Sequence[Any]) -> list[str]:
    out = []
    for j in jobs:
        if j.get("status") == "FAILED":
            out.append(f"{j.get('point')} ({j['error']})" if j.get("error") else str(j.get("point")))
    recorded = {j.get("run_id") for j in jobs}
    out += [f"{c.info.run_name} ({c.info.status})" for c in children
            if c.info.status in ("FAILED", "KILLED") and c.info.run_id not in recorded]
    return out


def child_runs(client: MlflowClient, parent_run_id: str) -> list:
    """All runs tagged as children of ``parent_run_id`` (every page of the search)."""
    exp_id = client.get_run(parent_run_id).info.experiment_id
    runs, token = [], None
    while True:
        page = client.search_runs([exp_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'",
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _metric_value(client: MlflowClient, run: Any, key: str, reduce: str) -> float:
    if key not in run.data.metrics:
        return float("nan")
    if reduce == "last":
        return float(run.data.metrics[key])
    history = [m.value for m in client.get_metric_history(run.info.run_id, key)]
    return float(max(history) if reduce == "max" else min(history))


def summarize_sweep(
    parent_run_id: str,
    swept_param: str,
    metrics: Sequence[str] = ("val/mmeb/overall", "val/visdoc/overall"),
    tracking_uri: str | None = None,
    reduce: Literal["last", "max", "min"] = "last",
    artifact_path: str = "sweep_summary",
) -> pd.DataFrame:
    """Tabulate and plot a sweep's children: swept value vs the main metrics, as artifacts of the parent.

    Writes ``{artifact_path}/summary.csv`` (one row per child), ``summary.md`` (per point: mean ± std over the
    children of that point, e.g. seeds; the best point; the failed points) and ``summary.png`` (one panel per metric,
    the swept values as evenly spaced categories, error bars = std when a point has several runs) on the parent.
    On the parent's own metrics: ``best/<metric>`` for the best point (the first metric decides; highest wins, lowest
    for losses), and, when the values are integers, ``sweep/<metric>`` = each point's mean at ``step = swept value``
    so MLflow's own chart shows the curve too (a separate key: the runs table shows a metric's latest step, which
    here would be the largest swept value, not a result of the parent). Failed or killed children are listed,
    not averaged.

    Args:
        parent_run_id: The sweep's parent run.
        swept_param: Param key that varies across children (dotted config key, e.g. ``data.num_negatives``).
        metrics: Metric keys to report.
        tracking_uri: Store URI (default: MLflow's current one).
        reduce: Which value of each child's metric: its ``last`` logged value, or its ``max`` / ``min`` over steps.
        artifact_path: Artifact folder on the parent.

    Returns:
        One row per child, sorted by the swept value: ``run_id``, ``run_name``, ``status``, the param, ``seed``,
        then the metrics.
    """
    import pandas as pd
    from mlflow.entities import Metric

    if reduce not in ("last", "max", "min"):
        raise ValueError(f"reduce must be 'last', 'max' or 'min', got {reduce!r}")
    client = _client(tracking_uri)
    parent = client.get_run(parent_run_id)
    runs = child_runs(client, parent_run_id)
    if not runs:
        raise ValueError(f"run {parent_run_id} has no child runs (tag {PARENT_RUN_TAG}); nothing to summarize")
    key = sanitize_key(swept_param)  # the name log_config gave it
    rows = []
    for run in runs:
        row = {"run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status,
               swept_param: run.data.params.get(key), "seed": run.data.params.get("seed")}
        row.update({m: _metric_value(client, run, m, reduce) for m in metrics})
        rows.append(row)
    # A job that has not logged its config yet (parallel sweeps) is left out rather than failing the caller.
    missing = [r["run_name"] for r in rows if r[swept_param] is None]
    rows = [r for r in rows if r[swept_param] is not None]
    if not rows:
        raise ValueError(f"no child run of {parent_run_id} has a param {swept_param!r}; is it the dotted config key?")
    if missing:
        warnings.warn(f"summarize_sweep: child runs {missing} have no param {swept_param!r} yet; left out",
                      stacklevel=2)
    numeric = all(_number(r[swept_param]) is not None for r in rows)
    frame = pd.DataFrame(rows)
    if numeric:
        frame[swept_param] = [_number(v) for v in frame[swept_param]]
        if all(float(v).is_integer() for v in frame[swept_param]):
            frame[swept_param] = frame[swept_param].astype(int)
    frame = frame.sort_values([swept_param, "run_name"], kind="stable").reset_index(drop=True)
    good = frame[frame["status"].isin(GOOD_STATUSES)]
    points = point_table(good, swept_param, list(metrics))
    best = best_point(points, swept_param, list(metrics))
    failed = _failed_points(sweep_jobs(parent), runs)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        frame.to_csv(folder / "summary.csv", index=False)
        lines = [f"# Sweep over `{swept_param}`", "", markdown_table(mean_std_table(points, swept_param,
                                                                                       list(metrics)))]
        if best is not None:
            lines.append(f"Best point: **{swept_param} = {best[0]}** ({best[1]} = {best[2]:.2f})\n")
        lines.append(f"Failed points: {'; '.join(failed) if failed else 'none'}\n")
        lines += ["## Runs", "", markdown_table(frame)]
        (folder / "summary.md").write_text("\n".join(lines), encoding="utf-8")
        plot_sweep(good, swept_param, list(metrics), folder / "summary.png")
        client.log_artifacts(parent_run_id, str(folder), artifact_path)
    now = int(time.time() * 1000)
    new_points = []
    if numeric and frame[swept_param].dtype.kind == "i":
        # Every job of a sweep may refresh the summary: log only the points the parent does not hold yet.
        for m in metrics:
            have = {(h.step, h.value) for h in client.get_metric_history(parent_run_id, f"sweep/{m}")}
            new_points += [Metric(f"sweep/{m}", float(v), now, int(x))
                           for x, v in zip(points[swept_param], points[m])
                           if not math.isnan(v) and (int(x), float(v)) not in have]
    if best is not None:
        row = points[points[swept_param] == best[0]].iloc[0]
        new_points += [Metric(f"best/{m}", float(row[m]), now, 0) for m in metrics if not math.isnan(row[m])]
        client.set_tag(parent_run_id, SWEEP_BEST_TAG, f"{swept_param}={best[0]} ({best[1]} {best[2]:.2f})")
    for start in range(0, len(new_points), 1000):
        client.log_batch(parent_run_id, metrics=new_points[start : start + 1000])
    client.set_tag(parent_run_id, SWEEP_PARAM_TAG, swept_param)
    return frame
