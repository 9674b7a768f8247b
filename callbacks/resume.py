"""Exact resume: every RNG and the MLflow run travel in the Lightning checkpoint.

Lightning checkpoints hold the weights, optimizer, schedulers and loop progress, and (through the loaders'
``state_dict``) the data-stream position (see ``mmembed.datamodules.common.RankLoader``), but not the random number
generators: with dropout on (e.g. LoRA dropout) a resumed run draws other masks than the uninterrupted run and
its losses and scores drift. :class:`ResumeState` saves the python, numpy, torch and CUDA generator states in the
checkpoint and puts them back just before the first training step after the resume, which is where the
uninterrupted run stood when the checkpoint was written (``ModelCheckpoint`` runs after every other callback, so
nothing draws between the capture and the next step). DataLoader worker seeds need no entry: ``RankLoader`` derives
them from ``(seed, rank, epoch)``.

It also records the run id of every ``MLFlowLogger`` of the trainer, so the launcher (``mmembed.launch.tasks``) can
continue the same MLflow run when it resumes from the checkpoint (:func:`saved_mlflow_run_id`).
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

STATE_KEY = "ResumeState"


def capture_rng_state() -> dict[str, Any]:
    """The state of the python, numpy, torch (CPU) and CUDA (every device, when present) generators.

    Lightning has a private helper for this (``lightning.fabric.utilities.seed._collect_rng_states``); a private
    function may change between releases, and these few public calls are all it does.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    # Plain containers and tensors only: the checkpoint must load with torch's safe (weights-only) loader.
    state: dict[str, Any] = {"python": random.getstate(),
                             "numpy": [str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                                       float(cached)],
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng_state` returned (a missing CUDA entry leaves CUDA as it is)."""
    random.setstate(_as_python_state(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu() if isinstance(state["torch"], torch.Tensor) else state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _as_python_state(value: Any) -> tuple:
    # random.getstate() is a nested tuple; a checkpoint round trip may hand back lists.
    version, internal, gauss = value
    return int(version), tuple(int(v) for v in internal), gauss


class ResumeState(L.Callback):
    """Save every RNG state and the MLflow run ids in checkpoints; restore the RNGs right before the next step.

    Add it next to ``ModelCheckpoint`` (``experiments/configs/callbacks/default.yaml`` does). Under DDP each rank
    captures its own generators, but Lightning writes rank 0's checkpoint; ranks other than 0 then resume with rank
    0's states, which keeps them reproducible but not equal to their own uninterrupted streams.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self.mlflow_run_ids: list[str] = []

    @property
    def state_key(self) -> str:
        return STATE_KEY  # one instance per trainer; a stable key lets the launcher find it in the checkpoint

    def state_dict(self) -> dict[str, Any]:
        from lightning.pytorch.loggers import MLFlowLogger

        trainer = getattr(self, "_trainer", None)
        if trainer is not None:
            self.mlflow_run_ids = [lg.run_id for lg in trainer.loggers if isinstance(lg, MLFlowLogger) and lg.run_id]
        return {"rng": capture_rng_state(), "mlflow_run_ids": list(self.mlflow_run_ids)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")
        self.mlflow_run_ids = list(state_dict.get("mlflow_run_ids", []))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._pending is not None:
            restore_rng_state(self._pending)
            self._pending = None


def saved_mlflow_run_id(ckpt_path: str | Path) -> str | None:
    """The MLflow run id a :class:`ResumeState` recorded in the checkpoint, or None.

    Reads the checkpoint with torch's safe loader, memory-mapped, so a large checkpoint is not read twice.
    """
    try:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 -- Lightning loads (and judges) the checkpoint itself right after
        warnings.warn(f"could not read the MLflow run id from {ckpt_path} ({type(e).__name__}); a new run is opened",
                      stacklevel=2)
        return None
    ids = (state.get("callbacks", {}).get(STATE_KEY) or {}).get("mlflow_run_ids") or []
    return ids[0] if ids else None
