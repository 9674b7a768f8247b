"""Checks of a composed run config, before anything heavy starts. They read the config and change nothing.

Every problem is a :class:`ConfigError`: one line that names the key and the fix, exit status 2.
"""

from __future__ import annotations

import numbers
import typing
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

TASKS = ("train", "mine", "hnm", "eval", "judge", "judge_ft", "pipeline")
#: Lightning's accelerator names (``Trainer(accelerator=...)``), listed here so the check needs no Lightning import.
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu", "xla")
#: Integer settings of the eval callbacks (``callbacks.<name>.<key>``), at least 1 when set.
EVAL_INTS = ("max_queries", "batch_size", "every_n_epochs", "every_n_steps", "n", "max_new_tokens")


def instantiate(cfg: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` passing plain dicts/lists (not DictConfig) to constructors, so that what modules
    save as hyper-parameters loads with torch's safe (weights-only) checkpoint loader on resume."""
    import hydra

    return hydra.utils.instantiate(cfg, _convert_="all", **kwargs)


class ConfigError(SystemExit):
    """A misconfiguration: printed as one line, exit code 2."""

    def __init__(self, msg: str) -> None:
        super().__init__(2)
        self.msg = msg

    def __str__(self) -> str:
        return self.msg


@dataclass
class RunSchema:
    """Types of the primary config's scalar fields (a structured-config schema, checked at composition)."""

    task: str = "train"
    exp_name: str = "default"
    seed: int = 0
    save_embedder: bool = True
    ckpt_path: str | None = None
    hard_negatives: int = 0


@dataclass
class TrainerSchema:
    """Types of the ``lightning.Trainer`` arguments the configs and users set (others pass unchecked)."""

    max_epochs: int | None = None
    min_epochs: int | None = None
    max_steps: int = -1
    min_steps: int | None = None
    limit_train_batches: float | None = None
    limit_val_batches: float | None = None
    val_check_interval: float | None = None
    check_val_every_n_epoch: int | None = None
    num_sanity_val_steps: int | None = None
    log_every_n_steps: int | None = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    num_nodes: int = 1
    enable_checkpointing: bool | None = None
    enable_progress_bar: bool | None = None
    enable_model_summary: bool | None = None
    use_distributed_sampler: bool = True
    deterministic: bool | None = None
    benchmark: bool | None = None
    fast_dev_run: bool | None = None


@dataclass
class DataSchema:
    """Types of the DataModule's counting fields (both data configs have them)."""

    batch_size: int = 16
    num_hard_negatives: int = 0
    num_workers: int = 0
    shuffle_buffer: int = 0
    samples_per_epoch: int | None = None


_SCHEMAS = (("", RunSchema), ("trainer", TrainerSchema), ("data", DataSchema))


def check_types(cfg: DictConfig) -> None:
    """Check the typed fields against their schemas (OmegaConf converts "5" to 5 and refuses "abc" for an int).

    Raises:
        ConfigError: Naming the key, its value and the type it needs.
    """
    for prefix, schema in _SCHEMAS:
        node = cfg.get(prefix) if prefix else cfg
        if node is None:
            continue
        typed = OmegaConf.structured(schema)
        for f in fields(schema):
            if f.name not in node:
                continue
            key = f"{prefix}.{f.name}" if prefix else f.name
            value = None
            try:
                value = OmegaConf.select(cfg, key, throw_on_missing=False)
                typed[f.name] = value
            except OmegaConfBaseException as e:
                want = getattr(f.type, "__name__", str(f.type)).replace("None", "null")
                raise ConfigError(f"{key}={value!r} is not a valid {want} ({str(e).splitlines()[0]}); "
                                  f"e.g. {key}={getattr(schema(), f.name)}") from None


def _judge_strategies() -> tuple[str, ...]:
    from mmembed.judge.curate import CurationStrategy

    return typing.get_args(CurationStrategy)


def validate(cfg: DictConfig) -> None:
    """Check the composed config before anything heavy starts; raise :class:`ConfigError` with the fix.

    Reads only: the config is the same afterwards (what a task derives from it, it derives where it runs).
    """
    if cfg.task not in TASKS:
        raise ConfigError(f"task={cfg.task!r} is not one of {TASKS}; e.g. task=train")
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        raise ConfigError(f"config value {key or ''} is missing or invalid ({type(e).__name__}: "
                          f"{str(e).splitlines()[0]}); set it on the command line, e.g. {key or 'key'}=...") from None
    check_types(cfg)
    check_values(cfg)
    if cfg.get("hard_negatives", 0) < 0:
        raise ConfigError(f"hard_negatives={cfg.hard_negatives} must be >= 0; e.g. hard_negatives=2")
    if cfg.data.get("num_hard_negatives", 0) < 0:
        raise ConfigError("data.num_hard_negatives must be >= 0")
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} does not exist; point at <run>/checkpoints/last.ckpt")
    if cfg.task in ("mine", "hnm") and cfg.mining.strategy == "window" and cfg.mining.n < 1:
        raise ConfigError(f"mining.n={cfg.mining.n} (from hard_negatives={cfg.get('hard_negatives')}): mining needs "
                          "at least one negative per query; e.g. hard_negatives=2 (paper)")
    if cfg.task in ("judge", "judge_ft"):
        j = cfg.judge
        strategies = _judge_strategies()
        if j.strategy not in strategies:
            raise ConfigError(f"judge.strategy={j.strategy!r} must be one of {strategies}")
        if j.margin < 0:
            raise ConfigError(f"judge.margin={j.margin} must be >= 0 (a retrieval-score difference)")
        if j.model == "simulated":  # the simulated expert judge (synthetic world only): its settings checked here
            from mmembed.judge.simulated import SimulatedJudge

            try:
                SimulatedJudge(recall=j.recall, false_yes_rate=j.false_yes_rate)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        # judge.model / judge.checkpoint left null are built on demand (mmembed.launch.runner.resolve_inputs): the
        # kit's stage-1 model and the stage-2 model, from the stage store
        for key in ("model", "checkpoint"):
            if j[key] and not (key == "model" and j[key] == "simulated") and not Path(j[key]).is_dir():
                raise ConfigError(f"judge.{key}={j[key]} is not a folder")
    if cfg.mining.checkpoint and not Path(cfg.mining.checkpoint).is_dir():
        raise ConfigError(f"mining.checkpoint={cfg.mining.checkpoint} is not a folder; train stage2_warmup first "
                          "(or leave it unset: the warm-up is then built or reused automatically)")
    if cfg.get("init_from") and not (Path(cfg.init_from) / "config.json").is_file():
        raise ConfigError(f"init_from={cfg.init_from} is not an exported model folder (no config.json); point at "
                          "<run>/embedder or leave it null to start from the backbone preset")
    uri = (cfg.get("logger") or {}).get("tracking_uri")
    if uri:  # before any data is generated: a server that is down fails here, in seconds
        from mmembed.tracking import check_server

        try:
            check_server(str(uri))
        except ConnectionError as e:
            raise ConfigError(f"logger.tracking_uri: {e}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_values(cfg: DictConfig) -> None:
    """Values that would otherwise fail only after the data work (or deep inside a constructor): the learning rate,
    batch sizes, the model and checkpoint paths, the accelerator and the eval callbacks' counts.

    Raises:
        ConfigError: Naming the key, its value and an example of a valid one.
    """
    lr = OmegaConf.select(cfg, "module.optimizer.lr", default=None)
    if lr is not None and (not isinstance(lr, numbers.Real) or isinstance(lr, bool) or not lr > 0):
        raise ConfigError(f"module.optimizer.lr={lr!r} must be a positive number; e.g. module.optimizer.lr=2e-4")
    for key in ("data.batch_size", "mining.batch_size", "judge.batch_size", "judge.embed_batch_size"):
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and (not _is_int(value) or value < 1):
            raise ConfigError(f"{key}={value!r} must be a whole number >= 1; e.g. {key}=8")
    check_model_path(OmegaConf.select(cfg, "backbone.name_or_path", default=None))
    if cfg.get("ckpt_path") and Path(cfg.ckpt_path).is_file() and not zipfile.is_zipfile(cfg.ckpt_path):
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} is not a Lightning checkpoint (not a torch zip archive); point "
                          "at <run>/checkpoints/last.ckpt")
    accelerator = OmegaConf.select(cfg, "trainer.accelerator", default=None)
    if accelerator is not None and not (isinstance(accelerator, str) and accelerator in ACCELERATORS):
        raise ConfigError(f"trainer.accelerator={accelerator!r} is not one of {ACCELERATORS}; e.g. "
                          "trainer.accelerator=cpu (or trainer=gpu)")
    for name, c in (cfg.get("callbacks") or {}).items():
        if not c or not str(c.get("_target_", "")).startswith("mmembed.callbacks."):
            continue
        for key in EVAL_INTS:
            value = c.get(key)
            if value is not None and (not _is_int(value) or value < 1):
                raise ConfigError(f"callbacks.{name}.{key}={value!r} must be a whole number >= 1 or null; e.g. "
                                  f"callbacks.{name}.{key}=8")


def check_model_path(name_or_path: Any) -> None:
    """``backbone.name_or_path`` is a preset name or a model folder holding ``config.json``.

    Raises:
        ConfigError: A path that does not exist, a file, a folder without ``config.json``, an unknown preset.
    """
    if name_or_path is None:
        return
    value = str(name_or_path)
    path = Path(value).expanduser()
    if path.is_file():
        raise ConfigError(f"backbone.name_or_path={value} is a file; point at the model folder (with config.json)")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"backbone.name_or_path={value} has no config.json; point at a model folder (e.g. "
                              "<run>/embedder or an InternVL3-*-hf download)")
        return
    from mmembed.backbone.presets import PRESETS

    if value not in PRESETS:
        what = "does not exist" if any(c in value for c in "/\\~.") else "is not a preset"
        raise ConfigError(f"backbone.name_or_path={value} {what}; use a model folder or a preset "
                          f"({', '.join(PRESETS)})")


def clipping(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(module kwargs, trainer kwargs)`` that move gradient clipping into the module under GradCache.

    Lightning refuses automatic clipping with manual optimisation, so with ``module.gradcache_chunk_size`` the
    Trainer's ``gradient_clip_val`` goes to the module (which clips itself) and the Trainer gets none.
    """
    clip = cfg.trainer.get("gradient_clip_val")
    if cfg.module.get("gradcache_chunk_size") and clip:
        return {"gradient_clip_val": clip}, {"gradient_clip_val": None}
    return {}, {}
