"""docs/EXTENDING.md, done as a user would: a new LightningModule defined here, its config group option and exp
file in the user's own config folder, trained two steps through ``experiments/run.py`` without touching the
launcher, evaluated by the eval callbacks and logged to MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmembed.modules import BackboneModule

ROOT = Path(__file__).resolve().parents[1]


class SymmetricContrastiveModule(BackboneModule):
    """A user's module: symmetric in-batch InfoNCE (query→candidate and candidate→query), no hard negatives.

    Everything else — backbone, preprocessing, optimiser wiring, the ``embedder()`` view the eval callbacks use —
    comes from ``BackboneModule``.
    """

    def __init__(self, backbone, optimizer=None, scheduler=None, temperature: float = 0.05) -> None:
        super().__init__(backbone, optimizer, scheduler)
        self.save_hyperparameters(ignore=["backbone", "optimizer", "scheduler"])
        self.temperature = temperature

    def training_step(self, batch, batch_idx):
        q = self.backbone.embed(**batch["query"])
        b = q.shape[0]
        c = self.backbone.embed(**batch["candidate"])[:b]  # the positives; negatives (if any) are ignored
        logits = q @ c.T / self.temperature
        target = torch.arange(b, device=logits.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        self.log("train/loss", loss, batch_size=b)
        self.log("train/symmetric", 1.0, batch_size=b)
        return loss


MODULE_YAML = """\
_target_: tests.test_extending.SymmetricContrastiveModule
temperature: 0.05
optimizer:
  _target_: torch.optim.AdamW
  _partial_: true
  lr: 1.0e-3
scheduler: null
"""

EXP_YAML = """\
# @package _global_
# python experiments/run.py hydra.searchpath=[file://<this folder>/..] +exp=symmetric
defaults:
  - override /module: symmetric
exp_name: symmetric
data:
  num_hard_negatives: 0
"""


@pytest.mark.e2e
def test_a_user_module_trains_evaluates_and_logs_without_touching_the_launcher(tmp_path):
    configs = tmp_path / "my_configs"
    (configs / "module").mkdir(parents=True)
    (configs / "exp").mkdir()
    (configs / "module" / "symmetric.yaml").write_text(MODULE_YAML)
    (configs / "exp" / "symmetric.yaml").write_text(EXP_YAML)
    env = {**os.environ, "MMEMBED_ROOT": str(tmp_path), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    args = [f"hydra.searchpath=[file://{configs}]", "+exp=symmetric", "synth.size=ci", "trainer.max_steps=2",
            "data.samples_per_epoch=32", "data.batch_size=4", "data.num_workers=0", "trainer.log_every_n_steps=1",
            "callbacks.mmeb.max_queries=4", "callbacks.visdoc.max_queries=4", "~callbacks.checkpoint",
            "save_embedder=false", f"hydra.run.dir={tmp_path}/run"]
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), *args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'logs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("mmembed").experiment_id])
    assert run.data.params["module._target_"] == "tests.test_extending.SymmetricContrastiveModule"
    assert run.data.params["exp_name"] == "symmetric"
    assert {"train/loss", "train/symmetric", "val/mmeb/overall", "val/visdoc/overall"} <= set(run.data.metrics)
    history = client.get_metric_history(run.info.run_id, "val/mmeb/overall")
    assert len(history) == 2  # before training and at the end, by the stock eval callbacks
