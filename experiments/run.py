"""The Hydra entry point (contract): ``python experiments/run.py +exp=NAME key=value``.

Tasks (``task=``): ``train`` (fit the configured module, evaluate before/after through the callbacks, save the
Embedder), ``mine`` (global hard-negative mining of ``mining.shards``), ``hnm`` (mine with ``mining.checkpoint``,
then train on the mined shards, starting from that same warm-up model), ``eval`` (evaluate the backbone's model on the
configured eval callbacks' sets), ``judge`` (stage-3 retrieve-and-judge curation of ``judge.shards``),
``judge_ft`` (curate, then train on the curated shards), ``pipeline`` (the paper's stage graph, see
experiments/stages.py).

Every run starts from ``init_from`` when set (an exported model folder; else the backbone preset). A task that needs
an earlier stage and is not given it (``task=hnm`` without ``mining.checkpoint``) builds or reuses that stage in the
content-keyed stage store (``pipeline.store``) first.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]

TASKS = ("train", "mine", "hnm", "eval", "judge", "judge_ft", "pipeline")


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


@dataclass
class RunSchema:
    """Types of the primary config's scalar fields (a structured-config schema, checked at composition)."""

    task: str = "train"
    exp_name: str = "default"
    seed: int = 0
    save_embedder: bool = True
    ckpt_path: str | None = None


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
            try:
                value = OmegaConf.select(cfg, key, throw_on_missing=False)
                typed[f.name] = value
            except OmegaConfBaseException as e:
                want = getattr(f.type, "__name__", str(f.type)).replace("None", "null")
                raise ConfigError(f"{key}={value!r} is not a valid {want} ({str(e).splitlines()[0]}); "
                                  f"e.g. {key}={getattr(schema(), f.name)}") from None


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
    check_types(cfg)
    mc = cfg.module
    if mc.get("gradcache_chunk_size") and cfg.trainer.get("gradient_clip_val"):
        # Lightning refuses automatic clipping with manual optimisation; GradCache clips in the module instead.
        OmegaConf.update(cfg, "module.gradient_clip_val", cfg.trainer.gradient_clip_val)
        OmegaConf.update(cfg, "trainer.gradient_clip_val", None)
    if cfg.data.get("num_hard_negatives", 0) < 0:
        raise ConfigError("data.num_hard_negatives must be >= 0")
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} does not exist; point at <run>/checkpoints/last.ckpt")
    if cfg.task in ("judge", "judge_ft"):
        j = cfg.judge
        if j.strategy not in ("judge", "rule", "margin"):
            raise ConfigError(f"judge.strategy={j.strategy!r} must be 'judge', 'rule' or 'margin'")
        if j.margin < 0:
            raise ConfigError(f"judge.margin={j.margin} must be >= 0 (a retrieval-score difference)")
        if j.model == "simulated":  # the simulated expert judge (synthetic world only): its settings checked here
            from mmembed.judge.simulated import SimulatedJudge

            try:
                SimulatedJudge(recall=j.recall, false_yes_rate=j.false_yes_rate)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        # judge.model / judge.checkpoint left null are built on demand (judge_prerequisites): the kit's stage-1 model
        # and the stage-2 model, from the stage store
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


def apply_init_from(cfg: DictConfig) -> None:
    """``init_from`` (an exported folder) becomes the backbone's ``name_or_path``: the stage starts from it, and a
    fresh LoRA adapter (``backbone.finetune``) is put on the merged weights it holds."""
    if cfg.get("init_from"):
        OmegaConf.update(cfg, "backbone.name_or_path", str(cfg.init_from))


