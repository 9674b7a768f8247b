"""Eval callbacks in a real (tiny, CPU) Lightning fit: when they run, what they log, that ModelCheckpoint sees it."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from mmembed.callbacks import MMEBEvalCallback, VisDocEvalCallback
from torch.utils.data import DataLoader, TensorDataset

from mmembed.backbone import build_backbone, build_input_builder
from mmembed.embedder import Embedder
from mmembed.eval.results import load_metrics
from mmembed.types import Item
from tests.test_eval_runners import write_beir, write_mmeb_subset
from tests.test_tracking import fresh_sqlite_uri

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network here; MLflow would try to report usage


class TinyModule(L.LightningModule):
    """The least a module needs for the eval callbacks: a LoRA backbone and ``embedder()``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = build_backbone("tiny", finetune={"mode": "lora"})
        self.builder = build_input_builder("tiny")
        self.pair = [Item(text="a red circle"), Item(text="a blue square")]

    def embedder(self) -> Embedder:
        return Embedder(self.backbone, self.builder)

    def training_step(self, batch, batch_idx):
        emb = self.backbone.embed(**self.builder(self.pair, "query").to(self.device))
        return (emb[0] * emb[1]).sum()  # push the two texts apart: the weights (and the eval scores) move

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(8, 1)), batch_size=1)


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict]] = []

    name = "recording"
    version = "0"

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


@pytest.fixture
def mmeb_dir(tmp_path):
    root = tmp_path / "mmeb"
    write_mmeb_subset(root, "synth_cls", [
        {"qry_text": "red circle", "tgt_text": ["red", "blue", "green"]},
        {"qry_text": "blue square", "tgt_text": ["blue", "red", "green"]},
    ])
    write_mmeb_subset(root, "synth_ret", [{"qry_text": "a cat", "tgt_text": ["a cat photo", "a dog photo"]}])
    (root / "subsets.json").write_text('{"synth_cls": {"meta_task": "classification", "split": "IND"}, '
                                       '"synth_ret": {"meta_task": "retrieval", "split": "OOD"}}')
    return root


def trainer(tmp_path: Path, callbacks: list, logger, **kw) -> L.Trainer:
    return L.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, callbacks=callbacks, logger=logger,
                     enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1, **kw)


def test_mmeb_callback_schedule_logging_and_checkpoint_monitor(tmp_path, mmeb_dir):
    cb = MMEBEvalCallback(data=mmeb_dir, every_n_train_steps=1, eval_at_start=True, eval_at_end=True,
                          out_dir=tmp_path / "eval")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/mmeb/overall", mode="max", every_n_train_steps=1,
                           save_top_k=1)
    rec = RecordingLogger()
    t = trainer(tmp_path, [cb, ckpt], rec, max_steps=2)
    t.fit(TinyModule())

    # Before training and every step; the end-of-training evaluation is skipped: step 2 was just evaluated.
    assert [(h["when"], h["step"]) for h in cb.history] == [("start", 0), ("step", 1), ("step", 2)]
    # the time spent evaluating is kept (tasks.fit subtracts it from the fit: time/train_s, Table 9's training time)
    assert cb.seconds > 0
    logged = [(step, m) for step, m in rec.calls if "val/mmeb/overall" in m]
    assert [step for step, _ in logged] == [0, 1, 2]
    keys = set(logged[0][1])
    assert keys == {"val/mmeb/synth_cls", "val/mmeb/synth_ret", "val/mmeb/classification", "val/mmeb/retrieval",
                    "val/mmeb/ind", "val/mmeb/ood", "val/mmeb/overall"}
    for (_, m), h in zip(logged, cb.history):
        assert m == h["metrics"]
        assert m["val/mmeb/overall"] == pytest.approx((m["val/mmeb/synth_cls"] + m["val/mmeb/synth_ret"]) / 2)
    # ModelCheckpoint found the fresh monitored value at steps 1 and 2 and kept the better one.
    at = {step: m["val/mmeb/overall"] for step, m in logged}
    assert float(ckpt.best_model_score) == pytest.approx(max(at[1], at[2]))
    assert Path(ckpt.best_model_path).exists()
    assert float(t.callback_metrics["val/mmeb/overall"]) == pytest.approx(at[2])  # the latest numbers
    # The files of every evaluation.
    saved = load_metrics(tmp_path / "eval" / "step0000001-step" / "mmeb")
    assert saved["overall"] == pytest.approx(at[1]) and saved["extra"]["global_step"] == 1
    assert (tmp_path / "eval" / "step0000000-start" / "mmeb" / "runs" / "synth_cls.run").exists()
    assert (tmp_path / "eval" / "step0000002-step" / "mmeb" / "scores.png").exists()


