"""The Hydra entry point (contract): ``python experiments/run.py +exp=NAME key=value``.

Tasks (``task=``): ``train`` (fit the configured module, evaluate before/after through the callbacks, save the
Embedder), ``mine`` (global hard-negative mining of ``mining.shards``), ``hnm`` (mine with ``mining.checkpoint``,
then train on the mined shards), ``eval`` (evaluate the backbone's model on the configured eval callbacks' sets).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # datamodules/ and callbacks/ live next to mmembed/ (also installed by pip -e .)
    sys.path.insert(0, str(ROOT))

TASKS = ("train", "mine", "hnm", "eval")


def instantiate(cfg, **kwargs):
    """``hydra.utils.instantiate`` passing plain dicts/lists (not DictConfig) to constructors, so that what modules
    save as hyper-parameters loads with torch's safe (weights-only) checkpoint loader on resume."""
    return hydra.utils.instantiate(cfg, _convert_="all", **kwargs)


class ConfigError(SystemExit):
    """A misconfiguration: printed as one line, exit code 2."""

    def __init__(self, msg: str) -> None:
        super().__init__(2)
        self.msg = msg

    def __str__(self) -> str:
        return self.msg


def validate(cfg: DictConfig) -> None:
    """Check the composed config before anything heavy starts; raise ``ConfigError`` with the fix."""
    if cfg.task not in TASKS:
        raise ConfigError(f"task={cfg.task!r} is not one of {TASKS}; e.g. task=train")
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        raise ConfigError(f"config value {key or ''} is missing or invalid ({type(e).__name__}: "
                          f"{str(e).splitlines()[0]}); set it on the command line, e.g. {key or 'key'}=...") from None
    mc = cfg.module
    if mc.get("gradcache_chunk_size") and cfg.trainer.get("gradient_clip_val"):
        # Lightning refuses automatic clipping with manual optimisation; GradCache clips in the module instead.
        OmegaConf.update(cfg, "module.gradient_clip_val", cfg.trainer.gradient_clip_val)
        OmegaConf.update(cfg, "trainer.gradient_clip_val", None)
    if cfg.data.get("num_hard_negatives", 0) < 0:
        raise ConfigError("data.num_hard_negatives must be >= 0")
    if cfg.task == "hnm" and not cfg.mining.checkpoint:
        raise ConfigError("task=hnm needs mining.checkpoint=<embedder folder> (e.g. the stage2_warmup run's embedder)")
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} does not exist; point at <run>/checkpoints/last.ckpt")
    if cfg.mining.checkpoint and not Path(cfg.mining.checkpoint).is_dir():
        raise ConfigError(f"mining.checkpoint={cfg.mining.checkpoint} is not a folder; train stage2_warmup first")


def ensure_synthetic_world(cfg: DictConfig) -> None:
    """Generate the synthetic world when the configured data points into it and it does not exist yet."""
    root = Path(cfg.synth.dir)
    uses_synth = str(root) in str(cfg.data.get("train_shards", "")) or any(
        str(root) in str(c.get("data", "")) for c in (cfg.get("callbacks") or {}).values() if c)
    if not uses_synth or (root / "manifest.json").is_file():
        return
    from mmembed.data.synth import generate

    print(f"generating the synthetic world ({cfg.synth.size}, seed {cfg.synth.seed}) into {root} ...")
    generate(root, seed=cfg.synth.seed, size=cfg.synth.size, overwrite=True)


def _logger(cfg: DictConfig):
    if not cfg.get("logger"):
        return None
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    kw: dict[str, Any] = {}
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        kw["sweep_dir"] = hc.sweep.dir
    return instantiate(cfg.logger, **kw)


def _callbacks(cfg: DictConfig, has_logger: bool = True) -> list:
    out = []
    for name, c in (cfg.get("callbacks") or {}).items():
        if not c or "_target_" not in c:
            continue
        if not has_logger and c._target_.endswith("LearningRateMonitor"):
            print(f"note: callbacks.{name} (LearningRateMonitor) needs a logger; skipped with logger=none")
            continue
        out.append(instantiate(c))
    return out


def _swept_param(cfg: DictConfig) -> str | None:
    if cfg.sweep.param:
        return cfg.sweep.param
    from hydra.core.hydra_config import HydraConfig

    for o in HydraConfig.get().overrides.task:
        key = o.split("=", 1)[0].lstrip("+~")
        if key != "exp":
            return key
    return "exp_name"


