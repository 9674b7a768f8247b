"""Stage-1 evaluation callback: greedy-decoded exact match on held-out synthetic VQA, before and after training."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from mmembed.callbacks.eval import BenchmarkEvalCallback

from mmembed.eval.generative import heldout_vqa, vqa_exact_match


class VQAExactMatchCallback(L.Callback):
    """Logs ``val/vqa/exact_match`` (%) of :func:`mmembed.eval.generative.vqa_exact_match` at train start / end.

    Its ``history`` has the eval callbacks' shape (``{"when", "step", "epoch", "metrics"}``), so the run's
    before/after table shows it next to MMEB and VisDoc.

    Args:
        n: Held-out questions (drawn by :func:`mmembed.eval.generative.heldout_vqa`).
        seed: World seed of the held-out questions.
        eval_at_start: Evaluate before the first step (the "before" score).
        eval_at_end: Evaluate when training ends.
        max_new_tokens: Generation budget per answer.
        key: Metric key.
    """

    def __init__(self, n: int = 64, seed: int = 0, eval_at_start: bool = True, eval_at_end: bool = True,
                 max_new_tokens: int = 16, key: str = "val/vqa/exact_match") -> None:
        self.n, self.seed, self.max_new_tokens, self.key = n, seed, max_new_tokens, key
        self.eval_at_start, self.eval_at_end = eval_at_start, eval_at_end
        self.history: list[dict[str, Any]] = []
        self._examples = None

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, when: str) -> float:
        value = None
        if trainer.is_global_zero:
            if self._examples is None:
                self._examples = heldout_vqa(self.n, self.seed)
            backbone = pl_module.backbone
            processor = pl_module.input_builder.processor
            with trainer.strategy.precision_plugin.forward_context():
                value = vqa_exact_match(backbone.hf_model, processor, self._examples,
                                        max_new_tokens=self.max_new_tokens)
            rank_zero_info(f"[vqa] step {trainer.global_step} ({when}): exact match {value:.2f}")
        value = trainer.strategy.broadcast(value, src=0)
        BenchmarkEvalCallback.publish(trainer, {self.key: value}, trainer.global_step)
        self.history.append({"when": when, "step": trainer.global_step, "epoch": trainer.current_epoch,
                             "metrics": {self.key: value}})
        return value

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.eval_at_start:
            self.run(trainer, pl_module, "start")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.eval_at_end:
            self.run(trainer, pl_module, "end")

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
