"""Runs: the Lightning MLflow logger on the kit's store, the composed config as params / tags / YAML, and a tool's
summary (mining, curation) as a run of its own."""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mmembed.tracking.liveness import mark_stale_runs, process_tags, reopen_run
from mmembed.tracking.store import (
    _TRUNCATED,
    END_REASON_TAG,
    EXPERIMENT_TAG,
    GIT_COMMIT_TAG,
    MAX_KEY_LENGTH,
    MAX_PARAM_LENGTH,
    PARENT_RUN_TAG,
    RESUME_CHANGED_TAG,
    _client,
    check_server,
    default_artifact_location,
    default_tracking_uri,
    get_or_create_experiment,
    git_commit,
    is_local_store,
    sanitize_key,
)
from mmembed.tracking.sweeps import get_or_create_sweep_parent

if TYPE_CHECKING:
    from lightning.pytorch.loggers import MLFlowLogger


def make_mlflow_logger(
    experiment_name: str = "mmembed",
    tracking_uri: str | None = None,
    output_dir: str | Path = "outputs",
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    sweep_dir: str | Path | None = None,
    log_model: bool | Literal["all"] = False,
    run_id: str | None = None,
) -> MLFlowLogger:
    """A Lightning ``MLFlowLogger`` on the embedded sqlite store (or ``tracking_uri``), optionally a child run.

    On rank 0 the store is created once under a lock (:func:`ensure_store`), the experiment is created if needed
    (marked as model training, artifacts under ``output_dir/mlartifacts/<experiment>`` when the store is local; a
    remote server keeps its own artifact store), and stale RUNNING runs of this host are marked KILLED
    (:func:`mark_stale_runs`). The run itself is created by Lightning on first use, tagged with this process.

    Args:
        experiment_name: MLflow experiment.
        tracking_uri: Store URI; default :func:`default_tracking_uri` of ``output_dir``.
        output_dir: Folder for the default store and artifacts.
        run_name: Display name of the run.
        tags: Extra run tags.
        parent_run_id: Make the run a child of this run (sweeps).
        sweep_dir: Alternatively, the Hydra sweep folder: the parent is found or created by
            :func:`get_or_create_sweep_parent` (ignored when ``parent_run_id`` is given).
        log_model: Lightning's checkpoint-as-artifact option.
        run_id: Continue this run instead of creating one (resume; see
            ``mmembed.callbacks.resume.saved_mlflow_run_id``).
    """
    from lightning.fabric.utilities.rank_zero import rank_zero_only
    from lightning.pytorch.loggers import MLFlowLogger

    uri = tracking_uri or default_tracking_uri(output_dir)
    check_server(uri)
    artifact_location = default_artifact_location(output_dir, experiment_name) if is_local_store(uri) else None
    run_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    # Only rank 0 creates runs (MLFlowLogger.experiment is rank-zero-only), so only it touches the store here.
    if rank_zero_only.rank == 0:
        client = _client(uri)
        exp_id = get_or_create_experiment(client, experiment_name, artifact_location)
        mark_stale_runs(client, exp_id)
        if run_id is not None:
            from mlflow.exceptions import MlflowException

            try:
                reopen_run(client, run_id)
            except MlflowException as e:  # e.g. the checkpoint was written against another store
                warnings.warn(f"cannot continue MLflow run {run_id} in {uri} ({e}); starting a new run", stacklevel=2)
                run_id = None
        if run_id is None and parent_run_id is None and sweep_dir is not None:
            parent_run_id = get_or_create_sweep_parent(experiment_name, sweep_dir, tracking_uri=uri,
                                                       output_dir=output_dir)
    if parent_run_id is not None and run_id is None:
        run_tags[PARENT_RUN_TAG] = parent_run_id
    run_tags.update(process_tags())
    return MLFlowLogger(experiment_name=experiment_name, run_name=run_name, tracking_uri=uri, tags=run_tags,
                        artifact_location=artifact_location, log_model=log_model, run_id=run_id)


def end_run(logger: MLFlowLogger, status: Literal["FINISHED", "FAILED", "KILLED"], reason: str | None = None) -> None:
    """End the logger's run with ``status`` (e.g. FAILED when the job raised outside ``Trainer.fit``), if it started."""
    # Lightning's MLFlowLogger creates its run lazily; ``_initialized`` says whether it did (no public flag).
    if getattr(logger, "_initialized", False) and logger.run_id:
        if reason:
            logger.experiment.set_tag(logger.run_id, END_REASON_TAG, reason[:5000])
        logger.experiment.set_terminated(logger.run_id, status)


def log_params(logger: MLFlowLogger, params: Mapping[str, Any]) -> None:
    """Log a few extra params on the logger's run (e.g. where the embedder was saved)."""
    for key, value in params.items():
        logger.experiment.log_param(logger.run_id, sanitize_key(str(key)), str(value)[:MAX_PARAM_LENGTH])


def log_artifacts(loggers: Sequence[Any], local_dir: str | Path, artifact_path: str | None = None) -> None:
    """Upload a folder as artifacts of the run of every ``MLFlowLogger`` in ``loggers`` (others are skipped)."""
    from lightning.pytorch.loggers import MLFlowLogger

    for logger in loggers:
        if isinstance(logger, MLFlowLogger):
            logger.experiment.log_artifacts(logger.run_id, str(local_dir), artifact_path)


