"""Hydra callback that gives a multirun sweep its MLflow parent run, named for what it sweeps, ended with its jobs.

Registered under ``hydra.callbacks`` in ``experiments/configs/run.yaml``. In the launching process,
``on_multirun_start`` expands the sweep overrides (to know the swept keys and how many jobs will run) and creates
the parent (:func:`mmembed.tracking.start_sweep`) before any job starts, so parallel jobs never race to create it.
After each job (in the job's process) ``on_job_end`` records the job's outcome on the parent and refreshes the
parent's summary, name and tags; the job that completes the count ends the parent FINISHED, or FAILED if any point
failed. ``on_multirun_end`` ends it too when the count was unknown. (Hydra's basic sweeper skips
``on_multirun_end`` when a job failed, which is why the count matters.) A parent whose launcher was killed stays
RUNNING until the next run marks it KILLED (:func:`mmembed.tracking.mark_stale_runs`).

Only the ``mmembed.tracking.make_mlflow_logger`` logger is handled; with ``logger=none`` this does nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mmembed.launch.settings import MlflowSettings
from mmembed.launch.settings import mlflow_settings as settings_of

log = logging.getLogger(__name__)


def mlflow_settings(config: DictConfig) -> MlflowSettings | None:
    """The sweep config's MLflow settings (:func:`mmembed.launch.settings.mlflow_settings`); None without MLflow."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        # Around the jobs (on_multirun_start/end) Hydra has no current config, yet the logger's paths interpolate
        # ${hydra:runtime.cwd}: resolve them against the sweep's own config.
        HydraConfig.instance().set_config(config)
    return settings_of(config)


def swept_overrides(config: DictConfig) -> tuple[dict[str, list[str]], int | None]:
    """``({key: values}, number of jobs)`` of the sweep overrides in ``config.hydra.overrides.task``.

    Globs over config groups (``+exp=glob(ablation_lora_r*)``) are expanded with Hydra's own override parser and
    config loader; the job count is None when it cannot be computed.
    """
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
    loader = GlobalHydra.instance().config_loader() if GlobalHydra.instance().is_initialized() else None
    parser = OverridesParser.create(config_loader=loader)
    swept: dict[str, list[str]] = {}
    jobs: int | None = 1
    for override in parser.parse_overrides(overrides):
        if not override.is_sweep_override():
            continue
        try:
            values = [str(v) for v in override.sweep_string_iterator()]
        except Exception:  # noqa: BLE001 -- e.g. an interval sweep (for optimisers): keys known, count unknown
            values, jobs = [], None
        swept[override.get_key_element()] = values
        if jobs is not None:
            jobs *= max(len(values), 1)
    return swept, jobs


def _sweep_parent(config: DictConfig) -> tuple[str, str] | None:
    """``(parent run id, tracking URI)`` of this sweep's MLflow parent (created on first use); None without MLflow."""
    from mmembed import tracking

    settings = mlflow_settings(config)
    if settings is None:
        return None
    parent = tracking.get_or_create_sweep_parent(sweep_dir=config.hydra.sweep.dir, **settings.kwargs())
    return parent, settings.uri


class MLflowSweepCallback(Callback):
    """See the module docstring. Summarises ``sweep.param`` (or the first swept key) on ``sweep.metrics``."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from mmembed.tracking import start_sweep

        try:
            settings = mlflow_settings(config)
            if settings is None:
                return
            swept, jobs = swept_overrides(config)
            start_sweep(sweep_dir=config.hydra.sweep.dir, swept=swept, num_jobs=jobs, **settings.kwargs())
        except Exception as e:  # noqa: BLE001 -- the jobs still create the parent themselves (timestamp name)
            log.warning("could not create the sweep's MLflow parent run up front: %s", e)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        from mmembed import tracking

        if config.hydra.mode != RunMode.MULTIRUN:
            return
        try:
            found = _sweep_parent(config)
            if found is None:
                return
            parent, uri = found
            param = tracking.resolve_swept_param(config.sweep.get("param"), tracking.swept_keys(parent, uri))
            value = OmegaConf.select(config, param, default=None)
            failed = job_return.status == JobStatus.FAILED
            # JobReturn.return_value re-raises a failed job's exception; the stored exception is what we report.
            exc = getattr(job_return, "_return_value", None)
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}" if failed else None
            tracking.record_sweep_job(
                parent, int(config.hydra.job.num), tracking.sweep_point_name(param, value, config.get("seed")),
                value, "FAILED" if failed else "COMPLETED", tracking_uri=uri, experiment=config.get("exp_name"),
                run_id=_job_run_id(config), error=error)
            tracking.update_sweep_parent(parent, param, list(config.sweep.metrics), tracking_uri=uri)
        except Exception as e:  # noqa: BLE001 -- bookkeeping must never turn a finished job into a failed sweep
            log.warning("could not update the sweep's MLflow parent run: %s", e)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from mmembed import tracking

        try:
            found = _sweep_parent(config)
            if found is None:
                return
            parent, uri = found
            # The jobs' configs (e.g. an exp file's sweep.param) decided the param; the parent remembers it.
            param = tracking.swept_param_of(parent, uri) or tracking.resolve_swept_param(
                config.sweep.get("param"), tracking.swept_keys(parent, uri))
            tracking.update_sweep_parent(parent, param, list(config.sweep.metrics), tracking_uri=uri, final=True)
        except Exception as e:  # noqa: BLE001 -- the jobs' own results are in; only the parent's summary is missing
            log.warning("could not close the sweep's MLflow parent run: %s", e)


def _job_run_id(config: DictConfig) -> str | None:
    from pathlib import Path

    marker = Path(config.hydra.runtime.output_dir) / ".mlflow_run_id"
    return marker.read_text().strip() if marker.is_file() else None
