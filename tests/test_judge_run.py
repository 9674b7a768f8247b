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


def test_simulated_judge_and_margin_settings_are_checked(tmp_path):
    from mmembed.judge import SIMULATED_LABEL, SimulatedJudge
    from mmembed.launch import ConfigError, validate
    from mmembed.launch.tasks import judge_settings, make_judge

    base = ["task=judge", f"judge.checkpoint={tmp_path}", "data.train_shards=/x/*.tar"]
    cfg = _compose(tmp_path, [*base, "judge.model=simulated", "judge.recall=0.8", "judge.false_yes_rate=0.1"])
    validate(cfg)  # "simulated" is not a folder, and needs none
    j = make_judge(judge_settings(cfg), seed=3)
    assert isinstance(j, SimulatedJudge) and (j.recall, j.false_yes_rate, j.seed) == (0.8, 0.1, 3)
    assert j.label == SIMULATED_LABEL
    assert make_judge(judge_settings(_compose(tmp_path, base)), seed=0) is None  # no judge.model, no judge
    validate(_compose(tmp_path, [*base, "judge.strategy=margin", "judge.margin=0.1"]))
    for bad, msg in ((["judge.model=simulated", "judge.recall=1.5"], r"judge.recall=1.5 must be within \[0, 1\]"),
                     (["judge.model=simulated", "judge.false_yes_rate=0.7"], "false_yes_rate=0.7"),
                     (["judge.strategy=margin", "judge.margin=-0.1"], "judge.margin=-0.1 must be >= 0"),
                     (["judge.strategy=best"], r"must be one of \('judge', 'rule', 'margin'\)")):
        with pytest.raises(ConfigError, match=msg):
            validate(_compose(tmp_path, [*base, *bad]))


@pytest.mark.slow  # ~30 s: an MLflow store, retrieval with the tiny embedder
def test_task_judge_with_the_simulated_judge_names_it_in_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    from mmembed import Embedder
    from mmembed.judge import SIMULATED_LABEL
    from mmembed.launch import tasks, validate

    checkpoint = Embedder.from_pretrained("tiny", device="cpu").save_pretrained(tmp_path / "stage2")
    cfg = _compose(tmp_path, ["task=judge", "judge.model=simulated", f"judge.checkpoint={checkpoint}",
                              f"data.train_shards={_write(tmp_path)}", "judge.k=4", "hard_negatives=2"])
    validate(cfg)
    tasks.judge(cfg)
    summary = (Path(cfg.judge.out_dir) / "summary.json").read_text()
    assert f'"judge": "{SIMULATED_LABEL}"' in summary
    client = MlflowClient(tracking_uri=f"sqlite:///{Path(cfg.paths.log_dir) / 'mlflow.db'}")
    (r,) = client.search_runs([client.get_experiment_by_name(cfg.logger.experiment_name).experiment_id])
    assert r.info.run_name == f"default/curation ({SIMULATED_LABEL})"
    assert r.data.tags["mmembed.judge"] == SIMULATED_LABEL and r.data.params["judge.model"] == "simulated"
    assert r.data.params["judge.recall"] == "0.9" and "totals/fn_negative_margin" in r.data.metrics
