"""Pipelines: the parent run of one ``task=pipeline`` execution (its stages are children), a child standing for a
reused stage, and the step table + bar chart on the parent."""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmembed.report.markdown import markdown_table
from mmembed.report.plots import plot_steps
from mmembed.tracking.liveness import mark_stale_runs, process_tags
from mmembed.tracking.store import (
    GIT_COMMIT_TAG,
    PARENT_RUN_TAG,
    PIPELINE_TAG,
    RUN_NAME_TAG,
    STAGE_REUSED_TAG,
    STAGE_TAG,
    _client,
    default_artifact_location,
    default_tracking_uri,
    get_or_create_experiment,
    git_commit,
    is_local_store,
    sanitize_key,
)

if TYPE_CHECKING:
    import pandas as pd


def start_pipeline_run(experiment_name: str, run_name: str, tracking_uri: str | None = None,
                       output_dir: str | Path = "outputs", tags: Mapping[str, Any] | None = None) -> str:
    """Create the parent run of one pipeline execution (its stages become children); returns its id.

    The parent carries this process's host and pid (:func:`~mmembed.tracking.liveness.process_tags`), like every run:
    when the pipeline is killed, the next run on the store marks the parent KILLED instead of leaving it RUNNING
    (:func:`~mmembed.tracking.liveness.mark_stale_runs`, which runs here too).
    """
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    uri = tracking_uri or default_tracking_uri(output_dir)
    client = _client(uri)
    location = default_artifact_location(output_dir, experiment_name) if is_local_store(uri) else None
    exp_id = get_or_create_experiment(client, experiment_name, location)
    mark_stale_runs(client, exp_id)
    run_tags = {PIPELINE_TAG: "true", MLFLOW_RUN_NAME: run_name, **process_tags(),
                **{str(k): str(v) for k, v in (tags or {}).items()}}
    commit = git_commit()
    if commit:
        run_tags[GIT_COMMIT_TAG] = commit
    return client.create_run(exp_id, tags=run_tags).info.run_id


def log_reused_stage(parent_run_id: str, stage: str, metrics: Mapping[str, float], folder: str | Path,
                     tracking_uri: str | None = None) -> str:
    """A child run standing for a stage this pipeline reused (not rebuilt): its recorded metrics, its folder."""
    from mlflow.entities import Metric, RunTag

    client = _client(tracking_uri)
    exp_id = client.get_run(parent_run_id).info.experiment_id
    tags = {PARENT_RUN_TAG: parent_run_id, RUN_NAME_TAG: f"{stage} (reused)", STAGE_TAG: stage,
            STAGE_REUSED_TAG: "true", "mmembed.stage.folder": str(folder)}
    run_id = client.create_run(exp_id, tags=tags).info.run_id
    now = int(time.time() * 1000)
    points = [Metric(sanitize_key(k), float(v), now, 0) for k, v in metrics.items()
              if isinstance(v, int | float) and math.isfinite(v)]
    client.log_batch(run_id, metrics=points, tags=[RunTag(STAGE_TAG, stage)])
    client.set_terminated(run_id)
    return run_id


def log_pipeline_summary(parent_run_id: str, frame: pd.DataFrame, metrics: Sequence[str],
                         tracking_uri: str | None = None, artifact_path: str = "pipeline_summary",
                         status: str = "FINISHED") -> None:
    """Write a pipeline's step table (``summary.csv``, ``summary.md``) and a grouped bar chart (``summary.png``)
    as artifacts of its parent run, log the last row's metrics on the parent, and end the parent with ``status``.

    Args:
        parent_run_id: The pipeline's parent run.
        frame: One row per cumulative step: a ``step`` column, then one column per metric.
        metrics: The metric columns to plot.
        tracking_uri: Store URI.
        artifact_path: Artifact folder on the parent.
        status: Terminal status of the parent (``FINISHED`` / ``FAILED``).
    """
    client = _client(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        frame.to_csv(folder / "summary.csv", index=False)
        (folder / "summary.md").write_text(markdown_table(frame), encoding="utf-8")
        plot_steps(frame, list(metrics), folder / "summary.png")
        client.log_artifacts(parent_run_id, str(folder), artifact_path)
    if len(frame):
        last = frame.iloc[-1]
        for m in metrics:
            value = last.get(m)
            if value is not None and isinstance(value, int | float) and math.isfinite(value):
                client.log_metric(parent_run_id, sanitize_key(m), float(value))
    client.set_terminated(parent_run_id, status=status)
