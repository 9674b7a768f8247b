"""One composed config to one task: check it, resolve the inputs a task was not given, run the task.

:func:`main` is what ``experiments/run.py`` calls inside ``@hydra.main``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mmembed.launch import tasks
from mmembed.launch.config import ConfigError, validate


def resolve_inputs(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` whose inputs are all set: the one place a run's config is rewritten, and why.

    * ``task=hnm`` without ``mining.checkpoint``: the warm-up model, built or reused in the stage store.
    * ``task=judge|judge_ft`` without ``judge.checkpoint``: the stage-2 (HNM) model; with ``judge.strategy=judge``
      and no ``judge.model``: the kit's stage-1 model as the judge. ``judge_ft`` continues the stage-2 model.
    * ``init_from`` (an exported folder) becomes the backbone's ``name_or_path``: the run starts from it, and a fresh
      LoRA adapter (``backbone.finetune``) is put on the merged weights it holds.
    """
    from mmembed.launch.stages import prerequisite

    cfg = cfg.copy()
    if cfg.task == "hnm" and not cfg.mining.checkpoint:
        warmup = prerequisite(cfg, "warmup")
        OmegaConf.update(cfg, "mining.checkpoint", str(warmup.output("model")))
        print(f"mining with and continuing from the warm-up model {cfg.mining.checkpoint}")
    if cfg.task in ("judge", "judge_ft"):
        if not cfg.judge.checkpoint:
            hnm = prerequisite(cfg, "hnm")
            OmegaConf.update(cfg, "judge.checkpoint", str(hnm.output("model")))
            print(f"retrieving with the stage-2 model {cfg.judge.checkpoint}")
        if cfg.judge.strategy == "judge" and not cfg.judge.model:
            stage1 = prerequisite(cfg, "stage1")
            OmegaConf.update(cfg, "judge.model", str(stage1.output("model")))
            print(f"judging with the stage-1 model {cfg.judge.model}")
        if cfg.task == "judge_ft" and not cfg.get("init_from"):
            OmegaConf.update(cfg, "init_from", str(cfg.judge.checkpoint))  # stage 3 continues the stage-2 model
    if cfg.get("init_from"):
        OmegaConf.update(cfg, "backbone.name_or_path", str(cfg.init_from))
    return cfg


def run_task(cfg: DictConfig) -> Any:
    """Run the configured task on a validated config."""
    tasks.ensure_synthetic_world(cfg)
    if cfg.task == "pipeline":
        from mmembed.launch.summary import run_pipeline

        return run_pipeline(cfg)
    cfg = resolve_inputs(cfg)
    if cfg.task == "train":
        return tasks.train(cfg)
    if cfg.task == "mine":
        tasks.mine(cfg)
        return None
    if cfg.task == "hnm":
        return tasks.train(cfg, train_shards=str(tasks.mine(cfg) / "*.tar"))
    if cfg.task == "judge":
        tasks.judge(cfg)
        return None
    if cfg.task == "judge_ft":
        return tasks.train(cfg, train_shards=str(tasks.judge(cfg) / "*.tar"))
    return tasks.evaluate(cfg)


def main(cfg: DictConfig) -> Any:
    """Validate, then run the task; configuration and user errors end with one line (``HYDRA_FULL_ERROR=1`` shows
    the traceback of the latter)."""
    from mmembed.errors import USER_ERRORS, one_line
    from mmembed.logs import quiet_logs

    quiet_logs()  # each log line once (Hydra's format), third-party noise dropped at its source
    try:
        validate(cfg)
        return run_task(cfg)
    except ConfigError as e:
        print(f"config error: {e.msg}", file=sys.stderr)
        raise
    except USER_ERRORS as e:
        # Run-time failures (an empty shard glob, samples_per_epoch too small, an unreachable MLflow server) end
        # with one line; Hydra would print a stripped traceback instead.
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {one_line(e)} (HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(1) from None
