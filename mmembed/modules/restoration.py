"""Stage 1: generative restoration of the compressed model with next-token prediction (paper §3.3, eq. 4)."""

from __future__ import annotations

from typing import Any

from mmembed.modules.base import BackboneModule


class RestorationModule(BackboneModule):
    """Next-token loss on instruction data (``InstructionDataModule`` batches: input_ids, attention_mask,
    pixel_values, labels with -100 on prompt, padding and image tokens).

    The loss is the stock transformers causal-LM loss (shifted cross-entropy over unmasked labels), computed by
    the model when ``labels`` are passed; the paper trains all parameters here (``finetune.mode: full``).
    """

    def __init__(self, backbone, optimizer=None, scheduler=None) -> None:
        super().__init__(backbone, optimizer, scheduler)
        self.save_hyperparameters(ignore=["backbone", "optimizer", "scheduler"])

    def _loss(self, batch: dict[str, Any]):
        # position_ids: packed batches restart positions per conversation and carry no attention mask; the stock
        # model then builds a block-diagonal causal mask, so conversations never attend to each other.
        keys = ("input_ids", "attention_mask", "position_ids", "pixel_values", "labels")
        inputs = {k: v for k, v in batch.items() if k in keys}
        return self.backbone(**inputs).loss

    def training_step(self, batch: dict[str, Any], batch_idx: int):
        loss = self._loss(batch)
        n_tokens = int((batch["labels"] != -100).sum())
        self.log("train/loss", loss, prog_bar=True, batch_size=int(batch["input_ids"].shape[0]))
        self.log("train/target_tokens", float(n_tokens), batch_size=int(batch["input_ids"].shape[0]))
        self.log_skips(batch, int(batch["input_ids"].shape[0]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int):
        loss = self._loss(batch)
        self.log("val/loss", loss, sync_dist=True, batch_size=int(batch["input_ids"].shape[0]))
        return loss
