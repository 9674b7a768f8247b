"""Peak memory of a fit (mmembed.memory, callbacks.memory.PeakMemory)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from mmembed.callbacks.memory import PeakMemory

from mmembed.memory import read_peak, reset_peak

MIB = 2**20


class _Recorder(L.pytorch.loggers.logger.DummyLogger):
    def __init__(self) -> None:
        super().__init__()
        self.logged: dict[str, float] = {}

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.update(metrics)


class _Allocating(BoringModel):
    """Touches ``mib`` MiB in one training step, then frees it."""

    def __init__(self, mib: int) -> None:
        super().__init__()
        self.mib = mib

    def training_step(self, batch, batch_idx):
        if batch_idx == 0:
            block = torch.ones(self.mib * MIB // 4, dtype=torch.float32)
            assert float(block[-1]) == 1.0
            del block
        return super().training_step(batch, batch_idx)


def _fit(mib: int) -> dict[str, float]:
    logger = _Recorder()
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=logger, callbacks=[PeakMemory()],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(_Allocating(mib))
    return logger.logged


def test_peak_memory_sees_a_freed_allocation_and_restarts_per_fit():
    big = _fit(256)
    assert big["peak_memory/fit_gib"] * 1024 >= 250  # the 256 MiB block, freed before the fit ended
    assert big["peak_memory/gib"] >= big["peak_memory/fit_gib"]
    small = _fit(8)  # same process: the counter restarts at fit start, so the earlier 256 MiB is not inherited
    assert small["peak_memory/fit_gib"] * 1024 < 128


def test_reset_and_read_on_cpu():
    base = reset_peak("cpu")
    block = torch.ones(64 * MIB // 4)
    peak = read_peak("cpu")
    del block
    assert peak - base >= 60 * MIB


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reset_and_read_on_cuda():
    base = reset_peak("cuda")
    block = torch.ones(64 * MIB // 4, device="cuda")
    del block
    assert read_peak("cuda") - base >= 64 * MIB
