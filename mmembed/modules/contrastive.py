"""Stages 2-3: contrastive training with InfoNCE over gathered in-batch + hard negatives (paper §3.1, §3.3)."""

from __future__ import annotations

import time
from typing import Any

import torch

from mmembed.losses.gradcache import gradcache_step
from mmembed.losses.infonce import InfoNCELoss
from mmembed.modules.base import BackboneModule


class ContrastiveModule(BackboneModule):
    """InfoNCE on (query, positive, hard negatives) batches from ``ContrastiveDataModule``.

    Batch layout: ``query`` and ``candidate`` model inputs (candidates = B positives then B*n negatives, query-major),
    ``num_negatives`` n, optional ``pos_ids``/``neg_ids`` (duplicate masking) and ``skipped`` counts.

    Args:
        backbone, optimizer, scheduler: see ``BackboneModule``.
        loss: the InfoNCE settings (temperature 0.03, gather across devices, duplicate masking, optional Matryoshka
            dimensions; see ``InfoNCELoss``).
        gradcache_chunk_size: items per chunk for gradient caching (None = off). Switches to manual optimisation;
            gradient clipping then uses ``gradient_clip_val`` given here instead of the Trainer's.
        gradient_clip_val: clipping used in GradCache mode.
    """

    def __init__(self, backbone, loss: InfoNCELoss | None = None, optimizer=None, scheduler=None,
                 gradcache_chunk_size: int | None = None, gradient_clip_val: float | None = 1.0) -> None:
        super().__init__(backbone, optimizer, scheduler)
        self.save_hyperparameters(ignore=["backbone", "loss", "optimizer", "scheduler"])
        self.loss = loss or InfoNCELoss()
        self.gradcache_chunk_size = gradcache_chunk_size
        self.gradient_clip_val = gradient_clip_val
        self.automatic_optimization = gradcache_chunk_size is None
        self._last_batch_end: float | None = None

    def _split(self, q: torch.Tensor, c: torch.Tensor, batch: dict[str, Any]):
        b, n = q.shape[0], int(batch.get("num_negatives", 0))
        if c.shape[0] != b * (n + 1):
            raise ValueError(f"candidate rows {c.shape[0]} != B*(1+n) = {b}*(1+{n}); check the collate layout")
        negs = c[b:].view(b, n, -1) if n else None
        neg_ids = batch.get("neg_ids")
        if neg_ids is not None and n:
            neg_ids = [list(neg_ids[i * n : (i + 1) * n]) for i in range(b)]
        else:
            neg_ids = None
        return self.loss(q, c[:b], negs, pos_ids=batch.get("pos_ids"), neg_ids=neg_ids)

    def forward(self, batch: dict[str, Any]):
        """Loss output (``InfoNCEOutput``) for one batch."""
        q = self.backbone.embed(**batch["query"])
        c = self.backbone.embed(**batch["candidate"])
        return self._split(q, c, batch)

    def _log_step(self, out, batch: dict[str, Any], stage: str) -> None:
        bs = int(batch["query"]["input_ids"].shape[0])
        self.log(f"{stage}/loss", out.loss.detach(), prog_bar=True, batch_size=bs, sync_dist=stage != "train")
        self.log(f"{stage}/inbatch_acc", out.accuracy, batch_size=bs, sync_dist=stage != "train")
        for dim, part in out.matryoshka_losses.items():  # Matryoshka training: each truncated dimension's InfoNCE
            self.log(f"{stage}/loss_dim{dim}", part.detach(), batch_size=bs, sync_dist=stage != "train")
        if stage == "train":
            self.log("train/num_negatives", float(out.num_negatives), batch_size=bs)
            self.log("train/hard_negatives_per_query", float(batch.get("num_negatives", 0)), batch_size=bs)
            self.log_skips(batch, bs)

    def training_step(self, batch: dict[str, Any], batch_idx: int):
        if self.automatic_optimization:
            out = self(batch)
            self._log_step(out, batch, "train")
            return out.loss
        opt = self.optimizers()
        opt.zero_grad()
        holder: dict[str, Any] = {}

        def loss_fn(q, c):
            holder["out"] = self._split(q, c, batch)
            return holder["out"].loss

        gradcache_step(lambda chunk: self.backbone.embed(**chunk), [batch["query"], batch["candidate"]], loss_fn,
                       chunk_size=self.gradcache_chunk_size, backward_fn=self.manual_backward,
                       no_sync=getattr(self.trainer.strategy, "block_backward_sync", None))
        if self.gradient_clip_val:
            self.clip_gradients(opt, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
        opt.step()
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        self._log_step(holder["out"], batch, "train")
        return holder["out"].loss.detach()

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        # Samples/s between consecutive batch ends: includes data loading and the optimiser step, i.e. what a user
        # waits for (the first batch of a fit has no previous end and is not reported).
        now = time.perf_counter()
        if self._last_batch_end is not None:
            bs = int(batch["query"]["input_ids"].shape[0])
            self.log("train/samples_per_s", bs / max(now - self._last_batch_end, 1e-9), batch_size=bs)
        self._last_batch_end = now

    def on_train_epoch_start(self) -> None:
        self._last_batch_end = None  # do not count the epoch boundary (evaluation, loader start-up)

    def validation_step(self, batch: dict[str, Any], batch_idx: int):
        out = self(batch)
        self._log_step(out, batch, "val")
        return out.loss
