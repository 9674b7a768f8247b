"""MLflow helpers on a sqlite store in tmp_path: config as params/tags/YAML, parent/child sweeps, the sweep summary.

A fresh ``mlflow.db`` costs several seconds of schema migrations on this machine, so :func:`fresh_sqlite_uri` builds
the empty schema once per MLflow version (in the temp folder) and copies it for every test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
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
    assert "| hn16 | 16 | 63.50 | 69.00 |" in md.replace(f"| {children[2]} ", "")
    # The parent also carries the curve as metric history, step = swept value.
    history = client.get_metric_history(parent, "val/mmeb/overall")
    assert sorted((m.step, m.value) for m in history) == [(0, 55.0), (8, 61.0), (16, 63.5)]
    # reduce="max" reads the whole history (here the last values are also the maxima); summarizing again (every
    # job of a sweep does) adds no duplicate points to the parent's curve.
    assert list(tracking.summarize_sweep(parent, "data.num_negatives", ["val/mmeb/overall"], uri, reduce="max")[
        "val/mmeb/overall"]) == [55.0, 61.0, 63.5]
    assert len(client.get_metric_history(parent, "val/mmeb/overall")) == 3
    # A job that has not logged its config yet is left out, with a warning.
    tracking.make_mlflow_logger("sweep-test", tracking_uri=uri, output_dir=store, run_name="late",
                                parent_run_id=parent).log_metrics({"val/mmeb/overall": 1.0})
    with pytest.warns(UserWarning, match="late"):
        assert len(tracking.summarize_sweep(parent, "data.num_negatives", tracking_uri=uri)) == 3
    with pytest.raises(ValueError, match="has a param .data.not_swept."):
        tracking.summarize_sweep(parent, "data.not_swept", tracking_uri=uri)