def ensure_synthetic_world(cfg: DictConfig) -> None:
    """Generate the synthetic world when the configured data points into it and it does not exist yet."""
    root = Path(cfg.synth.dir)
    data_paths = str(cfg.data.get("train_shards", "")) + str(cfg.data.get("data_path", ""))
    uses_synth = str(root) in data_paths or cfg.task == "pipeline" or any(
        str(root) in str(c.get("data", "")) for c in (cfg.get("callbacks") or {}).values() if c)
    if not uses_synth or (root / "manifest.json").is_file():
        return
    from filelock import FileLock

    from mmembed.data.synth import generate

    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):  # concurrent runs (parallel sweeps) generate it once
        if (root / "manifest.json").is_file():
            return
        rate = float(cfg.synth.get("false_negative_rate", 0.0))
        print(f"generating the synthetic world ({cfg.synth.size}, seed {cfg.synth.seed}, false-negative rate {rate}) "
              f"into {root} ...")
        generate(root, seed=cfg.synth.seed, size=cfg.synth.size, overwrite=True, false_negative_rate=rate)


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _logger(cfg: DictConfig, parent_run_id: str | None = None, standalone: bool = False):
    """The configured logger. For the MLflow logger also: a resumed run continues the MLflow run recorded in its
    checkpoint; a pipeline stage is a child of ``parent_run_id``; a sweep job's run is a child of the sweep's parent,
    named by its point (unless ``standalone``: a prerequisite stage built during a sweep is not one of its points)."""
    if not cfg.get("logger"):
        return None
    from hydra.core.hydra_config import HydraConfig
    from mmembed.callbacks.sweep import mlflow_settings

    settings = mlflow_settings(cfg)
    kw: dict[str, Any] = {}
    if settings is not None and cfg.get("ckpt_path"):
        from mmembed.callbacks.resume import saved_mlflow_run_id

        kw["run_id"] = saved_mlflow_run_id(cfg.ckpt_path)
        if kw["run_id"]:
            print(f"resuming MLflow run {kw['run_id']} (recorded in {cfg.ckpt_path})")
    if parent_run_id is not None and not kw.get("run_id"):
        kw["parent_run_id"] = parent_run_id
    elif _in_sweep() and not standalone and not kw.get("run_id"):
        hc = HydraConfig.get()
        kw["sweep_dir"] = hc.sweep.dir
        if settings is not None:
            from mmembed import tracking

            parent = tracking.get_or_create_sweep_parent(sweep_dir=hc.sweep.dir, **settings)
            param = tracking.resolve_swept_param(cfg.sweep.param, tracking.swept_keys(parent, settings["tracking_uri"]
                                                                                      or None, settings["output_dir"]))
            point = tracking.sweep_point_name(param, OmegaConf.select(cfg, param), cfg.seed)
            kw.update(parent_run_id=parent, run_name=point, tags={tracking.SWEEP_POINT_TAG: point})
    if settings is not None and cfg.task == "judge_ft":  # which judge curated this run's negatives, by name
        from mmembed.judge.simulated import judge_label

        label = judge_label(cfg.judge.model) if cfg.judge.strategy == "judge" else None
        kw["tags"] = {**kw.get("tags", {}), "mmembed.judge": label or "none",
                      "mmembed.judge.strategy": cfg.judge.strategy}
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


def train(cfg: DictConfig, train_shards: str | None = None) -> dict[str, float]:
    """Fit the module; returns the final callback metrics."""
    return fit(cfg, train_shards)[0]


