"""The Hydra entry point (contract): ``python experiments/run.py +exp=NAME key=value``.

Tasks (``task=``): ``train`` (fit the configured module, evaluate before/after through the callbacks, save the
Embedder), ``mine`` (global hard-negative mining of ``mining.shards``), ``hnm`` (mine with ``mining.checkpoint``,
then train on the mined shards, starting from that same warm-up model), ``eval`` (evaluate the backbone's model on the
configured eval callbacks' sets), ``judge`` (stage-3 retrieve-and-judge curation of ``judge.shards``),
``judge_ft`` (curate, then train on the curated shards), ``pipeline`` (the paper's stage graph).

Every run starts from ``init_from`` when set (an exported model folder; else the backbone preset). A task that needs
an earlier stage and is not given it (``task=hnm`` without ``mining.checkpoint``) builds or reuses that stage in the
content-keyed stage store (``pipeline.store``) first.

This file only composes the config; the work is library code in ``mmembed.launch`` (checks, tasks, the stage table,
the sweep callback), where ``from mmembed.launch import validate, run_task`` reaches it from tests and scripts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@hydra.main(version_base="1.3", config_path="configs", config_name="run")
def main(cfg: DictConfig):
    from mmembed.launch import main as launch

    return launch(cfg)


if __name__ == "__main__":
    from mmembed.launch.config import ConfigError
    from mmembed.launch.preflight import check_overrides

    try:  # an unknown key or +exp as one line, before Hydra's multi-line report
        check_overrides(sys.argv[1:], Path(__file__).resolve().parent / "configs")
    except ConfigError as e:
        print(f"config error: {e.msg}", file=sys.stderr)
        raise SystemExit(2) from None
    main()
