"""Lightning DDP (2 CPU processes, gloo) vs one process on the global batch, for ContrastiveModule.

Run by tests/test_contrastive_module.py:  python tests/scripts/ddp_contrastive.py OUT_DIR {ddp|single}
Each mode takes one optimisation step on the same global batch (ddp: each rank holds half) and saves the loss and
the trainable parameters' gradients (after DDP's all-reduce) from rank 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from mmembed import Item
from mmembed.backbone import build_backbone, build_input_builder
from mmembed.modules import ContrastiveModule

GLOBAL_B, N_NEG = 4, 1
COLORS = ["red", "green", "blue", "yellow"]


def make_batch(rows: list[int]) -> dict:
    from PIL import Image

    builder = build_input_builder("tiny", vtc_factor=2)
    qs = [Item(text=f"a {COLORS[i]} scene number {i}", instruction="Find me an everyday image.") for i in rows]
    pos = [Item(image=Image.new("RGB", (64, 64), COLORS[i]), instruction="Represent the given image.") for i in rows]
    negs = [Item(image=Image.new("RGB", (64, 64), COLORS[(i + 1) % 4]).rotate(45)) for i in rows]
    return {"query": builder(qs, "query"), "candidate": builder(pos + negs, "candidate"), "num_negatives": N_NEG,
            "pos_ids": [f"p{i}" for i in rows], "neg_ids": [f"n{i}" for i in rows]}


class GradSaver(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_rank == 0:
            grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
            torch.save({"grads": grads, "loss": trainer.callback_metrics["train/loss"].item()}, self.out)


class Data(L.LightningDataModule):
    def train_dataloader(self):
        ws, rank = self.trainer.world_size, self.trainer.global_rank
        per = GLOBAL_B // ws
        rows = list(range(rank * per, (rank + 1) * per))
        return DataLoader([make_batch(rows)], batch_size=None)


def main() -> None:
    out_dir, mode = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    # float64: the 1e-6 comparison then tests the gathering arithmetic, not float32 summation order.
    backbone = build_backbone("tiny", vtc_factor=2, seed=0, dtype=torch.float64,
                              finetune={"mode": "lora", "lora_r": 4, "lora_dropout": 0.0})
    with torch.no_grad():  # non-zero adapters so every LoRA matrix gets a gradient
        g = torch.Generator().manual_seed(1)
        for n, p in backbone.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    module = ContrastiveModule(backbone, optimizer=lambda params: torch.optim.SGD(params, lr=0.0))
    ddp = mode == "ddp"
    trainer = L.Trainer(accelerator="cpu", devices=2 if ddp else 1, strategy="ddp" if ddp else "auto",
                        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[GradSaver(out_dir / f"{mode}.pt")])
    trainer.fit(module, datamodule=Data())


if __name__ == "__main__":
    main()