def test_checkpoint_sees_the_value_of_its_own_step(tmp_path):
    """Scores that grow with the step: a checkpoint reading a stale value (the previous evaluation) would rank
    step 2 at 10, not 20."""
    from mmembed.eval.results import BenchmarkResult, SetScore

    class StepScored(MMEBEvalCallback):
        def evaluate(self, embedder, out_dir, extra):
            score = 10.0 * extra["global_step"]
            return BenchmarkResult("mmeb", "precision@1", "E", {"s": SetScore("s", "vqa", "ind", score, {}, 1, 1)})

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/mmeb/overall", mode="max", every_n_train_steps=1,
                           save_top_k=-1, filename="{step}")
    trainer(tmp_path, [StepScored(data="unused", every_n_train_steps=1, eval_at_start=True), ckpt], False,
            max_steps=2).fit(TinyModule())
    scores = {Path(p).stem: float(v) for p, v in ckpt.best_k_models.items()}
    assert scores == {"step=1": 10.0, "step=2": 20.0}
    assert float(ckpt.best_model_score) == 20.0


def test_visdoc_callback_epoch_eval_with_mlflow_artifacts(tmp_path):
    from mlflow.tracking import MlflowClient

    from mmembed.tracking import make_mlflow_logger

    folder = write_beir(tmp_path / "visdoc" / "synth_vidore", ["p0", "p1"], {"q0": "revenue 2024", "q1": "staff"},
                        [("q0", "p0", 1), ("q1", "p1", 1)])
    uri = fresh_sqlite_uri(tmp_path / "store")
    logger = make_mlflow_logger("cb-test", tracking_uri=uri, output_dir=tmp_path / "store")
    cb = VisDocEvalCallback(data={"synth_vidore": folder}, every_n_epochs=1, eval_at_end=True)
    t = trainer(tmp_path, [cb], logger, max_epochs=1, limit_train_batches=2)
    t.fit(TinyModule())

    # One evaluation at the end of the epoch; the end-of-training one is skipped (same step).
    assert [(h["when"], h["step"]) for h in cb.history] == [("epoch", 2)]
    assert float(t.callback_metrics["val/visdoc/overall"]) == pytest.approx(cb.results[0].overall)
    client = MlflowClient(uri)
    history = client.get_metric_history(logger.run_id, "val/visdoc/overall")
    assert [(m.step, m.value) for m in history] == [(2, pytest.approx(cb.results[0].overall))]
    base = "eval/step0000002-epoch/visdoc"
    names = {a.path for a in client.list_artifacts(logger.run_id, base)}
    assert names >= {f"{base}/metrics.json", f"{base}/scores.png", f"{base}/runs", f"{base}/qrels"}
    assert [a.path for a in client.list_artifacts(logger.run_id, f"{base}/runs")] == [f"{base}/runs/synth_vidore.run"]


def test_only_rank_zero_evaluates_and_all_ranks_get_the_numbers():
    """The rank logic with a stand-in trainer: with ``shard=False`` (or a strategy other than DDP) rank 1 never
    evaluates, and receives rank 0's broadcast. The sharded DDP path is tests/test_eval_devices.py's."""

    class NeverEvaluate(MMEBEvalCallback):
        def evaluate(self, *args, **kwargs):
            raise AssertionError("only rank 0 evaluates")

    from_rank0 = {"val/mmeb/overall": 42.0}
    fake = SimpleNamespace(global_step=3, current_epoch=0, is_global_zero=False, callback_metrics={}, loggers=[],
                           world_size=2, strategy=SimpleNamespace(broadcast=lambda obj, src=0: dict(from_rank0),
                                                                  root_device=torch.device("cpu")))
    assert not NeverEvaluate(data="unused").sharded(fake)  # not a DDPStrategy: rank 0 alone
    cb = NeverEvaluate(data="unused", every_n_train_steps=3, eval_at_end=True, shard=False)
    cb.on_train_batch_end(fake, None, None, None, 0)
    assert float(fake.callback_metrics["val/mmeb/overall"]) == 42.0
    cb.on_train_end(fake, None)  # same step as the last evaluation: nothing to do
    fake.global_step = 4
    cb.on_train_batch_end(fake, None, None, None, 1)  # not a multiple of 3
    cb.on_train_end(fake, None)
    assert [(h["when"], h["step"]) for h in cb.history] == [("step", 3), ("end", 4)]
    assert cb.history[0]["metrics"] == from_rank0


def test_callback_requires_embedder_method():
    with pytest.raises(TypeError, match=r"embedder\(\)"):
        MMEBEvalCallback(data="unused").setup(None, L.LightningModule(), "fit")
