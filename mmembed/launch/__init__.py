"""The launcher's logic as library code over a composed Hydra config (``experiments/run.py`` is its entry point).

Rooms, in import order (each imports only those above it):

* :mod:`~mmembed.launch.settings` -- the ``mining:`` / ``judge:`` config groups as dataclasses; the MLflow settings
  of a config (the one place they are derived);
* :mod:`~mmembed.launch.config` -- checks of a composed config that change nothing (:func:`validate`);
* :mod:`~mmembed.launch.tasks` -- fit (train), mine, curate (judge), evaluate;
* :mod:`~mmembed.launch.stages` -- the paper's stage graph as one explicit table over those tasks;
* :mod:`~mmembed.launch.summary` -- ``task=pipeline`` and its Table-7-shaped summary;
* :mod:`~mmembed.launch.runner` -- resolve a task's missing inputs, dispatch, one-line errors (:func:`main`);
* :mod:`~mmembed.launch.sweep` -- the Hydra callback that gives a ``-m`` sweep its MLflow parent run.

Hydra is imported here and nowhere else in ``mmembed/`` (the rest of the library takes plain arguments).
"""

from mmembed.launch.config import TASKS, ConfigError, validate
from mmembed.launch.runner import main, resolve_inputs, run_task

__all__ = ["TASKS", "ConfigError", "main", "resolve_inputs", "run_task", "validate"]
