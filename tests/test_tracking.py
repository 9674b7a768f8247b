"""MLflow helpers on a sqlite store in tmp_path: config as params/tags/YAML, parent/child sweeps, the sweep summary.

A fresh ``mlflow.db`` costs several seconds of schema migrations on this machine, so :func:`fresh_sqlite_uri` builds
the empty schema once per MLflow version (in the temp folder) and copies it for every test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mmembed import tracking

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network here; MLflow would try to report usage


def fresh_sqlite_uri(folder: Path) -> str:
    """``sqlite:///folder/mlflow.db`` holding an empty, current MLflow schema (copied from a cached template)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    template = Path(tempfile.gettempdir()) / f"mmembed-test-mlflow-{mlflow.__version__}.db"
    if not template.exists():
        building = template.with_suffix(f".{os.getpid()}.tmp")
        MlflowClient(f"sqlite:///{building}").search_experiments()  # creates and migrates the schema
        os.replace(building, template)  # atomic: a concurrent session never copies a half-built file
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(template, folder / tracking.DB_NAME)
    return f"sqlite:///{folder / tracking.DB_NAME}"


def test_default_uri_and_artifact_location(tmp_path):
    uri = tracking.default_tracking_uri(tmp_path / "out")
    assert uri == f"sqlite:///{(tmp_path / 'out').resolve()}/mlflow.db" and (tmp_path / "out").is_dir()
    expected = (tmp_path.resolve() / "mlartifacts/my_exp").as_uri()
    assert tracking.default_artifact_location(tmp_path, "my exp") == expected
    assert tracking.is_local_store(uri) and not tracking.is_local_store("http://127.0.0.1:5000")


def test_config_params_flatten_sanitize_truncate():
    cfg = {"model": {"lr": 1e-4, "layers": [8, 16], "empty": {}}, "bad key!": "x" * 7000, "none": None}
    params = tracking.config_params(cfg)
    assert params["model.lr"] == "0.0001" and params["model.layers.0"] == "8" and params["model.layers.1"] == "16"
    assert params["model.empty"] == "{}" and params["none"] == "None"
    assert len(params["bad key_"]) == tracking.MAX_PARAM_LENGTH and params["bad key_"].endswith("[truncated]")
    assert tracking.sanitize_key("a//b/../c?") == "a/_/b/_/c_"
    assert tracking.sanitize_key("/a/../b") == "a/_/b" and tracking.sanitize_key("x@5") == "x_5"


