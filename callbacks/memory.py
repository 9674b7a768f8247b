"""Peak memory of a training run, logged with its metrics (Table 9 compares it across compression factors)."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from mmembed.memory import read_peak, reset_peak


class PeakMemory(L.Callback):
    """Logs ``peak_memory/gib`` (peak over the fit) and ``peak_memory/fit_gib`` (the peak minus the memory in use
    when the fit started) once training ends (evaluations run by other callbacks during the fit included).

    On CUDA the allocator's peak (``torch.cuda.max_memory_allocated``); on CPU the kernel's peak resident set of the
    process (``VmHWM``, restarted at fit start, so jobs of one ``-m`` sweep do not inherit each other's peaks).
    Lightning has no callback for this: its ``DeviceStatsMonitor`` logs current, not peak, memory.
    """

    def __init__(self) -> None:
        self.baseline: int | None = None
        self.peak: int | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        try:
            self.baseline = reset_peak(pl_module.device)
        except OSError as e:  # /proc read-only or not Linux: say so once, log nothing rather than a wrong number
            rank_zero_info(f"[memory] peak memory not measured: {e}")
            self.baseline = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.baseline is None:
            return
        self.peak = read_peak(pl_module.device)
        metrics: dict[str, Any] = {"peak_memory/gib": self.peak / 2**30,
                                   "peak_memory/fit_gib": (self.peak - self.baseline) / 2**30}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(f"[memory] peak {metrics['peak_memory/gib']:.2f} GiB "
                       f"({metrics['peak_memory/fit_gib']:.2f} GiB above the start of the fit)")
