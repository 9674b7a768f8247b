"""Moved to :mod:`mmembed.launch.sweep` (the Hydra sweep callback is launcher logic, not a Lightning callback); this
name keeps configs and scripts that target ``mmembed.callbacks.sweep.MLflowSweepCallback`` working."""

from mmembed.launch.sweep import MLflowSweepCallback, mlflow_settings, swept_overrides

__all__ = ["MLflowSweepCallback", "mlflow_settings", "swept_overrides"]