def test_log_config_params_tags_and_yaml(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = fresh_sqlite_uri(tmp_path / "store")
    logger = tracking.make_mlflow_logger("cfg-test", tracking_uri=uri, output_dir=tmp_path / "store", run_name="r1")
    cfg = {"exp": "quickstart", "trainer": {"max_steps": 10, "precision": "bf16-mixed"}, "long": "y" * 6500}
    tracking.log_config(logger, cfg, experiment="quickstart")
    client = MlflowClient(uri)
    run = client.get_run(logger.run_id)
    assert run.data.params["trainer.max_steps"] == "10" and run.data.params["trainer.precision"] == "bf16-mixed"
    assert len(run.data.params["long"]) == 6000
    assert run.data.tags[tracking.EXPERIMENT_TAG] == "quickstart" and run.info.run_name == "r1"
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(tracking.__file__).parent, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        head = None  # not a git checkout (or no commit yet): the tag is simply absent
    assert run.data.tags.get(tracking.GIT_COMMIT_TAG) == head
    # Artifacts land next to the store, and the YAML round-trips.
    location = client.get_experiment(run.info.experiment_id).artifact_location
    assert location == (tmp_path / "store").resolve().joinpath("mlartifacts", "cfg-test").as_uri()
    saved = yaml.safe_load(Path(client.download_artifacts(logger.run_id, "config.yaml", str(tmp_path))).read_text())
    assert saved == cfg


def test_sweep_parent_children_and_summary(tmp_path):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "store"
    uri = fresh_sqlite_uri(store)
    sweep_dir = tmp_path / "multirun" / "2026-11-23"
    parent = tracking.get_or_create_sweep_parent("sweep-test", sweep_dir, tracking_uri=uri, output_dir=store)
    assert tracking.get_or_create_sweep_parent("sweep-test", sweep_dir, tracking_uri=uri, output_dir=store) == parent
    # Three jobs of a "number of hard negatives" sweep, launched out of order; the values are made up.
    points = {8: (61.0, 70.5), 0: (55.0, 66.0), 16: (63.5, 69.0)}
    children = []
    for n, (mmeb, visdoc) in points.items():
        logger = tracking.make_mlflow_logger("sweep-test", tracking_uri=uri, output_dir=store, run_name=f"hn{n}",
                                             sweep_dir=sweep_dir)
        tracking.log_config(logger, {"data": {"num_negatives": n}, "seed": 0})
        logger.log_metrics({"val/mmeb/overall": mmeb - 10, "val/visdoc/overall": visdoc - 10}, step=1)
        logger.log_metrics({"val/mmeb/overall": mmeb, "val/visdoc/overall": visdoc}, step=2)  # last value wins
        logger.finalize("success")
        children.append(logger.run_id)

    frame = tracking.summarize_sweep(parent, "data.num_negatives", tracking_uri=uri)
    assert list(frame["data.num_negatives"]) == [0, 8, 16]
    assert list(frame["val/mmeb/overall"]) == [55.0, 61.0, 63.5]
    assert list(frame["val/visdoc/overall"]) == [66.0, 70.5, 69.0]

    client = MlflowClient(uri)
    for run_id in children:
        assert client.get_run(run_id).data.tags[tracking.PARENT_RUN_TAG] == parent
    names = {a.path for a in client.list_artifacts(parent, "sweep_summary")}
    assert names == {"sweep_summary/summary.csv", "sweep_summary/summary.md", "sweep_summary/summary.png"}
    csv = pd.read_csv(client.download_artifacts(parent, "sweep_summary/summary.csv", str(tmp_path)))
    assert csv[["data.num_negatives", "val/mmeb/overall", "val/visdoc/overall"]].values.tolist() == [
        [0, 55.0, 66.0], [8, 61.0, 70.5], [16, 63.5, 69.0]]
    md = Path(client.download_artifacts(parent, "sweep_summary/summary.md", str(tmp_path))).read_text()
    assert "| 16 | 1 | 63.50 | 69.00 |" in md  # per point: value, runs, metrics
    assert f"| {children[2]} | hn16 | FINISHED | 16 | 0 | 63.50 | 69.00 |" in md  # per run
    assert "Best point: **data.num_negatives = 16** (val/mmeb/overall = 63.50)" in md
    assert "Failed points: none" in md
    assert client.get_run(parent).data.metrics["best/val/mmeb/overall"] == 63.5
    assert client.get_run(parent).data.tags[tracking.SWEEP_BEST_TAG] == "data.num_negatives=16 (val/mmeb/overall 63.50)"
    # The parent also carries the curve as metric history, step = swept value.
    history = client.get_metric_history(parent, "sweep/val/mmeb/overall")
    assert sorted((m.step, m.value) for m in history) == [(0, 55.0), (8, 61.0), (16, 63.5)]
    # reduce="max" reads the whole history (here the last values are also the maxima); summarizing again (every
    # job of a sweep does) adds no duplicate points to the parent's curve.
    assert list(tracking.summarize_sweep(parent, "data.num_negatives", ["val/mmeb/overall"], uri, reduce="max")[
        "val/mmeb/overall"]) == [55.0, 61.0, 63.5]
    assert len(client.get_metric_history(parent, "sweep/val/mmeb/overall")) == 3
    # A job that has not logged its config yet is left out, with a warning.
    tracking.make_mlflow_logger("sweep-test", tracking_uri=uri, output_dir=store, run_name="late",
                                parent_run_id=parent).log_metrics({"val/mmeb/overall": 1.0})
    with pytest.warns(UserWarning, match="late"):
        assert len(tracking.summarize_sweep(parent, "data.num_negatives", tracking_uri=uri)) == 3
    with pytest.raises(ValueError, match="has a param .data.not_swept."):
        tracking.summarize_sweep(parent, "data.not_swept", tracking_uri=uri)


def test_new_experiment_is_marked_as_model_training(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = fresh_sqlite_uri(tmp_path / "store")
    client = MlflowClient(uri)
    exp_id = tracking.get_or_create_experiment(client, "kind-test")
    assert client.get_experiment(exp_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    # An experiment made elsewhere without a kind gets one; one that has a kind keeps it.
    bare = client.create_experiment("bare")
    tracking.get_or_create_experiment(client, "bare")
    assert client.get_experiment(bare).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    client.set_experiment_tag(bare, tracking.EXPERIMENT_KIND_TAG, "genai_development")
    tracking.get_or_create_experiment(client, "bare")
    assert client.get_experiment(bare).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"


# What every run does first on the store, without Lightning's import time: make_mlflow_logger goes through the same
# ensure_store / get_or_create_experiment before its run is created.
_CONCURRENT = """
import sys
from mlflow.tracking import MlflowClient
from mmembed import tracking
uri, name = sys.argv[1], sys.argv[3]
tracking.ensure_store(uri)
client = MlflowClient(uri)
exp_id = tracking.get_or_create_experiment(client, "race", tracking.default_artifact_location(sys.argv[2], "race"))
run = client.create_run(exp_id, run_name=name, tags=tracking.process_tags())
client.log_metric(run.info.run_id, "x", 1.0)
client.set_terminated(run.info.run_id, "FINISHED")
"""


def test_three_concurrent_runs_on_a_new_store_are_all_recorded(tmp_path):
    """Three processes start together on a store that does not exist yet: the schema is built once, under the
    lock, and all three runs are recorded (without the lock one of them used to fail in the migration)."""
    from mlflow.tracking import MlflowClient

    store = tmp_path / "store"
    uri = f"sqlite:///{store / tracking.DB_NAME}"
    env = {**os.environ, "PYTHONPATH": str(Path(tracking.__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT, uri, str(store), f"run{i}"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["run0", "run1", "run2"]
    assert {r.info.status for r in runs} == {"FINISHED"} and all(r.data.metrics["x"] == 1.0 for r in runs)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid no longer exists
    return proc.pid


def test_stale_running_run_is_marked_killed_and_a_resume_reopens_it(tmp_path):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "store"
    uri = fresh_sqlite_uri(store)
    client = MlflowClient(uri)
    exp_id = tracking.get_or_create_experiment(client, "stale-test")
    # A run whose process was killed with kill -9: still RUNNING, its process gone.
    dead = client.create_run(exp_id, tags={**tracking.process_tags(), tracking.PID_TAG: str(_dead_pid()),
                                           tracking.PID_START_TAG: "1"}).info.run_id
    alive = client.create_run(exp_id, tags=tracking.process_tags()).info.run_id  # this very process
    other_host = client.create_run(exp_id, tags={tracking.HOST_TAG: "elsewhere", tracking.PID_TAG: "1"}).info.run_id
    logger = tracking.make_mlflow_logger("stale-test", tracking_uri=uri, output_dir=store, run_name="next")
    assert client.get_run(dead).info.status == "KILLED"
    assert "ended without closing the run" in client.get_run(dead).data.tags[tracking.END_REASON_TAG]
    assert client.get_run(alive).info.status == "RUNNING" and client.get_run(other_host).info.status == "RUNNING"
    assert client.get_run(logger.run_id).data.tags[tracking.PID_TAG] == str(os.getpid())
    # Resuming the killed run continues it: RUNNING again, this process, counted as resumed; metrics go to it.
    client.log_param(dead, "ckpt_path", "None")  # what the killed run's log_config recorded
    resumed = tracking.make_mlflow_logger("stale-test", tracking_uri=uri, output_dir=store, run_id=dead)
    resumed.log_metrics({"train/loss": 0.5}, step=7)
    # Its config now names the checkpoint: MLflow refuses to change a param, so the change goes to a tag.
    tracking.log_config(resumed, {"ckpt_path": "last.ckpt", "seed": 0})
    run = client.get_run(dead)
    assert run.data.params == {"ckpt_path": "None", "seed": "0"}
    assert run.data.tags[tracking.RESUME_CHANGED_TAG] == "ckpt_path=last.ckpt"
    assert "resumed_config.yaml" in {a.path for a in client.list_artifacts(dead)}
    run = client.get_run(dead)
    assert run.info.status == "RUNNING" and run.data.tags[tracking.RESUMED_TAG] == "1"
    assert run.data.tags[tracking.PID_TAG] == str(os.getpid()) and run.data.metrics["train/loss"] == 0.5
    resumed.finalize("success")
    assert client.get_run(dead).info.status == "FINISHED"
    assert len(client.search_runs([exp_id])) == 4  # no new run was opened for the resume


_KILLED_PIPELINE = """
import os, sys
from mmembed import tracking
print(tracking.start_pipeline_run("pipe-test", "pipeline: killed", tracking_uri=sys.argv[1]), os.getpid(), flush=True)
os.kill(os.getpid(), 9)
"""


def test_killed_pipeline_parent_is_marked_killed_by_the_next_run(tmp_path):
    """A pipeline's parent run carries host and pid like every run, so after a kill -9 of the pipeline the next run
    on the store marks it KILLED (it once stayed RUNNING forever)."""
    from mlflow.tracking import MlflowClient

    store = tmp_path / "store"
    uri = fresh_sqlite_uri(store)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _KILLED_PIPELINE, uri], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    parent, pid = proc.stdout.strip().splitlines()[-1].split()
    client = MlflowClient(uri)
    run = client.get_run(parent)
    assert run.info.status == "RUNNING" and run.data.tags[tracking.PIPELINE_TAG] == "true"
    assert run.data.tags[tracking.HOST_TAG] and run.data.tags[tracking.PID_TAG] == pid
    nxt = tracking.start_pipeline_run("pipe-test", "pipeline: next", tracking_uri=uri)
    run = client.get_run(parent)
    assert run.info.status == "KILLED"
    assert f"process {pid}" in run.data.tags[tracking.END_REASON_TAG]
    assert client.get_run(nxt).info.status == "RUNNING"  # this process is alive: its own parent is left alone


def _child(uri, store, parent, name, value, seed, mmeb, status="success"):
    logger = tracking.make_mlflow_logger("grid", tracking_uri=uri, output_dir=store, run_name=name,
                                         parent_run_id=parent)
    tracking.log_config(logger, {"backbone": {"finetune": {"lora_r": value}}, "seed": seed},
                        experiment=f"ablation_lora_r{value}")
    logger.log_metrics({"val/mmeb/overall": mmeb, "train/loss": 1.0 / value}, step=2)
    logger.finalize(status)
    return logger.run_id


def test_sweep_parent_is_named_tagged_and_ended_by_its_jobs(tmp_path):
    """What the MLflow UI shows of a 2-point sweep with 2 seeds, then of a sweep whose second point failed."""
    from mlflow.tracking import MlflowClient

    store = tmp_path / "store"
    uri = fresh_sqlite_uri(store)
    client = MlflowClient(uri)
    param = "backbone.finetune.lora_r"
    parent = tracking.start_sweep("grid", tmp_path / "sweep1", {"+exp": ["ablation_lora_r8", "ablation_lora_r16"],
                                                                 "seed": ["0", "1"]}, num_jobs=4,
                                  tracking_uri=uri, output_dir=store)
    assert client.get_run(parent).info.run_name.startswith("ablation_lora_r: +exp \u2208 {ablation_lora_r16, ")
    # Values made up; seeds differ by 2 points.
    scores = {(8, 0): 20.0, (8, 1): 22.0, (16, 0): 25.0, (16, 1): 27.0}
    for job, ((value, seed), mmeb) in enumerate(scores.items()):
        name = tracking.sweep_point_name(param, value, seed)
        run_id = _child(uri, store, parent, name, value, seed, mmeb)
        tracking.record_sweep_job(parent, job, name, value, "COMPLETED", uri, f"ablation_lora_r{value}", run_id)
        status = tracking.update_sweep_parent(parent, param, ["val/mmeb/overall", "train/loss"], uri)
        assert status == ("FINISHED" if job == 3 else "RUNNING")  # ends with its last job
    run = client.get_run(parent)
    assert run.info.run_name == "ablation_lora_r: backbone.finetune.lora_r \u2208 {8, 16}"
    assert run.data.tags[tracking.SWEEP_PARAM_TAG] == param and run.data.tags[tracking.SWEEP_VALUES_TAG] == "8, 16"
    assert run.data.tags[tracking.SWEEP_FAILED_TAG] == "none"
    assert run.data.metrics["best/val/mmeb/overall"] == 26.0  # mean of the two seeds of lora_r=16
    names = sorted(c.info.run_name for c in tracking.child_runs(client, parent))
    assert names == ["lora_r=16 seed=0", "lora_r=16 seed=1", "lora_r=8 seed=0", "lora_r=8 seed=1"]
    md = Path(client.download_artifacts(parent, "sweep_summary/summary.md", str(tmp_path))).read_text()
    assert "| 8 | 2 | 21.00 ± 1.41 | 0.12 ± 0.00 |" in md and "| 16 | 2 | 26.00 ± 1.41 | 0.06 ± 0.00 |" in md
    table = json.loads(Path(client.download_artifacts(parent, "sweep_summary/points.json", str(tmp_path))).read_text())
    assert table["columns"][:3] == [param, "runs", "val/mmeb/overall"]
    assert [row[:3] for row in table["data"]] == [[8, 2, 21.0], [16, 2, 26.0]]
    assert {a.path for a in client.list_artifacts(parent, "sweep_summary")} >= {"sweep_summary/summary.png"}

    # A sweep whose second point failed before it could log anything: the parent ends FAILED and says which.
    parent = tracking.start_sweep("grid", tmp_path / "sweep2", {"+exp": ["ablation_lora_r8", "ablation_lora_r16"]},
                                  num_jobs=2, tracking_uri=uri, output_dir=store)
    run_id = _child(uri, store, parent, "lora_r=8 seed=0", 8, 0, 20.0)
    tracking.record_sweep_job(parent, 0, "lora_r=8 seed=0", 8, "COMPLETED", uri, "ablation_lora_r8", run_id)
    tracking.update_sweep_parent(parent, param, ["val/mmeb/overall"], uri)
    tracking.record_sweep_job(parent, 1, "lora_r=16 seed=0", 16, "FAILED", uri, "ablation_lora_r16",
                              error="ValueError: r must be > 0")
    assert tracking.update_sweep_parent(parent, param, ["val/mmeb/overall"], uri) == "FAILED"
    run = client.get_run(parent)
    assert run.info.status == "FAILED"
    assert run.info.run_name == "ablation_lora_r: backbone.finetune.lora_r \u2208 {8, 16}"
    assert run.data.tags[tracking.SWEEP_FAILED_TAG] == "lora_r=16 seed=0 (ValueError: r must be > 0)"
    md = Path(client.download_artifacts(parent, "sweep_summary/summary.md", str(tmp_path / "b"))).read_text()
    assert "Failed points: lora_r=16 seed=0 (ValueError: r must be > 0)" in md


def test_swept_param_and_names():
    assert tracking.resolve_swept_param(None, ["+exp", "data.batch_size"]) == "data.batch_size"
    assert tracking.resolve_swept_param(None, ["+exp"]) == "exp_name"
    assert tracking.resolve_swept_param(None, ["seed"]) == "seed"
    assert tracking.resolve_swept_param("backbone.vtc_factor", ["+exp"]) == "backbone.vtc_factor"
    assert tracking.sweep_name(["ablation_hn0", "ablation_hn12", "ablation_hn4"]) == "ablation_hn"
    assert tracking.sweep_name(["quickstart"]) == "quickstart" and tracking.sweep_name([]) == "sweep"
    assert tracking.sweep_point_name("backbone.finetune.lora_r", 8, 0) == "lora_r=8 seed=0"