def train(cfg: DictConfig, train_shards: str | None = None) -> dict[str, float]:
    """Fit the module; returns the final callback metrics."""
    import lightning as L
    import torch

    from mmembed.tracking import log_config

    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    backbone = instantiate(cfg.backbone)
    module = instantiate(cfg.module, backbone=backbone)
    data_kw = {"train_shards": train_shards} if train_shards else {}
    datamodule = instantiate(cfg.data, **data_kw)
    logger = _logger(cfg)
    callbacks = _callbacks(cfg, has_logger=logger is not None)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger or False)
    if logger is not None and trainer.is_global_zero:
        log_config(logger, OmegaConf.to_container(cfg, resolve=True), experiment=cfg.exp_name)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics["time/fit_s"] = time.perf_counter() - t0
    if trainer.is_global_zero:
        if cfg.save_embedder:
            # A reranker run exports the reranker (same folder layout, loads with Reranker.from_pretrained).
            what = "reranker" if callable(getattr(module, "reranker", None)) else "embedder"
            model = module.reranker() if what == "reranker" else module.embedder()
            path = model.save_pretrained(Path(cfg.paths.output_dir) / what)
            print(f"{what} saved to {path}")
            if logger is not None:
                logger.experiment.log_param(logger.run_id, f"{what}_path", str(path))
        if logger is not None:
            logger.log_metrics({"time/fit_s": metrics["time/fit_s"]})
            _summarize_if_sweep(cfg, logger)
        rows = before_after(callbacks)
        print_results(rows)
        print(f"fit took {metrics['time/fit_s']:.1f}s; outputs in {cfg.paths.output_dir}; MLflow UI: "
              f"mlflow ui --backend-store-uri sqlite:///{Path(cfg.paths.log_dir) / 'mlflow.db'}")
    return metrics


def _summarize_if_sweep(cfg: DictConfig, logger) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from mmembed.tracking import PARENT_RUN_TAG, summarize_sweep

    if HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    run = logger.experiment.get_run(logger.run_id)
    parent = run.data.tags.get(PARENT_RUN_TAG)
    if parent:  # every job refreshes the parent's summary; the last one sees all children
        summarize_sweep(parent, _swept_param(cfg), metrics=list(cfg.sweep.metrics), tracking_uri=logger._tracking_uri)


def before_after(callbacks: list) -> dict[str, tuple[float | None, float]]:
    """``{metric: (before, after)}`` from the eval callbacks' histories (before = the ``start`` evaluation)."""
    out: dict[str, tuple[float | None, float]] = {}
    for cb in callbacks:
        hist = getattr(cb, "history", None)
        if not hist:
            continue
        first = hist[0]["metrics"] if hist[0]["when"] == "start" else {}
        for k, v in hist[-1]["metrics"].items():
            out[k] = (first.get(k), v)
    return out


def print_results(rows: dict[str, tuple[float | None, float]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="results (before = untrained, after = end of training)")
    for col in ("metric", "before", "after"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for k in sorted(rows):
        before, after = rows[k]
        table.add_row(k, "-" if before is None else f"{before:.2f}", f"{after:.2f}")
    Console().print(table)


def mine(cfg: DictConfig, checkpoint: str | None = None) -> Path:
    """Mine hard negatives for ``mining.shards``; returns the folder of mined shards."""
    from mmembed import Embedder
    from mmembed.mining.mine import mine_hard_negatives

    ckpt = checkpoint or cfg.mining.checkpoint
    if ckpt:
        embedder = Embedder.from_pretrained(ckpt)
    else:
        b = cfg.backbone
        embedder = Embedder.from_pretrained(b.name_or_path, vtc_factor=b.vtc_factor, vtc_placement=b.vtc_placement,
                                            tile_policy=OmegaConf.to_container(cfg.data.tile_policy), seed=cfg.seed)
    m = cfg.mining
    summary = mine_hard_negatives(embedder, m.shards, m.out_dir, strategy=m.strategy, window=tuple(m.window), n=m.n,
                                  k=m.k, seed=cfg.seed, batch_size=m.batch_size)
    print(f"mined shards in {m.out_dir}/shards ({summary})")
    return Path(m.out_dir) / "shards"


@hydra.main(version_base="1.3", config_path="configs", config_name="run")
def main(cfg: DictConfig) -> dict[str, float] | None:
    try:
        validate(cfg)
    except ConfigError as e:
        print(f"config error: {e.msg}", file=sys.stderr)
        raise
    ensure_synthetic_world(cfg)
    if cfg.task == "train":
        return train(cfg)
    if cfg.task == "mine":
        mine(cfg)
        return None
    if cfg.task == "hnm":
        shards = mine(cfg)
        return train(cfg, train_shards=str(shards / "*.tar"))
    # task == eval: run the eval callbacks' runners once on the configured (untrained or loaded) model
    backbone = instantiate(cfg.backbone)
    module = instantiate(cfg.module, backbone=backbone)
    rows = {}
    for cb in _callbacks(cfg):
        if hasattr(cb, "evaluate"):
            result = cb.evaluate(module.embedder(), Path(cfg.paths.output_dir) / "eval" / cb.benchmark, {})
            rows.update(result.flat(cb.prefix))
    print_results({k: (v, v) for k, v in rows.items()})
    return rows

if __name__ == "__main__":
    main()