def fit(cfg: DictConfig, train_shards: str | None = None, parent_run_id: str | None = None,
        standalone: bool = False) -> tuple[dict[str, float], dict[str, tuple[float | None, float]]]:
    """Fit the module (resuming from ``ckpt_path`` when set); returns the final callback metrics and the
    ``{metric: (before, after)}`` rows of the eval callbacks (before = the model the stage started from)."""
    import lightning as L
    import torch
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from mmembed.tracking import end_run, log_config, log_params

    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    # The run exists (and is recorded) before anything heavy can fail, so a failed point shows as a FAILED run.
    logger = _logger(cfg, parent_run_id, standalone)
    is_zero = rank_zero_only.rank == 0
    if logger is not None and is_zero:
        log_config(logger, OmegaConf.to_container(cfg, resolve=True), experiment=cfg.exp_name)
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / ".mlflow_run_id").write_text(logger.run_id)  # read by the sweep callback (callbacks/sweep.py)
    try:
        backbone = instantiate(cfg.backbone)
        module = instantiate(cfg.module, backbone=backbone)
        data_kw = {"train_shards": train_shards} if train_shards else {}
        # The one preprocessing object: the backbone's input builder (its compression, processor and tile policy).
        datamodule = instantiate(cfg.data, input_builder=backbone.input_builder, **data_kw)
        callbacks = _callbacks(cfg, has_logger=logger is not None)
        trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger or False)
        t0 = time.perf_counter()
        # weights_only=True said explicitly: torch then ignores TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, so a resumed
        # checkpoint can never run pickled code (the kit's checkpoints hold only tensors and plain values).
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        metrics["time/fit_s"] = time.perf_counter() - t0
        rows = before_after(callbacks)
        if trainer.is_global_zero:
            if cfg.save_embedder:
                # A reranker run exports the reranker (same folder layout, loads with Reranker.from_pretrained).
                what = "reranker" if callable(getattr(module, "reranker", None)) else "embedder"
                model = module.reranker() if what == "reranker" else module.embedder()
                path = model.save_pretrained(Path(cfg.paths.output_dir) / what)
                print(f"{what} saved to {path}")
                if logger is not None:
                    log_params(logger, {f"{what}_path": path})
            if logger is not None:
                logger.log_metrics({"time/fit_s": metrics["time/fit_s"]})
            print_results(rows)
            print(f"fit took {metrics['time/fit_s']:.1f}s; outputs in {cfg.paths.output_dir}; MLflow UI: "
                  f"mlflow ui --backend-store-uri sqlite:///{Path(cfg.paths.log_dir) / 'mlflow.db'}")
    except BaseException as e:
        if logger is not None and is_zero:
            end_run(logger, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", f"{type(e).__name__}: {e}")
        raise
    return metrics, rows


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

    table = Table(title="results (before = the model the run started from, after = end of training)")
    for col in ("metric", "before", "after"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for k in sorted(rows):
        before, after = rows[k]
        table.add_row(k, "-" if before is None else f"{before:.2f}", f"{after:.2f}")
    Console().print(table)


def frozen_embedder(cfg: DictConfig, folder: str | None):
    """The Embedder of an exported ``folder``, else of the configured backbone, frozen (mining and curation never
    train)."""
    from mmembed import Embedder

    if folder:
        return Embedder.from_pretrained(folder)
    return Embedder(instantiate(cfg.backbone, finetune=None).eval())


def mine(cfg: DictConfig, checkpoint: str | None = None) -> Path:
    """Mine hard negatives for ``mining.shards``; returns the folder of mined shards."""
    from mmembed.mining.mine import mine_hard_negatives

    embedder = frozen_embedder(cfg, checkpoint or cfg.mining.checkpoint)
    m = cfg.mining
    summary = mine_hard_negatives(embedder, m.shards, m.out_dir, strategy=m.strategy, window=tuple(m.window),
                                  n=m.window_samples, k=m.rule_top_k, seed=cfg.seed, batch_size=m.batch_size)
    print(f"mined shards in {m.out_dir}/shards: {summary.queries} queries, {summary.queries_per_s} queries/s "
          f"(details: {m.out_dir}/summary.json); {summary.false_negative_line()}")
    return Path(m.out_dir) / "shards"


def judge_prerequisites(cfg: DictConfig) -> None:
    """Stage 3 needs the stage-2 model (retrieval, and the start of fine-tuning) and, for ``strategy=judge``, a judge
    (the kit's stage-1 model unless ``judge.model`` names one): build or reuse them in the stage store when not given,
    as ``task=hnm`` does for the warm-up model."""
    need_judge = cfg.judge.strategy == "judge" and not cfg.judge.model
    if cfg.judge.checkpoint and not need_judge:
        if cfg.task == "judge_ft" and not cfg.get("init_from"):
            OmegaConf.update(cfg, "init_from", str(cfg.judge.checkpoint))
        return
    import stages  # experiments/stages.py (next to this file)

    if not cfg.judge.checkpoint:
        hnm = stages.prerequisite(cfg, "hnm", fit=fit, mine=mine)
        OmegaConf.update(cfg, "judge.checkpoint", str(hnm.output("model")))
        print(f"retrieving with the stage-2 model {cfg.judge.checkpoint}")
    if need_judge:
        stage1 = stages.prerequisite(cfg, "stage1", fit=fit, mine=mine)
        OmegaConf.update(cfg, "judge.model", str(stage1.output("model")))
        print(f"judging with the stage-1 model {cfg.judge.model}")
    if cfg.task == "judge_ft" and not cfg.get("init_from"):
        OmegaConf.update(cfg, "init_from", str(cfg.judge.checkpoint))  # stage 3 continues the stage-2 model


def judge(cfg: DictConfig) -> Path:
    """Stage-3 curation of ``judge.shards`` (retrieve top-K, judge, write shards); returns the curated shard folder.

    The summary is also logged to MLflow as its own run when a logger is configured.
    """
    import stages  # experiments/stages.py (next to this file)

    j = cfg.judge
    embedder = frozen_embedder(cfg, j.checkpoint)
    judge_model = stages.make_judge(j, cfg.seed)
    summary = stages.curate_with(j, embedder, judge_model, j.shards, j.out_dir, cfg.seed)
    t = summary.totals
    judge_name = getattr(judge_model, "display_name", "no judge")
    print(f"curated shards in {j.out_dir}/shards ({j.strategy}, judge: {judge_name}): {summary.queries} queries, "
          f"{t['negatives']} negatives, {t['extra_positives']} extra positives; planted false negatives caught "
          f"{t['fn_caught']}, left as negatives: judge {t['fn_negative_judge']} vs rule {t['fn_negative_rule']} vs "
          f"margin {t['fn_negative_margin']} (n={summary.n}, margin {summary.margin})")
    if cfg.get("logger") and "experiment_name" in cfg.logger:
        from mmembed.tracking import log_summary

        label = getattr(judge_model, "label", None)
        simulated = getattr(judge_model, "uses_ground_truth", False)
        log_summary(summary.to_json(), experiment_name=cfg.logger.experiment_name,
                    # the simulated judge is named in the run name too (the MLLM judge's run name is unchanged)
                    run_name=f"{cfg.exp_name}/curation" + (f" ({label})" if simulated else ""),
                    tags={"mmembed.judge": label or "none", "mmembed.judge.strategy": j.strategy},
                    tracking_uri=cfg.logger.tracking_uri,
                    output_dir=cfg.logger.output_dir,
                    params={"judge": OmegaConf.to_container(j, resolve=True), "hard_negatives": cfg.hard_negatives},
                    artifacts=[Path(j.out_dir) / "summary.json", Path(j.out_dir) / "manifest.jsonl"])
    return Path(j.out_dir) / "shards"


@hydra.main(version_base="1.3", config_path="configs", config_name="run")
def main(cfg: DictConfig) -> dict[str, float] | None:
    try:
        validate(cfg)
    except ConfigError as e:
        print(f"config error: {e.msg}", file=sys.stderr)
        raise
    from mmembed.errors import USER_ERRORS, one_line
    from mmembed.logs import quiet_logs

    quiet_logs()  # each log line once (Hydra's format), third-party noise dropped at its source
    try:
        return run_task(cfg)
    except USER_ERRORS as e:
        # Run-time failures (an empty shard glob, samples_per_epoch too small, an unreachable MLflow server) end
        # with one line; Hydra would print a stripped traceback instead.
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {one_line(e)} (HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


def run_task(cfg: DictConfig) -> dict[str, float] | None:
    """Run the configured task on a validated config."""
    ensure_synthetic_world(cfg)
    if cfg.task == "pipeline":
        import stages  # experiments/stages.py (next to this file)

        return stages.run_pipeline(cfg, fit=fit, mine=mine)
    if cfg.task == "hnm" and not cfg.mining.checkpoint:
        import stages

        # Prerequisite on demand: the warm-up model (built once per config in the stage store, then reused).
        warmup = stages.prerequisite(cfg, "warmup", fit=fit, mine=mine)
        OmegaConf.update(cfg, "mining.checkpoint", str(warmup.output("model")))
        print(f"mining with and continuing from the warm-up model {cfg.mining.checkpoint}")
    if cfg.task in ("judge", "judge_ft"):
        judge_prerequisites(cfg)
    apply_init_from(cfg)
    if cfg.task == "train":
        return train(cfg)
    if cfg.task == "mine":
        mine(cfg)
        return None
    if cfg.task == "hnm":
        shards = mine(cfg)
        return train(cfg, train_shards=str(shards / "*.tar"))
    if cfg.task == "judge":
        judge(cfg)
        return None
    if cfg.task == "judge_ft":
        return train(cfg, train_shards=str(judge(cfg) / "*.tar"))
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
