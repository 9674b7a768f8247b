"""What every mmembed LightningModule shares: the backbone, optimiser/scheduler wiring, the Embedder view."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from mmembed.backbone.inputs import InputBuilder
from mmembed.backbone.model import VTCBackbone


class BackboneModule(L.LightningModule):
    """Base class: holds a ``VTCBackbone`` and builds optimiser + per-step LR schedule from partials.

    Args:
        backbone: the shared VTC backbone (``mmembed.backbone.build_backbone``).
        optimizer: ``functools.partial`` of a torch optimiser taking ``params`` (Hydra ``_partial_: true``).
        scheduler: optional partial taking ``optimizer`` and ``num_training_steps`` (e.g.
            ``transformers.get_cosine_schedule_with_warmup`` with ``num_warmup_steps`` bound); stepped per step.

    Preprocessing (processor, templates, tiling) is the backbone's ``input_builder``: the module never builds one.
    """

    def __init__(self, backbone: VTCBackbone, optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 scheduler: Callable[..., Any] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.skip_counts: Counter[str] = Counter()

    def log_skips(self, batch: dict[str, Any], batch_size: int) -> None:
        """Accumulate the skipped-sample counts a batch carries from its loader worker; log running totals as
        ``train/skipped/<reason>``."""
        for reason, n in (batch.get("skipped") or {}).items():
            self.skip_counts[reason] += int(n)
        for reason, n in self.skip_counts.items():
            self.log(f"train/skipped/{reason}", float(n), batch_size=batch_size)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        params = self.trainable_parameters()
        if not params:
            raise ValueError("the backbone has no trainable parameter; set finetune.mode to lora, qlora or full")
        factory = self.optimizer_factory or (lambda params: torch.optim.AdamW(params, lr=2e-4))
        opt = factory(params)
        if self.scheduler_factory is None:
            return opt
        sched = self.scheduler_factory(opt, num_training_steps=max(1, int(self.trainer.estimated_stepping_batches)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @property
    def input_builder(self) -> InputBuilder:
        """The backbone's input builder (the one the DataModule's collate uses too)."""
        return self.backbone.input_builder

    def embedder(self):
        """An ``Embedder`` sharing this module's (training) backbone, for evaluation callbacks and export."""
        from mmembed.embedder import Embedder

        return Embedder(self.backbone)
