"""The Hydra sweep callback in the launching process: swept keys, job count and the parent run made up front."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from mmembed import tracking
from mmembed.launch.sweep import MLflowSweepCallback, swept_overrides

from .test_tracking import fresh_sqlite_uri


def test_on_multirun_start_names_the_parent_for_the_sweep(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = fresh_sqlite_uri(tmp_path / "logs")
    GlobalHydra.instance().clear()
    with initialize(version_base="1.3", config_path="../experiments/configs"):
        cfg = compose("run", overrides=[f"logger.tracking_uri={uri}", f"logger.output_dir={tmp_path}/logs",
                                        f"hydra.sweep.dir={tmp_path}/sweep"], return_hydra_config=True)
        with open_dict(cfg):  # what `run.py -m '+exp=glob(ablation_lora_r*)' seed=0,1 synth.size=ci` passes
            cfg.hydra.overrides.task = ["+exp=glob(ablation_lora_r*)", "seed=0,1", "synth.size=ci"]
        swept, jobs = swept_overrides(cfg)
        assert swept == {"+exp": ["ablation_lora_r16", "ablation_lora_r32", "ablation_lora_r8"], "seed": ["0", "1"]}
        assert jobs == 6
        MLflowSweepCallback().on_multirun_start(cfg)  # resolves the logger's paths (${hydra:...}) itself
    client = MlflowClient(uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("mmembed").experiment_id])
    assert parent.info.run_name == ("ablation_lora_r: +exp \u2208 {ablation_lora_r16, ablation_lora_r32, "
                                    "ablation_lora_r8}; seed \u2208 {0, 1} \u2026")
    assert parent.data.tags[tracking.SWEEP_JOBS_TAG] == "6" and parent.data.tags[tracking.SWEEP_KEYS_TAG] == "+exp,seed"
    assert parent.data.tags[tracking.SWEEP_DIR_TAG] == str(Path(tmp_path / "sweep").resolve())
    assert parent.info.status == "RUNNING"
