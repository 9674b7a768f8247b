"""MLflow helpers: an embedded sqlite store by default, the composed config as params, parent/child sweep runs.

Layout under ``output_dir`` with the defaults::

    mlflow.db                     the tracking store (sqlite; MLflow 3 refuses a plain file store)
    mlartifacts/{experiment}/...  the artifacts of every run of the experiment

Browse it with ``mlflow ui --backend-store-uri sqlite:///<output_dir>/mlflow.db --workers 1``. The first use of a new
``mlflow.db`` creates its schema, which takes a few seconds.

Every MLflow call of the kit lives here (the callbacks and ``experiments/run.py`` call these functions):

* stores: a new sqlite store is created and migrated once, under a file lock (:func:`ensure_store`), so runs started
  together (a parallel sweep) do not race on the schema;
* experiments are marked as model-training experiments (:data:`EXPERIMENT_KIND_TAG`), so the MLflow 3 UI opens them
  on their runs table rather than on the GenAI overview;
* runs carry their host and process (:func:`process_tags`); a RUNNING run whose process is gone is marked KILLED
  when the next run starts (:func:`mark_stale_runs`), and a resumed run reopens its own run (``run_id``);
* sweeps: every job of a Hydra multirun (``-m``) becomes a child run (tag ``mlflow.parentRunId``) of one parent run
  keyed by the sweep folder (:func:`get_or_create_sweep_parent`, :func:`start_sweep`); each job's outcome is
  recorded on the parent (:func:`record_sweep_job`), :func:`summarize_sweep` tabulates and plots the swept value
  against the main metrics as artifacts of the parent, and :func:`update_sweep_parent` names the parent for what it
  sweeps and ends it FINISHED, or FAILED when a point failed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
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
SEED_TAG = "mmembed.seed"  # on pipeline parents: the seed every stage of that pipeline ran with
# The MLflow 3 UI reads the experiment kind from this tag; without it, it may infer a GenAI experiment and open on the
# (empty) traces overview. "custom_model_development" is the kind its runs-table view is for.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
HOST_TAG = "mmembed.host"
PID_TAG = "mmembed.pid"
COMMAND_TAG = "mmembed.command"  # the command line that started the run (mmembed-report lists it)
PID_START_TAG = "mmembed.pid_start"  # the process start time (/proc), so a reused pid is not taken for the run's
END_REASON_TAG = "mmembed.end_reason"
RESUMED_TAG = "mmembed.resumed"
RESUME_CHANGED_TAG = "mmembed.resumed.changed_params"
SWEEP_KEYS_TAG = "mmembed.sweep.keys"
SWEEP_JOBS_TAG = "mmembed.sweep.jobs"
SWEEP_PARAM_TAG = "mmembed.sweep.param"
SWEEP_VALUES_TAG = "mmembed.sweep.values"
SWEEP_FAILED_TAG = "mmembed.sweep.failed"
SWEEP_BEST_TAG = "mmembed.sweep.best"
SWEEP_JOB_TAG = "mmembed.sweep.job."  # + job number: the job's outcome as JSON, on the parent
SWEEP_POINT_TAG = "mmembed.sweep.point"  # on a child: its point's name
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


_READY_STORES: set[str] = set()


def ensure_store(tracking_uri: str | None) -> None:
    """Create and migrate a sqlite store once, under a file lock next to it (other stores: nothing to do).

    MLflow creates the schema of a new sqlite file on first use, in several migration steps. Two processes doing
    that at once (the jobs of a parallel sweep on a fresh store) race: one fails (``table _alembic_tmp_experiments
    already exists``) and its run is lost. Under ``<db>.lock`` the first process builds the schema and the others
    find it done.
    """
    if not tracking_uri or not tracking_uri.startswith("sqlite:///") or tracking_uri in _READY_STORES:
        return
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    db = Path(tracking_uri[len("sqlite:///"):].split("?", 1)[0])
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{db}.lock", timeout=600):
        MlflowClient(tracking_uri).search_experiments(max_results=1)  # creates / migrates the schema
    _READY_STORES.add(tracking_uri)


def check_server(tracking_uri: str, timeout: float = 3.0) -> None:
    """Fail fast when an ``http(s)://`` tracking server does not accept connections (MLflow itself retries for
    minutes before giving up). Other stores (sqlite, files) are not checked.

    Raises:
        ConnectionError: One line naming the URI and how to start a server or use the embedded store.
    """
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https"):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "localhost", port), timeout=timeout):
            pass
    except OSError as exn:
        raise ConnectionError(
            f"MLflow server {tracking_uri} is not reachable ({exn.strerror or exn}); start it with `mlflow server "
            f"--host {parts.hostname} --port {port} --backend-store-uri sqlite:///logs/mlflow.db`, or use "
            "logger=mlflow (embedded sqlite store)") from None


def _client(tracking_uri: str | None) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    ensure_store(tracking_uri)
    return MlflowClient(tracking_uri)


def get_or_create_experiment(client: MlflowClient, name: str, artifact_location: str | None = None) -> str:
    """Id of the experiment called ``name``, created (or restored from the bin) if needed, marked as a model-training
    experiment (:data:`EXPERIMENT_KIND_TAG`) unless it already has a kind."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            exp_id = client.create_experiment(name, artifact_location=artifact_location,
                                              tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # another process created it between our lookup and the create
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
        else:
            return exp_id
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


