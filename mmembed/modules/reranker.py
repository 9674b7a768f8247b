"""The reranker (paper §3.4): joint pointwise (eq. 5) and listwise (eq. 6) training of the generative backbone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mmembed.backbone.rerank_inputs import RerankInputBuilder
from mmembed.losses.reranker import listwise_rerank_loss, pointwise_rerank_loss
from mmembed.modules.base import BackboneModule


@dataclass
class RerankOutput:
    """Losses and accuracies of one reranker batch (a part absent from the batch is ``None``)."""

    loss: Tensor
    point_loss: Tensor | None = None
    list_loss: Tensor | None = None
    point_acc: Tensor | None = None
    list_acc: Tensor | None = None


class RerankerModule(BackboneModule):
    """``loss = point_weight * L_point + list_weight * L_list`` on ``RerankerDataModule`` batches.

    The answer logits are the backbone's generative output at each prompt's last token
    (:meth:`mmembed.backbone.VTCBackbone.answer_logits`). Pointwise: cross-entropy of Yes for ``(q, c+)`` and No for
    ``(q, c-)``, summed over the two pairs of a query and averaged over queries (eq. 5 as written). Listwise:
    cross-entropy of the positive's index token among "1".."M+1" (eq. 6). Initialise the backbone from the stage-1
    model (``backbone.name_or_path``); the paper trains at lr 4e-5 for 2 epochs with both weights 1.

    Args:
        backbone, optimizer, scheduler: see ``BackboneModule``.
        point_weight: Weight of the pointwise loss.
        list_weight: Weight of the listwise loss.
        full_vocab: Cross-entropy over the whole vocabulary instead of over the answer tokens only (see
            ``mmembed.losses.reranker``).
    """

    def __init__(self, backbone, optimizer=None, scheduler=None, point_weight: float = 1.0, list_weight: float = 1.0,
                 full_vocab: bool = False) -> None:
        super().__init__(backbone, optimizer, scheduler)
        self.save_hyperparameters(ignore=["backbone", "optimizer", "scheduler"])
        if point_weight < 0 or list_weight < 0 or point_weight + list_weight == 0:
            raise ValueError(f"point_weight and list_weight must be >= 0, not both 0 (got {point_weight}, "
                             f"{list_weight})")
        self.point_weight, self.list_weight = point_weight, list_weight
        self.full_vocab = full_vocab
        self._rerank_inputs: RerankInputBuilder | None = None

    @property
    def rerank_inputs(self) -> RerankInputBuilder:
        if self._rerank_inputs is None:
            self._rerank_inputs = RerankInputBuilder(self.input_builder)
        return self._rerank_inputs

    def forward(self, batch: dict[str, Any]) -> RerankOutput:
        ri = self.rerank_inputs
        total = None
        out = RerankOutput(loss=torch.zeros((), device=self.device))
        if "point" in batch:
            logits = self.backbone.answer_logits(**batch["point"])
            labels = batch["point_labels"]
            n_queries = max(1, labels.numel() // 2)
            out.point_loss = pointwise_rerank_loss(logits, labels, ri.yes_id, ri.no_id, full_vocab=self.full_vocab,
                                                   reduction="sum") / n_queries
            yes = logits[:, ri.yes_id] > logits[:, ri.no_id]
            out.point_acc = (yes == labels.bool()).float().mean()
            total = self.point_weight * out.point_loss
        if "list" in batch:
            logits = self.backbone.answer_logits(**batch["list"])
            target, size = batch["list_target"], batch["list_size"]
            ids = ri.index_ids[: int(size.max())]
            out.list_loss = listwise_rerank_loss(logits, target, ids, num_candidates=size, full_vocab=self.full_vocab)
            restricted = logits[:, ids].masked_fill(
                torch.arange(len(ids), device=logits.device)[None] >= size[:, None], float("-inf"))
            out.list_acc = (restricted.argmax(-1) == target).float().mean()
            total = self.list_weight * out.list_loss if total is None else total + self.list_weight * out.list_loss
        if total is None:
            raise ValueError("the batch holds neither 'point' nor 'list' inputs; is this a RerankerDataModule batch?")
        out.loss = total
        return out

    def _log(self, out: RerankOutput, batch: dict[str, Any], stage: str) -> None:
        bs = len(batch.get("ids") or []) or 1
        sync = stage != "train"
        self.log(f"{stage}/loss", out.loss.detach(), prog_bar=True, batch_size=bs, sync_dist=sync)
        for name in ("point_loss", "list_loss", "point_acc", "list_acc"):
            value = getattr(out, name)
            if value is not None:
                self.log(f"{stage}/{name}", value.detach(), prog_bar=name.endswith("acc"), batch_size=bs,
                         sync_dist=sync)
        if stage == "train":
            self.log_skips(batch, bs)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        out = self(batch)
        self._log(out, batch, "train")
        return out.loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        out = self(batch)
        self._log(out, batch, "val")
        return out.loss

    def reranker(self, mode: str = "pointwise", batch_size: int = 8):
        """A ``mmembed.Reranker`` sharing this module's (training) backbone, for evaluation callbacks and export."""
        from mmembed.reranker import Reranker

        return Reranker(self.backbone, self.input_builder, mode=mode, batch_size=batch_size)
