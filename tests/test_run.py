"""The Hydra entry point end to end: a short training run into MLflow, a -m sweep, and the quickstart (slow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "experiments" / "run.py"
SHORT = ["synth.size=ci", "trainer.max_steps=2", "data.samples_per_epoch=32", "data.batch_size=4",
         "data.num_workers=0", "callbacks=none", "trainer.log_every_n_steps=1"]


def _run(tmp_path: Path, args: list[str], timeout: int = 600, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "MMEMBED_ROOT": str(tmp_path), "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, str(RUN), *args, f"hydra.run.dir={tmp_path}/run",
                        f"hydra.sweep.dir={tmp_path}/sweep"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=timeout)
    if ok:
        assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r


def _client(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'logs' / 'mlflow.db'}")


@pytest.mark.e2e
def test_train_run_logs_to_mlflow_and_saves_embedder(tmp_path):
    _run(tmp_path, ["+exp=stage2_warmup", *SHORT])
    assert len(list((tmp_path / "data").glob("synth_ci_s0_fn*/manifest.json"))) == 1  # generated on first use
    assert (tmp_path / "run" / "embedder" / "mmembed.json").is_file()
    client = _client(tmp_path)
    exp = client.get_experiment_by_name("mmembed")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["backbone.finetune.lora_r"] == "16"
    assert run.data.params["exp_name"] == "stage2_warmup"
    assert "train/loss" in run.data.metrics
    m = run.data.metrics  # no eval callbacks: the fit is all training
    assert m["time/eval_s"] == 0 and m["time/train_s"] == pytest.approx(m["time/fit_s"]) and m["time/fit_s"] > 0
    assert run.data.tags.get("mmembed.experiment") == "stage2_warmup"

    from mmembed import Embedder, Item

    emb = Embedder.from_pretrained(tmp_path / "run" / "embedder", device="cpu")
    assert emb.encode([Item(text="a red circle")]).shape == (1, 64)


@pytest.mark.e2e
def test_bad_override_is_one_line(tmp_path):
    env = {**os.environ, "MMEMBED_ROOT": str(tmp_path)}
    r = subprocess.run([sys.executable, str(RUN), "task=fly", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "config error: task='fly'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.e2e
def test_multirun_sweep_makes_parent_with_children(tmp_path):
    _run(tmp_path, ["-m", "+exp=ablation_lora_r8,ablation_lora_r16", *SHORT, "save_embedder=false"])
    client = _client(tmp_path)
    exp = client.get_experiment_by_name("mmembed")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    parents = {r.data.tags["mlflow.parentRunId"] for r in children}
    assert len(children) == 2 and len(parents) == 1
    assert sorted(r.data.params["backbone.finetune.lora_r"] for r in children) == ["16", "8"]
    parent = parents.pop()
    arts = {a.path for a in client.list_artifacts(parent, "sweep_summary")}
    assert {"sweep_summary/summary.csv", "sweep_summary/summary.png", "sweep_summary/points.json"} <= arts
    csv = Path(client.download_artifacts(parent, "sweep_summary/summary.csv", str(tmp_path))).read_text()
    assert "backbone.finetune.lora_r" in csv and "train/loss" in csv
    # What the MLflow UI shows: a model-training experiment; the parent named for what it sweeps, tagged, ended.
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    run = client.get_run(parent)
    assert run.info.run_name == "ablation_lora_r: backbone.finetune.lora_r \u2208 {8, 16}"
    assert run.info.status == "FINISHED"
    assert run.data.tags["mmembed.sweep.param"] == "backbone.finetune.lora_r"
    assert run.data.tags["mmembed.sweep.values"] == "8, 16" and run.data.tags["mmembed.sweep.failed"] == "none"
    assert sorted(r.info.run_name for r in children) == ["lora_r=16 seed=0", "lora_r=8 seed=0"]
    assert {r.info.status for r in children} == {"FINISHED"}


@pytest.mark.slow
def test_multirun_sweep_with_a_failing_point_ends_failed_and_says_which(tmp_path):
    # batch_size 64 cannot fill one batch from samples_per_epoch=32: that point fails inside fit.
    r = _run(tmp_path, ["-m", "+exp=stage2_warmup", "data.batch_size=4,64",
                        *[a for a in SHORT if not a.startswith("data.batch_size")], "save_embedder=false"], ok=False)
    assert r.returncode != 0
    client = _client(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("mmembed").experiment_id])
    (parent,) = [x for x in runs if x.data.tags.get("mmembed.sweep_parent") == "true"]
    children = {x.info.run_name: x.info.status for x in runs if "mlflow.parentRunId" in x.data.tags}
    assert children == {"batch_size=4 seed=0": "FINISHED", "batch_size=64 seed=0": "FAILED"}
    assert parent.info.status == "FAILED"
    assert parent.info.run_name == "stage2_warmup: data.batch_size \u2208 {4, 64}"
    assert parent.data.tags["mmembed.sweep.failed"].startswith("batch_size=64 seed=0 (ValueError: samples_per_epoch")
    md = Path(client.download_artifacts(parent.info.run_id, "sweep_summary/summary.md", str(tmp_path))).read_text()
    assert "Failed points: batch_size=64 seed=0 (ValueError" in md


@pytest.mark.slow
def test_stage2_hnm_mines_with_warmup_checkpoint_then_trains(tmp_path):
    _run(tmp_path, ["+exp=stage2_warmup", *SHORT])
    (tmp_path / "run").rename(tmp_path / "warmup")
    _run(tmp_path, ["+exp=stage2_hnm", *SHORT, f"mining.checkpoint={tmp_path}/warmup/embedder"])
    mined = tmp_path / "run" / "mined"
    assert (mined / "manifest.jsonl").is_file() and (mined / "summary.json").is_file()
    assert list((mined / "shards").glob("*.tar")) and (tmp_path / "run" / "embedder" / "mmembed.json").is_file()


@pytest.mark.slow
def test_quickstart_improves_retrieval(tmp_path):
    r = _run(tmp_path, ["+exp=quickstart"], timeout=1800)
    client = _client(tmp_path)
    exp = client.get_experiment_by_name("mmembed")
    (run,) = client.search_runs([exp.experiment_id])
    hist = {k: [m.value for m in client.get_metric_history(run.info.run_id, k)]
            for k in ("val/mmeb/overall", "val/visdoc/overall")}
    for key, values in hist.items():
        assert len(values) == 2, key  # before and after
    assert hist["val/mmeb/overall"][1] > hist["val/mmeb/overall"][0] + 5, hist
    assert "results" in r.stdout


@pytest.mark.e2e
def test_checkpoint_on_main_metric_and_resume(tmp_path):
    import torch

    tiny_eval = ["callbacks.mmeb.max_queries=2", "callbacks.visdoc.max_queries=2", "callbacks.mmeb.eval_at_start=false",
                 "callbacks.visdoc.eval_at_start=false", "callbacks.mmeb.subsets=[synth_cls_color,synth_ret_t2i]"]
    base = [a for a in SHORT if a != "callbacks=none"] + tiny_eval + ["save_embedder=false", "logger=none"]
    _run(tmp_path, ["+exp=stage2_warmup", *base])
    ckpts = tmp_path / "run" / "checkpoints"
    best = [p for p in ckpts.glob("best-*.ckpt")]
    assert (ckpts / "last.ckpt").is_file() and len(best) == 1
    state = torch.load(best[0], map_location="cpu", weights_only=False)
    monitor = next(v for k, v in state["callbacks"].items() if "ModelCheckpoint" in k)
    assert monitor["monitor"] == "val/mmeb/overall" and monitor["best_model_score"] is not None
    (tmp_path / "run").rename(tmp_path / "first")
    _run(tmp_path, ["+exp=stage2_warmup", *base, "trainer.max_steps=4", "trainer.max_epochs=2",
                    f"ckpt_path={tmp_path}/first/checkpoints/last.ckpt"])
    resumed = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 4  # continued from step 2, not restarted


@pytest.mark.slow
def test_kill_9_then_resume_matches_the_uninterrupted_run_and_continues_its_mlflow_run(tmp_path):
    """LoRA dropout on, a checkpoint every 2 steps: kill -9 after the first one, resume with ckpt_path -> the same
    per-step losses and final scores as a run that was never interrupted, logged to the same MLflow run."""
    import signal
    import time

    import torch

    tiny_eval = ["callbacks.mmeb.max_queries=2", "callbacks.visdoc.max_queries=2", "callbacks.mmeb.eval_at_start=false",
                 "callbacks.visdoc.eval_at_start=false", "+callbacks.mmeb.every_n_train_steps=2",
                 "+callbacks.checkpoint.every_n_train_steps=2",
                 "callbacks.mmeb.subsets=[synth_cls_color,synth_ret_t2i]", "backbone.finetune.lora_dropout=0.3"]
    base = ["+exp=stage2_warmup", *[a for a in SHORT if a not in ("callbacks=none", "trainer.max_steps=2")],
            *tiny_eval, "save_embedder=false", "trainer.max_steps=6"]
    _run(tmp_path, base)  # the uninterrupted run
    (tmp_path / "run").rename(tmp_path / "full")
    env = {**os.environ, "MMEMBED_ROOT": str(tmp_path), "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, str(RUN), *base, f"hydra.run.dir={tmp_path}/run"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 600
    while not last.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # let the checkpoint file be written completely
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    ckpt = tmp_path / "killed.ckpt"
    ckpt.write_bytes(last.read_bytes())
    k = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    assert 2 <= k < 6
    _run(tmp_path, [*base, f"ckpt_path={ckpt}"])

    client = _client(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("mmembed").experiment_id],
                              order_by=["attributes.start_time ASC"])
    assert len(runs) == 2  # the resume continued the killed run instead of opening a third
    full, resumed = runs
    assert resumed.info.status == "FINISHED" and resumed.data.tags["mmembed.resumed"] == "1"

    def last_per_step(run, key):
        return {m.step: m.value for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                key=lambda m: m.timestamp)}

    losses_full, losses_resumed = last_per_step(full, "train/loss"), last_per_step(resumed, "train/loss")
    assert sorted(losses_full) == sorted(losses_resumed) and len(losses_full) >= 6
    assert losses_resumed == losses_full
    for key in ("val/mmeb/overall", "val/visdoc/overall"):
        assert resumed.data.metrics[key] == full.data.metrics[key], key