# ---------------------------------------------------------------------------------------------------- processes
def _proc_stat(pid: int) -> tuple[str, str] | None:
    """``(state, start time)`` of a process from ``/proc/<pid>/stat`` (Linux); None when unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[-1].split()  # the command name (field 2) may hold spaces and parentheses
    return (fields[0], fields[19]) if len(fields) > 19 else None


def command_line() -> str:
    """This process's command line as it can be typed again (``python experiments/run.py +exp=x seed=0``)."""
    argv = list(sys.argv)
    return shlex.join((["python"] if argv and argv[0].endswith(".py") else []) + argv)[:5000]


def process_tags() -> dict[str, str]:
    """Tags naming this process (host, pid, start time), by which :func:`mark_stale_runs` tells a dead run, and its
    command line (:data:`COMMAND_TAG`)."""
    stat = _proc_stat(os.getpid())
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), PID_START_TAG: stat[1] if stat else "",
            COMMAND_TAG: command_line()}


def process_alive(pid: int, start: str | None = None) -> bool:
    """Whether process ``pid`` of this host runs (and, when ``start`` is given, is the one started then)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, started = stat
    return state not in ("Z", "X") and (not start or started == start)


def mark_stale_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this host whose process is gone (e.g. killed with ``kill -9``).

    Runs recorded on other hosts are left alone: their processes cannot be checked from here.

    Returns:
        The ids of the runs marked.
    """
    host = socket.gethostname()
    runs = client.search_runs([experiment_id], max_results=1000,
                              filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{_quote(host)}'")
    marked = []
    for run in runs:
        pid = run.data.tags.get(PID_TAG, "")
        if not pid.isdigit() or process_alive(int(pid), run.data.tags.get(PID_START_TAG) or None):
            continue
        client.set_tag(run.info.run_id, END_REASON_TAG, f"process {pid} on {host} ended without closing the run")
        client.set_terminated(run.info.run_id, "KILLED")
        marked.append(run.info.run_id)
    return marked


def reopen_run(client: MlflowClient, run_id: str) -> None:
    """Continue ``run_id`` in this process (resume from a checkpoint): RUNNING again, this process's tags."""
    run = client.get_run(run_id)
    resumed = int(run.data.tags.get(RESUMED_TAG, "0") or 0) + 1
    client.update_run(run_id, status="RUNNING")
    for key, value in {**process_tags(), RESUMED_TAG: str(resumed)}.items():
        client.set_tag(run_id, key, value)


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
    parallel launcher, create it once before the jobs start (:func:`start_sweep`; ``experiments/run.py`` does so
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
            points = _point_table(frame[frame["status"].isin(_GOOD)], swept_param, list(metrics))
            client.log_table(parent_run_id, points, "sweep_summary/points.json")
        status = "FAILED" if failed else "FINISHED"
        client.set_terminated(parent_run_id, status)
    return status


_GOOD = ("FINISHED", "RUNNING")


def _failed_points(jobs: Sequence[Mapping[str, Any]], children: Sequence[Any]) -> list[str]:
    out = []
    for j in jobs:
        if j.get("status") == "FAILED":
            out.append(f"{j.get('point')} ({j['error']})" if j.get("error") else str(j.get("point")))
    recorded = {j.get("run_id") for j in jobs}
    out += [f"{c.info.run_name} ({c.info.status})" for c in children
            if c.info.status in ("FAILED", "KILLED") and c.info.run_id not in recorded]
    return out


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
    good = frame[frame["status"].isin(_GOOD)]
    points = _point_table(good, swept_param, list(metrics))
    best = _best_point(points, swept_param, list(metrics))
    failed = _failed_points(sweep_jobs(parent), runs)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        frame.to_csv(folder / "summary.csv", index=False)
        lines = [f"# Sweep over `{swept_param}`", "", markdown_table(_mean_std_table(points, swept_param,
                                                                                       list(metrics)))]
        if best is not None:
            lines.append(f"Best point: **{swept_param} = {best[0]}** ({best[1]} = {best[2]:.2f})\n")
        lines.append(f"Failed points: {'; '.join(failed) if failed else 'none'}\n")
        lines += ["## Runs", "", markdown_table(frame)]
        (folder / "summary.md").write_text("\n".join(lines), encoding="utf-8")
        _plot_sweep(points, swept_param, list(metrics), folder / "summary.png")
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


def _point_table(frame: pd.DataFrame, param: str, metrics: list[str]) -> pd.DataFrame:
    """Per swept value: ``runs`` (how many children) and each metric's mean and ``<metric> std`` (0 for one run)."""
    import pandas as pd

    rows = []
    for value, group in frame.groupby(param, sort=True):
        row: dict[str, Any] = {param: value, "runs": len(group)}
        for m in metrics:
            vals = group[m].dropna()
            row[m] = float(vals.mean()) if len(vals) else float("nan")
            row[f"{m} std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        rows.append(row)
    return pd.DataFrame(rows, columns=[param, "runs", *[c for m in metrics for c in (m, f"{m} std")]])


def _mean_std_table(points: pd.DataFrame, param: str, metrics: list[str]) -> pd.DataFrame:
    import pandas as pd

    out = {param: list(points[param]), "runs": list(points["runs"])}
    for m in metrics:
        out[m] = [("" if math.isnan(v) else f"{v:.2f}" + (f" ± {s:.2f}" if n > 1 else ""))
                  for v, s, n in zip(points[m], points[f"{m} std"], points["runs"])]
    return pd.DataFrame(out)


def _best_point(points: pd.DataFrame, param: str, metrics: list[str]) -> tuple[Any, str, float] | None:
    """``(value, metric, score)`` of the best point by the first metric that has values (lowest for losses)."""
    for m in metrics:
        vals = points[m]
        if len(vals) and not vals.isna().all():
            idx = vals.idxmin() if "loss" in m else vals.idxmax()
            return points.loc[idx, param], m, float(vals[idx])
    return None


def _plot_sweep(points: pd.DataFrame, param: str, metrics: list[str], path: Path) -> None:
    """One panel per metric (their scales differ: a loss and a percentage share no axis); the swept values as
    evenly spaced categories (ranks 8/16/32 and factors 1/2/4 are not linear quantities); mean ± std error bars
    when a point has several runs (seeds)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = [m for m in metrics if m in points and not points[m].isna().all()] or metrics[:1]
    fig = Figure(figsize=(0.6 + 3.0 * len(shown), 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    x = list(range(len(points)))
    labels = [str(v) for v in points[param]]
    repeated = bool(len(points)) and int(points["runs"].max()) > 1
    for ax, m in zip(axes, shown):
        yerr = list(points[f"{m} std"]) if repeated and f"{m} std" in points else None
        ax.errorbar(x, list(points[m]) if m in points else [], yerr=yerr, marker="o", capsize=4)
        ax.set_xticks(x, labels)
        ax.set_xlim(-0.5, max(len(x) - 0.5, 0.5))
        ax.set_title(m, fontsize=9)
        ax.set_xlabel(param.rsplit(".", 1)[-1])
        ax.grid(alpha=0.3)
    runs = f"mean \u00b1 std over up to {int(points['runs'].max())} runs per point" if repeated else "one run per point"
    fig.suptitle(f"{param} ({runs})", fontsize=10)
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------------------------------- pipelines
PIPELINE_TAG = "mmembed.pipeline"
STAGE_TAG = "mmembed.stage"
STAGE_REUSED_TAG = "mmembed.stage.reused"  # on a pipeline child standing for a stage reused, not rebuilt


def start_pipeline_run(experiment_name: str, run_name: str, tracking_uri: str | None = None,
                       output_dir: str | Path = "outputs", tags: Mapping[str, Any] | None = None) -> str:
    """Create the parent run of one pipeline execution (its stages become children); returns its id."""
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    uri = tracking_uri or default_tracking_uri(output_dir)
    client = _client(uri)
    location = default_artifact_location(output_dir, experiment_name) if is_local_store(uri) else None
    exp_id = get_or_create_experiment(client, experiment_name, location)
    run_tags = {PIPELINE_TAG: "true", MLFLOW_RUN_NAME: run_name, COMMAND_TAG: command_line(),
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
        _plot_steps(frame, list(metrics), folder / "summary.png")
        client.log_artifacts(parent_run_id, str(folder), artifact_path)
    if len(frame):
        last = frame.iloc[-1]
        for m in metrics:
            value = last.get(m)
            if value is not None and isinstance(value, int | float) and math.isfinite(value):
                client.log_metric(parent_run_id, sanitize_key(m), float(value))
    client.set_terminated(parent_run_id, status=status)


def _plot_steps(frame: pd.DataFrame, metrics: list[str], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(metrics))
    x = list(range(len(frame)))
    for j, m in enumerate(metrics):
        ax.bar([i + (j - (len(metrics) - 1) / 2) * width for i in x], frame[m], width, label=m)
    ax.set_xticks(x, [str(s) for s in frame["step"]], rotation=20, ha="right")
    ax.set_ylabel("score")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
