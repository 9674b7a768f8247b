"""MLflow for the kit: an embedded sqlite store by default, the composed config as params, parent/child sweep runs.

Every MLflow call of the kit lives in this package (the callbacks and ``mmembed.launch`` call these functions):

* :mod:`~mmembed.tracking.store` -- where the store is, creating and migrating a new sqlite store once under a file
  lock (:func:`ensure_store`) so runs started together do not race on its schema; experiments marked as model
  training (:data:`EXPERIMENT_KIND_TAG`, so the MLflow 3 UI opens them on their runs table); the tag names;
* :mod:`~mmembed.tracking.liveness` -- runs carry their host and process (:func:`process_tags`); a RUNNING run whose
  process is gone is marked KILLED when the next run starts (:func:`mark_stale_runs`);
* :mod:`~mmembed.tracking.runs` -- the Lightning logger (:func:`make_mlflow_logger`), the config as params
  (:func:`log_config`), a tool's summary as its own run (:func:`log_summary`);
* :mod:`~mmembed.tracking.sweeps` -- a ``-m`` sweep's parent run, its jobs' outcomes and its summary (statistics,
  tables and plot from ``mmembed.report``);
* :mod:`~mmembed.tracking.pipelines` -- the parent run of ``task=pipeline`` and its step table.

Browse a store with ``mlflow ui --backend-store-uri sqlite:///<output_dir>/mlflow.db --workers 1``. Names are
re-exported here, so ``from mmembed.tracking import X`` works for all of them.
"""

from mmembed.report.markdown import markdown_table
from mmembed.tracking.liveness import command_line, mark_stale_runs, process_alive, process_tags, reopen_run
from mmembed.tracking.pipelines import log_pipeline_summary, log_reused_stage, start_pipeline_run
from mmembed.tracking.runs import (
    config_params,
    end_run,
    flatten_config,
    log_artifacts,
    log_config,
    log_params,
    log_summary,
    make_mlflow_logger,
    summary_metrics,
)
from mmembed.tracking.store import (
    ARTIFACT_DIRNAME,
    COMMAND_TAG,
    DB_NAME,
    END_REASON_TAG,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    EXPERIMENT_TAG,
    GIT_COMMIT_TAG,
    HOST_TAG,
    MAX_KEY_LENGTH,
    MAX_PARAM_LENGTH,
    PARENT_RUN_TAG,
    PID_START_TAG,
    PID_TAG,
    PIPELINE_START_TAG,
    PIPELINE_TAG,
    RERANKER_INIT_TAG,
    RESUME_CHANGED_TAG,
    RESUMED_TAG,
    RUN_NAME_TAG,
    SEED_TAG,
    STAGE_REUSED_TAG,
    STAGE_TAG,
    SWEEP_BEST_TAG,
    SWEEP_DIR_TAG,
    SWEEP_FAILED_TAG,
    SWEEP_JOB_TAG,
    SWEEP_JOBS_TAG,
    SWEEP_KEYS_TAG,
    SWEEP_PARAM_TAG,
    SWEEP_PARENT_TAG,
    SWEEP_POINT_TAG,
    SWEEP_VALUES_TAG,
    check_server,
    default_artifact_location,
    default_tracking_uri,
    ensure_store,
    get_or_create_experiment,
    git_commit,
    is_local_store,
    sanitize_key,
)
from mmembed.tracking.sweeps import (
    child_runs,
    get_or_create_sweep_parent,
    record_sweep_job,
    resolve_swept_param,
    start_sweep,
    summarize_sweep,
    sweep_jobs,
    sweep_name,
    sweep_point_name,
    swept_keys,
    swept_param_of,
    update_sweep_parent,
)

__all__ = [
    "ARTIFACT_DIRNAME",
    "COMMAND_TAG",
    "command_line", "DB_NAME", "END_REASON_TAG", "EXPERIMENT_KIND", "EXPERIMENT_KIND_TAG", "EXPERIMENT_TAG",
    "GIT_COMMIT_TAG", "HOST_TAG", "MAX_KEY_LENGTH", "MAX_PARAM_LENGTH", "PARENT_RUN_TAG", "PID_START_TAG", "PID_TAG",
    "PIPELINE_TAG", "PIPELINE_START_TAG", "RERANKER_INIT_TAG", "RESUMED_TAG", "RESUME_CHANGED_TAG", "RUN_NAME_TAG",
    "SEED_TAG", "STAGE_REUSED_TAG", "STAGE_TAG",
    "SWEEP_BEST_TAG", "SWEEP_DIR_TAG", "SWEEP_FAILED_TAG", "SWEEP_JOBS_TAG", "SWEEP_JOB_TAG", "SWEEP_KEYS_TAG",
    "SWEEP_PARAM_TAG", "SWEEP_PARENT_TAG", "SWEEP_POINT_TAG", "SWEEP_VALUES_TAG", "check_server", "child_runs",
    "config_params", "default_artifact_location", "default_tracking_uri", "end_run", "ensure_store", "flatten_config",
    "get_or_create_experiment", "get_or_create_sweep_parent", "git_commit", "is_local_store", "log_artifacts",
    "log_config", "log_params", "log_pipeline_summary", "log_reused_stage", "log_summary", "make_mlflow_logger",
    "mark_stale_runs", "markdown_table", "process_alive", "process_tags", "record_sweep_job", "reopen_run",
    "resolve_swept_param", "sanitize_key", "start_pipeline_run", "start_sweep", "summarize_sweep", "summary_metrics",
    "sweep_jobs", "sweep_name", "sweep_point_name", "swept_keys", "swept_param_of", "update_sweep_parent",
]
