"""``task=judge`` through the Hydra entry point's code: curation with a kit-saved judge folder, the curated shards,
and the summary logged to MLflow as its own run; the one hard-negative value feeds curation and the DataModule."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import open_dict

from tests.test_configs import _compose
from tests.test_curate import _write

ROOT = Path(__file__).resolve().parents[1]


def test_hard_negatives_is_one_value(tmp_path):
    cfg = _compose(tmp_path, ["+exp=stage3_judge_ft", "judge.checkpoint=/stage2", "judge.model=/judge"])
    assert cfg.task == "judge_ft" and cfg.hard_negatives == 12
    assert cfg.judge.max_negatives == cfg.data.num_hard_negatives == 12 and cfg.judge.k == 20
    assert cfg.judge.checkpoint == "/stage2"
    cfg = _compose(tmp_path, ["hard_negatives=4"])
    assert cfg.judge.max_negatives == cfg.data.num_hard_negatives == 4


@pytest.mark.parametrize("exp", ["stage2_hnm", "stage3_judge_ft"])
def test_hard_negatives_on_the_command_line_reaches_every_reader(tmp_path, exp):
    """``hard_negatives=4 +exp=...`` changes every count of hard negatives the run reads: mining (stage 2), curation
    (stage 3) and the DataModule, down to the objects the tasks build (it was once silently ignored by stage 2)."""
    from mmembed.backbone import build_input_builder
    from mmembed.launch.config import instantiate
    from mmembed.launch.tasks import judge_settings, mining_settings

    default = _compose(tmp_path, [f"+exp={exp}"])
    cfg = _compose(tmp_path, [f"+exp={exp}", "hard_negatives=4"])
    assert default.hard_negatives != 4 and cfg.hard_negatives == 4
    assert cfg.mining.n == cfg.judge.max_negatives == cfg.data.num_hard_negatives == 4
    assert mining_settings(cfg).arguments()["n"] == 4
    assert judge_settings(cfg).arguments()["max_negatives"] == 4
    dm = instantiate(cfg.data, input_builder=build_input_builder("tiny"))
    assert dm.num_hard_negatives == 4 and dm.make_collate().num_hard_negatives == 4


@pytest.mark.slow  # ~30 s: saves a judge folder, creates an MLflow store, retrieves and judges
def test_task_judge_curates_and_logs_to_mlflow(tmp_path):
    from mmembed import Embedder
    from mmembed.launch import tasks, validate

    judge_dir = Embedder.from_pretrained("tiny", device="cpu").save_pretrained(tmp_path / "judge_model")
    shards = _write(tmp_path)
    cfg = _compose(tmp_path, ["task=judge", f"judge.model={judge_dir}", f"data.train_shards={shards}",
                              "judge.k=4", "hard_negatives=2", "judge.batch_size=4"])
    validate(cfg)
    out = tasks.judge(cfg)
    assert len(list(out.glob("*.tar"))) == 2
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{Path(cfg.paths.log_dir) / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(cfg.logger.experiment_name).experiment_id])
    (r,) = [x for x in runs if x.info.run_name == "default/curation"]
    assert r.data.metrics["totals/queries"] == 10 and r.data.metrics["n"] == 2
    assert r.data.params["judge.strategy"] == "judge" and r.data.params["hard_negatives"] == "2"
    assert {a.path for a in client.list_artifacts(r.info.run_id)} == {"summary.json", "manifest.jsonl"}

    with open_dict(cfg):
        cfg.judge.model = "/no/such/judge"
    with pytest.raises(SystemExit, match="judge.model=/no/such/judge is not a folder"):
        validate(cfg)