def flatten_config(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings and lists as dotted keys: ``{"a": {"b": [1, 2]}}`` -> ``{"a.b.0": 1, "a.b.1": 2}``.

    Empty mappings / lists are kept as one entry (``"{}"`` / ``"[]"``) so the key still shows in the run.
    """
    out: dict[str, Any] = {}
    items = cfg.items() if isinstance(cfg, Mapping) else enumerate(cfg)
    for key, value in items:
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping | list | tuple) and len(value):
            out.update(flatten_config(value, full))  # type: ignore[arg-type]
        elif isinstance(value, Mapping):
            out[full] = "{}"
        elif isinstance(value, list | tuple):
            out[full] = "[]"
        else:
            out[full] = value
    return out


def config_params(cfg: Mapping[str, Any]) -> dict[str, str]:
    """The flattened config as MLflow params: sanitised unique keys, string values of at most 6000 characters."""
    params: dict[str, str] = {}
    for key, value in flatten_config(cfg).items():
        text = str(value)
        if len(text) > MAX_PARAM_LENGTH:
            text = text[: MAX_PARAM_LENGTH - len(_TRUNCATED)] + _TRUNCATED
        safe, n = sanitize_key(key), 2
        while safe in params:  # two keys that differ only in characters MLflow forbids
            safe, n = f"{sanitize_key(key)[: MAX_KEY_LENGTH - 4]}_{n}", n + 1
        params[safe] = text
    return params


def log_config(
    logger: MLFlowLogger,
    cfg: Mapping[str, Any],
    experiment: str | None = None,
    tags: Mapping[str, Any] | None = None,
    artifact_file: str = "config.yaml",
) -> dict[str, str]:
    """Record a composed config on the logger's run: params, tags and a YAML artifact. Rank 0 only.

    Args:
        logger: The run's ``MLFlowLogger``.
        cfg: The composed config as plain containers (e.g. ``OmegaConf.to_container(cfg, resolve=True)``).
        experiment: Value of the ``mmembed.experiment`` tag (e.g. the ``+exp=`` name); default the MLflow
            experiment name.
        tags: Extra tags.
        artifact_file: Name of the YAML artifact.

    Returns:
        The params logged (empty on other ranks).
    """
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank != 0:
        return {}
    import yaml
    from mlflow.entities import Param, RunTag

    client, run_id = logger.experiment, logger.run_id
    params = config_params(cfg)
    # A resumed run already holds its params, and MLflow refuses to change one (e.g. ckpt_path): log the new keys
    # only; the changed ones are listed in a tag and the resumed config goes to its own YAML.
    logged = client.get_run(run_id).data.params
    changed = {k: v for k, v in params.items() if k in logged and logged[k] != v}
    items = [Param(k, v) for k, v in params.items() if k not in logged]
    for start in range(0, len(items), 100):  # MLflow's per-batch limit
        client.log_batch(run_id, params=items[start : start + 100])
    if experiment is None:
        experiment = client.get_experiment(logger.experiment_id).name
    run_tags = {EXPERIMENT_TAG: experiment, **(tags or {})}
    if logged:
        artifact_file = f"resumed_{artifact_file}"
        if changed:
            run_tags[RESUME_CHANGED_TAG] = "; ".join(f"{k}={v}" for k, v in changed.items())[:5000]
    commit = git_commit()
    if commit:
        run_tags[GIT_COMMIT_TAG] = commit
    client.log_batch(run_id, tags=[RunTag(str(k), str(v)) for k, v in run_tags.items()])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / artifact_file
        path.write_text(yaml.safe_dump(_plain(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")
        client.log_artifact(run_id, str(path))
    return params


def _plain(value: Any) -> Any:
    """Containers of YAML-safe scalars (paths, dtypes, ... become strings)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def summary_metrics(summary: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a nested summary as ``a/b/c`` metric keys (booleans, strings, lists and None skipped)."""
    out: dict[str, float] = {}
    for key, value in summary.items():
        full = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(summary_metrics(value, full))
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[sanitize_key(full)] = float(value)
    return out


def log_summary(
    summary: Mapping[str, Any],
    *,
    experiment_name: str = "mmembed",
    run_name: str | None = None,
    tracking_uri: str | None = None,
    output_dir: str | Path = "outputs",
    params: Mapping[str, Any] | None = None,
    artifacts: Sequence[str | Path] = (),
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Record a tool's summary (mining, curation, ...) as its own MLflow run, not only as a file in a folder.

    Args:
        summary: The summary (e.g. ``CurationSummary.to_json()``); its numeric leaves become metrics
            (:func:`summary_metrics`), e.g. ``totals/fn_caught`` or ``datasets/synth_ret_t2i/judged_yes``.
        experiment_name: MLflow experiment (created if needed).
        run_name: Display name of the run.
        tracking_uri: Store URI; default :func:`default_tracking_uri` of ``output_dir``.
        output_dir: Folder of the default store and artifacts.
        params: Settings to record as params (flattened like a config).
        artifacts: Files to attach (summary.json, manifest.jsonl, ...).
        tags: Extra run tags.
        parent_run_id: Nest the run under this one (sweeps).

    Returns:
        The run id.
    """
    from mlflow.entities import Metric, Param, RunTag

    uri = tracking_uri or default_tracking_uri(output_dir)
    client = _client(uri)
    location = default_artifact_location(output_dir, experiment_name) if is_local_store(uri) else None
    experiment_id = get_or_create_experiment(client, experiment_name, location)
    run_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    if parent_run_id is not None:
        run_tags[PARENT_RUN_TAG] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=run_tags)
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in summary_metrics(summary).items()]
    for start in range(0, len(metrics), 1000):  # MLflow's per-batch limit for metrics
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
    items = [Param(k, v) for k, v in config_params(params or {}).items()]
    for start in range(0, len(items), 100):  # and for params
        client.log_batch(run_id, params=items[start : start + 100])
    commit = git_commit()
    if commit:
        client.log_batch(run_id, tags=[RunTag(GIT_COMMIT_TAG, commit)])
    for path in artifacts:
        if Path(path).is_file():
            client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    return run_id
