"""The MLflow store: where it is (an embedded sqlite file by default), creating it once, its experiments, and the
tag and key names every run of the kit uses.

Layout under ``output_dir`` with the defaults::

    mlflow.db                     the tracking store (sqlite; MLflow 3 refuses a plain file store)
    mlartifacts/{experiment}/...  the artifacts of every run of the experiment
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
# on pipeline parents: where the embedder chain's warm-up and the reranker start (mmembed.launch.summary.start_tags)
PIPELINE_START_TAG, RERANKER_INIT_TAG = "mmembed.pipeline.start", "mmembed.pipeline.reranker_init"
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
PIPELINE_TAG = "mmembed.pipeline"
STAGE_TAG = "mmembed.stage"
STAGE_REUSED_TAG = "mmembed.stage.reused"  # on a pipeline child standing for a stage reused, not rebuilt


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


def sanitize_key(key: str) -> str:
    """An MLflow-valid param / metric key: allowed characters only, no empty or ``..`` path parts, <= 250 chars."""
    key = re.sub(r"[^/\w.\- :]", "_", key)
    parts = [p if p not in ("", ".", "..") else "_" for p in key.strip("/").split("/")]
    return "/".join(parts)[:MAX_KEY_LENGTH] or "_"


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")
