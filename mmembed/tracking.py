"""MLflow helpers: an embedded sqlite store by default, the composed config as params, parent/child sweep runs.

Layout under ``output_dir`` with the defaults::

    mlflow.db                     the tracking store (sqlite; MLflow 3 refuses a plain file store)
    mlartifacts/{experiment}/...  the artifacts of every run of the experiment

Browse it with ``mlflow ui --backend-store-uri sqlite:///<output_dir>/mlflow.db --workers 1``. The first use of a new
``mlflow.db`` creates its schema, which takes a few seconds.

Sweeps: every job of a Hydra multirun (``-m``) becomes a child run (tag ``mlflow.parentRunId``) of one parent run
keyed by the sweep folder (:func:`get_or_create_sweep_parent`); :func:`summarize_sweep` then tabulates and plots the
swept value against the main metrics as artifacts of the parent.
"""

from __future__ import annotations

import math
import re
import subprocess
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # lightning and pandas are heavy imports; only the functions that need them import them
    import pandas as pd
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

DB_NAME = "mlflow.db"
ARTIFACT_DIRNAME = "mlartifacts"
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests runs that carry it
GIT_COMMIT_TAG = "mlflow.source.git.commit"
RUN_NAME_TAG = "mlflow.runName"
SWEEP_DIR_TAG = "mmembed.sweep_dir"
SWEEP_PARENT_TAG = "mmembed.sweep_parent"
EXPERIMENT_TAG = "mmembed.experiment"
MAX_PARAM_LENGTH = 6000  # MLflow >= 2.x rejects longer param values
MAX_KEY_LENGTH = 250
_TRUNCATED = "...[truncated]"


# ----------------------------------------------------------------------------------------------------- stores
def default_tracking_uri(output_dir: str | Path) -> str:
    """``sqlite:///<output_dir>/mlflow.db`` (absolute path; the folder is created)."""
    folder = Path(output_dir).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / DB_NAME}"


def default_artifact_location(output_dir: str | Path, experiment_name: str) -> str:
    """``file://<output_dir>/mlartifacts/<experiment>``: artifacts next to the sqlite store."""
    safe = re.sub(r"[^A-Za-z0-9._\-]+", "_", experiment_name) or "default"
    return (Path(output_dir).expanduser().resolve() / ARTIFACT_DIRNAME / safe).as_uri()


def is_local_store(tracking_uri: str) -> bool:
    """True for stores on this machine (sqlite, file paths), where we choose the artifact location ourselves."""
    return tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri


def _client(tracking_uri: str | None) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def get_or_create_experiment(client: MlflowClient, name: str, artifact_location: str | None = None) -> str:
    """Id of the experiment called ``name``, created (or restored from the bin) if needed."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:  # another process created it between our lookup and the create
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# ----------------------------------------------------------------------------------------------------- logger
def make_mlflow_logger(
    experiment_name: str = "mmembed",
    tracking_uri: str | None = None,
    output_dir: str | Path = "outputs",
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    sweep_dir: str | Path | None = None,
    log_model: bool | Literal["all"] = False,
) -> MLFlowLogger:
    """A Lightning ``MLFlowLogger`` on the embedded sqlite store (or ``tracking_uri``), optionally a child run.

    The experiment is created on first use (by Lightning, on rank 0 only) with its artifacts under
    ``output_dir/mlartifacts/<experiment>`` when the store is local; a remote server keeps its own artifact store.

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
    """
    from lightning.fabric.utilities.rank_zero import rank_zero_only
    from lightning.pytorch.loggers import MLFlowLogger

    uri = tracking_uri or default_tracking_uri(output_dir)
    artifact_location = default_artifact_location(output_dir, experiment_name) if is_local_store(uri) else None
    run_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    # Only rank 0 creates runs (MLFlowLogger.experiment is rank-zero-only), so only it needs the parent.
    if parent_run_id is None and sweep_dir is not None and rank_zero_only.rank == 0:
        parent_run_id = get_or_create_sweep_parent(experiment_name, sweep_dir, tracking_uri=uri, output_dir=output_dir)
    if parent_run_id is not None:
        run_tags[PARENT_RUN_TAG] = parent_run_id
    return MLFlowLogger(experiment_name=experiment_name, run_name=run_name, tracking_uri=uri, tags=run_tags,
                        artifact_location=artifact_location, log_model=log_model)


# ----------------------------------------------------------------------------------------------------- config
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


def sanitize_key(key: str) -> str:
    """An MLflow-valid param / metric key: allowed characters only, no empty or ``..`` path parts, <= 250 chars."""
    key = re.sub(r"[^/\w.\- :]", "_", key)
    parts = [p if p not in ("", ".", "..") else "_" for p in key.strip("/").split("/")]
    return "/".join(parts)[:MAX_KEY_LENGTH] or "_"


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


def git_commit(path: str | Path | None = None) -> str | None:
    """``git rev-parse HEAD`` of the repository holding ``path`` (default: this package), or None without git."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5,
                             check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if re.fullmatch(r"[0-9a-f]{40}", commit) else None


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
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow's per-batch limit
        client.log_batch(run_id, params=items[start : start + 100])
    if experiment is None:
        experiment = client.get_experiment(logger.experiment_id).name
    run_tags = {EXPERIMENT_TAG: experiment, **(tags or {})}
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


