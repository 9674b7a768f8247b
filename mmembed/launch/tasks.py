"""The tasks a composed config runs: fit (train), mine, curate (judge), evaluate; and what they share (the logger,
the callbacks, the synthetic world, the results table).

Each task takes a validated config whose inputs are already resolved (:func:`mmembed.launch.runner.resolve_inputs`)
and does not change it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mmembed.launch.config import clipping, instantiate
from mmembed.launch.settings import JudgeSettings, MiningSettings, mlflow_settings

Rows = dict[str, tuple[float | None, float]]


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


def in_sweep() -> bool:
    """Whether this process is a job of a Hydra multirun (``-m``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def make_logger(cfg: DictConfig, parent_run_id: str | None = None, standalone: bool = False) -> Any:
    """The configured logger. For the MLflow logger also: a resumed run continues the MLflow run recorded in its
    checkpoint; a pipeline stage is a child of ``parent_run_id``; a sweep job's run is a child of the sweep's parent,
    named by its point (unless ``standalone``: a prerequisite stage built during a sweep is not one of its points)."""
    if not cfg.get("logger"):
        return None
    settings = mlflow_settings(cfg)
    kw: dict[str, Any] = {}
    if settings is not None and cfg.get("ckpt_path"):
        from mmembed.callbacks.resume import saved_mlflow_run_id

        kw["run_id"] = saved_mlflow_run_id(cfg.ckpt_path)
        if kw["run_id"]:
            print(f"resuming MLflow run {kw['run_id']} (recorded in {cfg.ckpt_path})")
    if parent_run_id is not None and not kw.get("run_id"):
        kw["parent_run_id"] = parent_run_id
    elif in_sweep() and not standalone and not kw.get("run_id"):
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        kw["sweep_dir"] = hc.sweep.dir
        if settings is not None:
            from mmembed import tracking

            parent = tracking.get_or_create_sweep_parent(sweep_dir=hc.sweep.dir, **settings.kwargs())
            param = tracking.resolve_swept_param(cfg.sweep.param, tracking.swept_keys(parent, settings.uri))
            point = tracking.sweep_point_name(param, OmegaConf.select(cfg, param), cfg.seed)
            kw.update(parent_run_id=parent, run_name=point, tags={tracking.SWEEP_POINT_TAG: point})
    if settings is not None and cfg.task == "judge_ft":  # which judge curated this run's negatives, by name
        from mmembed.judge.simulated import judge_label

        label = judge_label(cfg.judge.model) if cfg.judge.strategy == "judge" else None
        kw["tags"] = {**kw.get("tags", {}), "mmembed.judge": label or "none",
                      "mmembed.judge.strategy": cfg.judge.strategy}
    return instantiate(cfg.logger, **kw)


def make_callbacks(cfg: DictConfig, has_logger: bool = True) -> list:
    """The configured Lightning callbacks (``LearningRateMonitor`` left out without a logger)."""
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
        standalone: bool = False) -> tuple[dict[str, float], Rows]:
    """Fit the module (resuming from ``ckpt_path`` when set); returns the final callback metrics and the
    ``{metric: (before, after)}`` rows of the eval callbacks (before = the model the stage started from)."""
    import lightning as L
    import torch
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from mmembed.tracking import end_run, log_config, log_params

    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    # The run exists (and is recorded) before anything heavy can fail, so a failed point shows as a FAILED run.
    logger = make_logger(cfg, parent_run_id, standalone)
    is_zero = rank_zero_only.rank == 0
    if logger is not None and is_zero:
        log_config(logger, OmegaConf.to_container(cfg, resolve=True), experiment=cfg.exp_name)
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / ".mlflow_run_id").write_text(logger.run_id)  # read by the sweep callback (launch/sweep.py)
    try:
        backbone = instantiate(cfg.backbone)
        module_kw, trainer_kw = clipping(cfg)
        module = instantiate(cfg.module, backbone=backbone, **module_kw)
        data_kw = {"train_shards": train_shards} if train_shards else {}
        # The one preprocessing object: the backbone's input builder (its compression, processor and tile policy).
        datamodule = instantiate(cfg.data, input_builder=backbone.input_builder, **data_kw)
        callbacks = make_callbacks(cfg, has_logger=logger is not None)
        trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger or False, **trainer_kw)
        t0 = time.perf_counter()
        # weights_only=True said explicitly: torch then ignores TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, so a resumed
        # checkpoint can never run pickled code (the kit's checkpoints hold only tensors and plain values).
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        metrics["time/fit_s"] = time.perf_counter() - t0
        # Training alone: the fit minus the evaluations callbacks ran inside it (Table 9 compares training speed).
        metrics["time/eval_s"] = sum(float(getattr(cb, "seconds", 0.0)) for cb in callbacks)
        metrics["time/train_s"] = metrics["time/fit_s"] - metrics["time/eval_s"]
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
                logger.log_metrics({k: metrics[k] for k in ("time/fit_s", "time/eval_s", "time/train_s")})
            print_results(rows)
            print(f"fit took {metrics['time/fit_s']:.1f}s (training {metrics['time/train_s']:.1f}s); outputs in "
                  f"{cfg.paths.output_dir}; MLflow UI: "
                  f"mlflow ui --backend-store-uri sqlite:///{Path(cfg.paths.log_dir) / 'mlflow.db'}")
    except BaseException as e:
        if logger is not None and is_zero:
            end_run(logger, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", f"{type(e).__name__}: {e}")
        raise
    return metrics, rows


def before_after(callbacks: list) -> Rows:
    """``{metric: (before, after)}`` from the eval callbacks' histories (before = the ``start`` evaluation)."""
    out: Rows = {}
    for cb in callbacks:
        hist = getattr(cb, "history", None)
        if not hist:
            continue
        first = hist[0]["metrics"] if hist[0]["when"] == "start" else {}
        for k, v in hist[-1]["metrics"].items():
            out[k] = (first.get(k), v)
    return out


def print_results(rows: Rows) -> None:
    """The before / after table of a run's metrics."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="results (before = the model the run started from, after = end of training)")
    for col in ("metric", "before", "after"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for k in sorted(rows):
        before, after = rows[k]
        table.add_row(k, "-" if before is None else f"{before:.2f}", f"{after:.2f}")
    Console().print(table)


def frozen_embedder(cfg: DictConfig, folder: str | None) -> Any:
    """The Embedder of an exported ``folder``, else of the configured backbone, frozen (mining and curation never
    train)."""
    from mmembed import Embedder

    if folder:
        return Embedder.from_pretrained(folder)
    return Embedder(instantiate(cfg.backbone, finetune=None).eval())


def mining_settings(cfg: DictConfig) -> MiningSettings:
    """The ``mining:`` group as its dataclass."""
    return instantiate(cfg.mining)


def judge_settings(cfg: DictConfig) -> JudgeSettings:
    """The ``judge:`` group as its dataclass."""
    return instantiate(cfg.judge)


def mine(cfg: DictConfig) -> Path:
    """Mine hard negatives for ``mining.shards`` with ``mining.checkpoint``; returns the folder of mined shards."""
    from mmembed.mining.mine import mine_hard_negatives

    m = mining_settings(cfg)
    embedder = frozen_embedder(cfg, m.checkpoint)
    summary = mine_hard_negatives(embedder, m.shards, m.out_dir, seed=cfg.seed, **m.arguments())
    print(f"mined shards in {m.out_dir}/shards: {summary.queries} queries, {summary.queries_per_s} queries/s "
          f"(details: {m.out_dir}/summary.json); {summary.false_negative_line()}")
    return Path(m.out_dir) / "shards"


def curate_with(j: JudgeSettings, embedder: Any, judge: Any, shards: Any, out_dir: str | Path, seed: int) -> Any:
    """``mmembed.judge.curate`` with the ``judge:`` settings, holding the lock of its shared retrieval + judgment
    cache (``judge.cache_dir``: sweep points, ``task=judge|judge_ft`` and the pipeline's stage judge once)."""
    from filelock import FileLock

    from mmembed.judge.curate import curate

    Path(j.cache_dir).mkdir(parents=True, exist_ok=True)
    with FileLock(str(Path(j.cache_dir)) + ".lock"):
        return curate(embedder, judge, shards, out_dir, seed=seed, **j.arguments())


def make_judge(j: JudgeSettings, seed: int, model: str | Path | None = None) -> Any:
    """The judge a ``judge:`` group names (``model`` overrides ``judge.model``): ``simulated`` -> the simulated
    expert judge (``judge.recall`` / ``judge.false_yes_rate``, seeded by the run's seed), a folder -> the MLLM judge,
    none -> None."""
    from mmembed.judge.simulated import load_judge

    model = model if model is not None else j.model
    return load_judge(str(model), recall=j.recall, false_yes_rate=j.false_yes_rate, seed=seed) if model else None


def judge(cfg: DictConfig) -> Path:
    """Stage-3 curation of ``judge.shards`` (retrieve top-K, judge, write shards); returns the curated shard folder.

    The summary is also logged to MLflow as its own run when an MLflow logger is configured.
    """
    j = judge_settings(cfg)
    embedder = frozen_embedder(cfg, j.checkpoint)
    judge_model = make_judge(j, cfg.seed)
    summary = curate_with(j, embedder, judge_model, j.shards, j.out_dir, cfg.seed)
    t = summary.totals
    judge_name = getattr(judge_model, "display_name", "no judge")
    print(f"curated shards in {j.out_dir}/shards ({j.strategy}, judge: {judge_name}): {summary.queries} queries, "
          f"{t['negatives']} negatives, {t['extra_positives']} extra positives; planted false negatives caught "
          f"{t['fn_caught']}, left as negatives: judge {t['fn_negative_judge']} vs rule {t['fn_negative_rule']} vs "
          f"margin {t['fn_negative_margin']} (n={summary.n}, margin {summary.margin})")
    settings = mlflow_settings(cfg)
    if settings is not None:
        from mmembed.tracking import log_summary

        label = getattr(judge_model, "label", None)
        simulated = getattr(judge_model, "uses_ground_truth", False)
        params = {"judge": OmegaConf.to_container(cfg.judge, resolve=True), "hard_negatives": cfg.hard_negatives}
        # the simulated judge is named in the run name too (the MLLM judge's run name is unchanged)
        log_summary(summary.to_json(), run_name=f"{cfg.exp_name}/curation" + (f" ({label})" if simulated else ""),
                    tags={"mmembed.judge": label or "none", "mmembed.judge.strategy": j.strategy}, params=params,
                    artifacts=[Path(j.out_dir) / "summary.json", Path(j.out_dir) / "manifest.jsonl"],
                    **settings.kwargs())
    return Path(j.out_dir) / "shards"


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """``task=eval``: the eval callbacks' runners, once, on the configured (untrained or loaded) model."""
    backbone = instantiate(cfg.backbone)
    module = instantiate(cfg.module, backbone=backbone)
    rows: dict[str, float] = {}
    for cb in make_callbacks(cfg):
        if hasattr(cb, "evaluate"):
            result = cb.evaluate(module.embedder(), Path(cfg.paths.output_dir) / "eval" / cb.benchmark, {})
            rows.update(result.flat(cb.prefix))
    print_results({k: (v, v) for k, v in rows.items()})
    return rows
