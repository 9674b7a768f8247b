"""The eval callbacks under Lightning DDP (2 CPU processes, gloo) vs one process: same run files and numbers.

Run by tests/test_eval_devices.py:  python tests/scripts/ddp_eval_callback.py OUT_DIR {ddp|single} MMEB_ROOT VISDOC_ROOT
Each mode evaluates the same tiny model before one zero-learning-rate step (``eval_at_start``); under DDP every rank
embeds a share of each set (ShardedEncoder) and rank 0 writes the files. Rank 0 saves the logged numbers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from ddp_contrastive import Data  # same folder: the script's folder is on sys.path
from mmembed.callbacks.eval import MMEBEvalCallback, VisDocEvalCallback

from mmembed.backbone import build_backbone
from mmembed.modules import ContrastiveModule


class SaveHistory(L.Callback):
    def __init__(self, out: Path, evals: list) -> None:
        self.out, self.evals = out, evals

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            self.out.write_text(json.dumps({e.benchmark: e.history for e in self.evals}))


def main() -> None:
    out_dir, mode, mmeb_root, visdoc_root = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    backbone = build_backbone("tiny", vtc_factor=2, seed=0, finetune={"mode": "lora", "lora_r": 4})
    module = ContrastiveModule(backbone, optimizer=lambda params: torch.optim.SGD(params, lr=0.0))
    common = dict(eval_at_start=True, eval_at_end=False, batch_size=2, log_artifacts=False)
    evals = [MMEBEvalCallback(data=mmeb_root, out_dir=out_dir / mode, **common),
             VisDocEvalCallback(data=visdoc_root, out_dir=out_dir / mode, **common)]
    ddp = mode == "ddp"
    trainer = L.Trainer(accelerator="cpu", devices=2 if ddp else 1, strategy="ddp" if ddp else "auto",
                        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[*evals, SaveHistory(out_dir / f"{mode}.json", evals)])
    trainer.fit(module, datamodule=Data())


if __name__ == "__main__":
    main()