# ----------------------------------------------------------------------------------------------------- sweeps
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
    parallel launcher, call it once before the jobs start (two jobs racing on an empty store could create two
    parents).

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
                **{str(k): str(v) for k, v in (tags or {}).items()}}
    commit = git_commit()
    if commit:
        run_tags[GIT_COMMIT_TAG] = commit
    return client.create_run(exp_id, tags=run_tags).info.run_id


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


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


def markdown_table(frame: pd.DataFrame, floatfmt: str = ".2f") -> str:
    """A GitHub-flavoured markdown table of a DataFrame (no ``tabulate`` dependency)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else format(v, floatfmt)
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "|".join("---" for _ in frame.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def summarize_sweep(
    parent_run_id: str,
    swept_param: str,
    metrics: Sequence[str] = ("val/mmeb/overall", "val/visdoc/overall"),
    tracking_uri: str | None = None,
    reduce: Literal["last", "max", "min"] = "last",
    artifact_path: str = "sweep_summary",
) -> pd.DataFrame:
    """Tabulate and plot a sweep's children: swept value vs the main metrics, as artifacts of the parent.

    Writes ``{artifact_path}/summary.csv``, ``summary.md`` and ``summary.png`` on the parent run, and logs each
    child's metric on the parent at ``step = swept value`` when the values are integers (so MLflow's own chart
    shows the curve too).

    Args:
        parent_run_id: The sweep's parent run.
        swept_param: Param key that varies across children (dotted config key, e.g. ``data.num_negatives``).
        metrics: Metric keys to report.
        tracking_uri: Store URI (default: MLflow's current one).
        reduce: Which value of each child's metric: its ``last`` logged value, or its ``max`` / ``min`` over steps.
        artifact_path: Artifact folder on the parent.

    Returns:
        One row per child, sorted by the swept value: ``run_id``, ``run_name``, the param, then the metrics.
    """
    import pandas as pd
    from mlflow.entities import Metric

    if reduce not in ("last", "max", "min"):
        raise ValueError(f"reduce must be 'last', 'max' or 'min', got {reduce!r}")
    client = _client(tracking_uri)
    runs = child_runs(client, parent_run_id)
    if not runs:
        raise ValueError(f"run {parent_run_id} has no child runs (tag {PARENT_RUN_TAG}); nothing to summarize")
    key = sanitize_key(swept_param)  # the name log_config gave it
    rows = []
    for run in runs:
        row = {"run_id": run.info.run_id, "run_name": run.info.run_name, swept_param: run.data.params.get(key)}
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
    frame = frame.sort_values(swept_param, kind="stable").reset_index(drop=True)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        frame.to_csv(folder / "summary.csv", index=False)
        (folder / "summary.md").write_text(markdown_table(frame), encoding="utf-8")
        _plot_sweep(frame, swept_param, list(metrics), numeric, folder / "summary.png")
        client.log_artifacts(parent_run_id, str(folder), artifact_path)
    if numeric and frame[swept_param].dtype.kind == "i":
        # Every job of a sweep may refresh the summary: log only the points the parent does not hold yet.
        now = int(time.time() * 1000)
        points = []
        for m in metrics:
            have = {(h.step, h.value) for h in client.get_metric_history(parent_run_id, m)}
            points += [Metric(m, float(v), now, int(x)) for x, v in zip(frame[swept_param], frame[m])
                       if not math.isnan(v) and (int(x), float(v)) not in have]
        for start in range(0, len(points), 1000):
            client.log_batch(parent_run_id, metrics=points[start : start + 1000])
    client.set_tag(parent_run_id, "mmembed.sweep.param", swept_param)
    return frame


def _plot_sweep(frame: pd.DataFrame, param: str, metrics: list[str], numeric: bool, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = list(frame[param]) if numeric else list(range(len(frame)))
    for m in metrics:
        ax.plot(x, frame[m], marker="o", label=m)
    if not numeric:
        ax.set_xticks(x, [str(v) for v in frame[param]], rotation=30, ha="right")
    ax.set_xlabel(param)
    ax.set_ylabel("score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
