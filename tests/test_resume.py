"""Exact resume: RNG states and the data-stream position travel in the checkpoint (callbacks.resume, RankLoader)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from mmembed.callbacks.resume import ResumeState, capture_rng_state, restore_rng_state, saved_mlflow_run_id
from mmembed.datamodules.common import RankLoader, SharedEpoch
from mmembed.datamodules.contrastive import ContrastiveDataModule
from mmembed.datamodules.instruction import InstructionDataModule
from transformers import get_cosine_schedule_with_warmup

from mmembed.backbone import build_backbone
from mmembed.losses.infonce import InfoNCELoss
from mmembed.modules import ContrastiveModule

from .test_datamodules import _instruct, _write


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_rng_state_round_trip_through_a_safe_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng_state()
    expected = _draws()
    torch.save(state, tmp_path / "rng.pt")
    _draws(), _draws()  # move every generator on
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))  # loads with the safe loader
    assert _draws() == expected


class _WorkerSeeds(torch.utils.data.IterableDataset):
    """Yields the torch seed of the DataLoader worker that runs it (base seed + worker id), forever."""

    def __iter__(self):
        while True:
            yield torch.initial_seed()


def _iterate(global_seed: int, epoch: int) -> tuple[list[int], bool]:
    """One epoch of a 1-worker RankLoader after seeding the global RNG: (worker seeds, global RNG left untouched)."""
    torch.manual_seed(global_seed)
    loader = RankLoader(_WorkerSeeds(), num_batches=2, shared_epoch=SharedEpoch(), epoch_fn=lambda: epoch,
                        num_workers=1, seed=5)
    before = torch.get_rng_state()
    seeds = list(loader)
    return seeds, torch.equal(torch.get_rng_state(), before)


def test_loader_epochs_leave_the_global_rng_alone_and_seed_workers_by_epoch():
    """Starting an epoch's loader must not draw from the global torch RNG: the uninterrupted run would otherwise
    move its dropout stream past the state the checkpoint saved at the epoch's end, and a resumed run (which puts
    that state back) trains with other masks (issue 25: resume across an epoch boundary was not exact)."""
    seeds, untouched = _iterate(global_seed=0, epoch=1)
    assert untouched, "iterating the loader drew from the global torch RNG"
    assert _iterate(global_seed=1, epoch=1)[0] == seeds  # the worker seed is (seed, rank, epoch)'s alone
    assert _iterate(global_seed=0, epoch=2)[0] != seeds  # and a new one each epoch
    with pytest.raises(ValueError, match="pass seed=, not generator="):
        RankLoader(_WorkerSeeds(), num_batches=2, shared_epoch=SharedEpoch(), generator=torch.Generator())


def test_stage1_loader_epochs_leave_the_global_rng_alone(tmp_path):
    """The same rule for the stage-1 (map-style) loader: its worker seeds come from (seed, rank, sampler epoch)."""
    from mmembed.backbone import build_input_builder

    dm = InstructionDataModule(str(_instruct(tmp_path)), batch_size=2, num_workers=0, seed=4,
                               input_builder=build_input_builder("tiny", vtc_factor=2))
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)  # what Lightning does before each epoch
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = [b["input_ids"] for b in loader]
    assert torch.equal(torch.get_rng_state(), before), "iterating the loader drew from the global torch RNG"
    again = [b["input_ids"] for b in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


class _Losses(L.Callback):
    def __init__(self) -> None:
        self.steps: list[tuple[int, float, str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append((trainer.global_step, float(outputs["loss"]), batch["ids"][0]))


class _StopAt(L.Callback):
    """Stop after step ``k`` (the checkpoint of that step is written first): the run that gets killed."""

    def __init__(self, k: int) -> None:
        self.k = k

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.k:
            trainer.should_stop = True


def _fit(shards: Path, max_steps: int, ckpt_dir: Path | None = None, ckpt_path: Path | None = None,
         resume_state: bool = True, stop_at: int | None = None) -> _Losses:
    """Train the tiny backbone with LoRA dropout 0.3 (dropout makes every RNG draw visible in the losses)."""
    L.seed_everything(0, workers=True)
    backbone = build_backbone("tiny", vtc_factor=2, seed=0,
                              finetune={"mode": "lora", "lora_r": 4, "lora_dropout": 0.3})
    # A warm-up schedule as the configs use: it reads trainer.estimated_stepping_batches, which makes Lightning
    # build the train loader before it restores the loops (so the loader's own saved state would be dropped).
    module = ContrastiveModule(backbone, loss=InfoNCELoss(temperature=0.05),
                               scheduler=partial(get_cosine_schedule_with_warmup, num_warmup_steps=2))
    data = ContrastiveDataModule(str(shards / "*.tar"), batch_size=4, num_workers=0, shuffle_buffer=8,
                                 samples_per_epoch=20,  # 5 batches per epoch: the resume crosses an epoch boundary
                                 input_builder=backbone.input_builder)
    losses = _Losses()
    callbacks: list = [losses] + ([ResumeState()] if resume_state else [])
    if stop_at is not None:
        callbacks.append(_StopAt(stop_at))
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1))
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, max_epochs=10, logger=False, callbacks=callbacks,
                        enable_checkpointing=ckpt_dir is not None, enable_progress_bar=False,
                        enable_model_summary=False)
    # A new process starts with other generator states than the one that wrote the checkpoint.
    random.random(), np.random.rand(), torch.rand(5)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return losses


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("shards"), per_shard=8)


@pytest.mark.slow  # four short fits: 47 s measured on 2 cores under a shared load (load average ~7)
def test_resume_mid_epoch_gives_the_uninterrupted_losses(shards, tmp_path):
    full = _fit(shards, max_steps=8).steps
    # The run that is "killed" after its step-3 checkpoint: same settings (the LR schedule spans max_steps).
    _fit(shards, max_steps=8, ckpt_dir=tmp_path / "ckpt", stop_at=3)
    ckpt = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    assert ckpt.is_file()
    resumed = _fit(shards, max_steps=8, ckpt_path=ckpt).steps
    assert [s for s, _, _ in resumed] == [4, 5, 6, 7, 8]
    assert resumed == full[3:]  # same batches (ids) and bit-identical losses, across the epoch boundary at step 5
    # Without the saved RNG states the same resume draws other dropout masks: the test can tell.
    plain = _fit(shards, max_steps=8, ckpt_path=ckpt, resume_state=False).steps
    assert [i for _, _, i in plain] == [i for _, _, i in full[3:]] and plain != full[3:]


def test_saved_mlflow_run_id_reads_the_callback_state(tmp_path):
    torch.save({"callbacks": {"ResumeState": {"rng": capture_rng_state(), "mlflow_run_ids": ["abc123"]}}},
               tmp_path / "x.ckpt")
    assert saved_mlflow_run_id(tmp_path / "x.ckpt") == "abc123"
    torch.save({"callbacks": {}}, tmp_path / "y.ckpt")
    assert saved_mlflow_run_id(tmp_path / "y.ckpt") is None


# --------------------------------------------------------------------------------------- the quickstart, killed
RUN = Path(__file__).resolve().parents[1] / "experiments" / "run.py"
#: Issue 25's case: the quickstart at CI size, 20 steps an epoch, 3 epochs, 2 loader workers, evaluated every epoch.
QUICKSTART = ["+exp=quickstart", "synth.size=ci", "data.samples_per_epoch=320", "trainer.max_epochs=3", "seed=3",
              "trainer.log_every_n_steps=1", "save_embedder=false"]


def _launch(root: Path, name: str, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    env = {**os.environ, "MMEMBED_ROOT": str(root), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(RUN), *QUICKSTART, *extra, f"hydra.run.dir={root / name}"],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=1200)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow  # three quickstart-sized runs: 249 s measured on 2 cores under a shared load (load average ~10)
def test_quickstart_killed_after_its_first_last_ckpt_resumes_exactly(tmp_path):
    """kill -9 right after the first ``last.ckpt`` (the end of epoch 1), resume with ``ckpt_path=``: the same per-step
    losses and the same scores at every evaluation as the uninterrupted run."""
    from mlflow.tracking import MlflowClient

    _finish(_launch(tmp_path, "full"))
    proc = _launch(tmp_path, "killed")
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"  # Lightning writes it atomically (fsspec transaction)
    deadline = time.time() + 1200
    while not last.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 20  # the epoch-end checkpoint
    out = _finish(_launch(tmp_path, "killed", (f"ckpt_path={last}",)))
    assert "not resumable" not in out  # Lightning sees a stateful loader

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'logs' / 'mlflow.db'}")
    full, resumed = client.search_runs([client.get_experiment_by_name("mmembed").experiment_id],
                                       order_by=["attributes.start_time ASC"])
    assert resumed.data.tags["mmembed.resumed"] == "1" and resumed.info.status == "FINISHED"

    def history(run, key: str) -> dict[int, float]:  # the last value per step (the killed part may log a step twice)
        return {m.step: m.value for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                key=lambda m: m.timestamp)}

    losses = history(full, "train/loss")
    assert len(losses) == 60 and history(resumed, "train/loss") == losses  # bit-identical, step by step
    for key in ("val/mmeb/overall", "val/visdoc/overall"):
        assert history(resumed, key) == history(full, key), key
    assert sorted(history(full, "val/mmeb/overall")) == [0, 20, 40, 60]  # scored before, at each epoch, at the end
