"""The paper's stages as Hydra-composed runs, registered in the stage graph (``mmembed.pipeline``).

Each training stage composes ``run.yaml`` + ``+exp=<pipeline.exp[stage]>`` + the keys this run inherits
(``pipeline.inherit``: ``synth.size=ci``, ``trainer.max_steps=...`` given on the command line) + ``pipeline.overrides``
+ ``pipeline.stage_overrides[stage]``, then points its inputs at its prerequisites' folders (``init_from``,
``mining.checkpoint``, ``data.train_shards``). The resolved config, with output locations masked, and the inputs'
keys make the stage's key (``mmembed.pipeline.store``): the same stage asked for by ``+exp=pipeline``, by
``+exp=ablation_hn16`` or by every point of a ``-m`` sweep is the same folder, built once.

Hook points for stages whose code lands separately: ``judge`` (``mmembed.judge.curate``), ``stage3`` (an exp file
``pipeline.exp.stage3``), ``reranker`` (``mmembed.modules.RerankerModule`` + exp file ``pipeline.exp.reranker``) and
the E+R column of ``eval`` (``mmembed.reranker.Reranker``): until they exist the graph skips them with a note.
"""

from __future__ import annotations

import importlib
import importlib.util
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from mmembed.pipeline import Pipeline, StageResult, StageStore, fingerprint, register_stage

CONFIGS = Path(__file__).resolve().parent / "configs"
MASK = "<stage folder>"  # stands for the stage's own folder in the hashed config
NOT_HASHED = ("paths", "logger", "exp_name", "sweep", "pipeline", "save_embedder", "ckpt_path")
# Options added after stages were first built: hashed only when set, so stage folders built before they existed
# keep their keys (and stay reusable) while the option is off.
HASHED_WHEN_SET = (("backbone", "in_tower_layer"),)
MAIN_METRICS = ("val/mmeb/overall", "val/visdoc/overall")


@dataclass
class Settings:
    """What the stage functions need from the launching run.

    Attributes:
        cfg: The launching run's composed config.
        fit: ``run.fit(cfg, train_shards=None, parent_run_id=None, standalone=False) -> (metrics, rows)``.
        mine: ``run.mine(cfg) -> mined shards folder``.
        overrides: Command-line overrides the stages inherit.
        parent_run_id: MLflow parent of the stages built in this run (None: each is a run of its own).
    """

    cfg: DictConfig
    fit: Callable[..., tuple[dict[str, float], dict[str, tuple[float | None, float]]]]
    mine: Callable[[DictConfig], Path]
    overrides: list[str]
    parent_run_id: str | None = None


# ------------------------------------------------------------------------------------------------ composing
def inherited_overrides(cfg: DictConfig) -> list[str]:
    """``pipeline.share`` keys at the launching run's values, then its command-line overrides whose key falls under
    ``pipeline.inherit``."""
    from hydra.core.hydra_config import HydraConfig

    out = [f"{k}={OmegaConf.select(cfg, k)}" for k in cfg.pipeline.share]
    if not HydraConfig.initialized():
        return out
    prefixes = tuple(cfg.pipeline.inherit)
    for o in HydraConfig.get().overrides.task:
        key = o.split("=", 1)[0].lstrip("+~")
        if any(key == p or key.startswith(p + ".") for p in prefixes):
            out.append(o)
    return out


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def compose_stage(settings: Settings, stage: str, exp: str, extra: list[str] | None = None) -> DictConfig:
    """The config of one stage, composed like ``python experiments/run.py +exp=EXP <inherited> <pipeline overrides>``.

    Inherited and pipeline-wide value overrides apply only where the stage's config has the key (stage 1's
    instruction data has no ``data.samples_per_epoch``); group choices (``callbacks=none``) always apply.
    """
    from hydra import compose

    p = settings.cfg.pipeline
    shared = [*settings.overrides, *p.overrides]
    groups = [o for o in shared if "." not in _key(o)]
    own = [*(p.stage_overrides.get(stage) or []), *(extra or [])]
    base = compose(config_name="run", overrides=[f"+exp={exp}", *groups, *own])
    values = [o for o in shared if "." in _key(o) and OmegaConf.select(base, _key(o), default=MASK) is not MASK]
    return compose(config_name="run", overrides=[f"+exp={exp}", *groups, *values, *own])


def identity(cfg: DictConfig) -> dict[str, Any]:
    """What defines a stage's work: its resolved config with its own folder masked and output-only keys dropped."""
    view = cfg.copy()
    with open_dict(view):
        view.paths.output_dir = MASK
    out = OmegaConf.to_container(view, resolve=True)
    for key in NOT_HASHED:
        out.pop(key, None)
    for group, key in HASHED_WHEN_SET:
        if isinstance(out.get(group), dict) and out[group].get(key) is None:
            out[group].pop(key, None)
    return out


def _rows_metrics(rows: Mapping[str, tuple[float | None, float]]) -> dict[str, dict[str, float]]:
    return {"before": {k: b for k, (b, _) in rows.items() if b is not None},
            "after": {k: a for k, (_, a) in rows.items()}}


def train_stage(pipe: Pipeline, name: str, inputs: Mapping[str, Path], set_keys: Mapping[str, str],
                extra: list[str] | None = None, train_shards: str | None = None, output: str = "embedder"
                ) -> StageResult | None:
    """Compose the stage's exp file, point ``set_keys`` at its inputs, and fit it in a keyed stage folder.

    Args:
        pipe: The running pipeline (``pipe.settings`` is a :class:`Settings`).
        name: Stage name; its exp file is ``pipeline.exp[name]``.
        inputs: Input paths by name (fingerprinted into the key).
        set_keys: Config keys set to input paths after composing (``init_from``, ``mining.checkpoint``, ...).
        extra: More overrides for this stage.
        train_shards: Training shards to use instead of the data config's.
        output: The folder (inside the stage folder) the stage exports.
    """
    s: Settings = pipe.settings
    exp = s.cfg.pipeline.exp.get(name)
    if not exp or not (CONFIGS / "exp" / f"{exp}.yaml").is_file():
        pipe.skip(name, f"no exp file experiments/configs/exp/{exp}.yaml yet")
        return None
    cfg = compose_stage(s, name, exp, extra)
    with open_dict(cfg):
        for key, value in set_keys.items():
            OmegaConf.update(cfg, key, str(value))
        if train_shards:
            cfg.data.train_shards = train_shards
        cfg.task = "train"
        cfg.save_embedder = True
    ident = identity(cfg)

    def build(ctx):
        with open_dict(cfg):
            cfg.paths.output_dir = str(ctx.folder)
            cfg.ckpt_path = str(ctx.resume_from) if ctx.resume_from else None
            cfg.exp_name = f"{s.cfg.exp_name}/{name}" if s.parent_run_id else cfg.exp_name
            if cfg.get("init_from"):
                cfg.backbone.name_or_path = str(cfg.init_from)
        metrics, rows = s.fit(cfg, parent_run_id=s.parent_run_id, standalone=True)
        return {"outputs": {"model": output}, "metrics": {**_rows_metrics(rows), "fit_s": metrics.get("time/fit_s")}}

    result = pipe.store.run(name, ident, build, inputs={k: fingerprint(v) for k, v in inputs.items()})
    _note_reuse(pipe, result)
    return result


def _note_reuse(pipe: Pipeline, result: StageResult) -> None:
    s: Settings = pipe.settings
    if result.reused and s.parent_run_id and s.cfg.get("logger"):
        from mmembed.tracking import log_reused_stage

        after = result.metrics.get("after", {}) if isinstance(result.metrics.get("after"), dict) else {}
        log_reused_stage(s.parent_run_id, result.name, after, result.folder, tracking_uri=_tracking_uri(s.cfg))


def _tracking_uri(cfg: DictConfig) -> str:
    from mmembed.tracking import default_tracking_uri

    return cfg.logger.get("tracking_uri") or default_tracking_uri(cfg.logger.output_dir)


# --------------------------------------------------------------------------------------------------- stages
def _start_model(pipe: Pipeline, deps: Mapping[str, StageResult]) -> dict[str, Path]:
    return {"init_from": deps["stage1"].output("model")} if "stage1" in deps else {}


@register_stage("stage1")
def stage1(pipe: Pipeline, deps: Mapping[str, StageResult]) -> StageResult | None:
    """Generative restoration (exp ``stage1_restoration``) from the backbone preset."""
    return train_stage(pipe, "stage1", {}, {})


@register_stage("warmup", uses=("stage1",))
def warmup(pipe: Pipeline, deps: Mapping[str, StageResult]) -> StageResult | None:
    """Stage-2 warm-up from the stage-1 model (from the preset when stage 1 is disabled)."""
    start = _start_model(pipe, deps)
    return train_stage(pipe, "warmup", start, start)


@register_stage("mine", requires=("warmup",))
def mine(pipe: Pipeline, deps: Mapping[str, StageResult]) -> StageResult:
    """Global hard-negative mining (``stage2_hnm``'s mining settings) with the warm-up model."""
    s: Settings = pipe.settings
    model = deps["warmup"].output("model")
    cfg = compose_stage(s, "mine", s.cfg.pipeline.exp.hnm)
    with open_dict(cfg):
        cfg.mining.checkpoint = str(model)
        cfg.task = "mine"
    ident = {k: v for k, v in identity(cfg).items() if k in ("mining", "synth", "seed", "data")}
    ident["mining"].pop("out_dir", None)

    def build(ctx):
        with open_dict(cfg):
            cfg.paths.output_dir = str(ctx.folder)
        shards = s.mine(cfg)
        summary = Path(cfg.mining.out_dir) / "summary.json"
        return {"outputs": {"shards": str(shards), "summary": str(summary)}, "metrics": {}}

    result = pipe.store.run("mine", ident, build, inputs={"model": fingerprint(model)})
    return result


@register_stage("hnm", requires=("warmup", "mine"))
def hnm(pipe: Pipeline, deps: Mapping[str, StageResult]) -> StageResult | None:
    """Stage-2 hard-negative round: continues the warm-up model on the mined shards."""
    model, shards = deps["warmup"].output("model"), deps["mine"].output("shards")
    return train_stage(pipe, "hnm", {"init_from": model, "shards": shards},
                       {"mining.checkpoint": model, "init_from": model}, train_shards=str(shards / "*.tar"))


def _judge_available() -> str | None:
    if importlib.util.find_spec("mmembed.judge") is None:
        return "mmembed.judge is not in this checkout yet (issue 10)"
    if not hasattr(importlib.import_module("mmembed.judge"), "curate"):
        return "mmembed.judge has no curate() yet (issue 10)"
    return None


def curate_with(j: DictConfig, embedder: Any, judge: Any, shards: Any, out_dir: str | Path, seed: int) -> Any:
    """``mmembed.judge.curate`` with the settings of a ``judge:`` block, holding the lock of its shared retrieval +
    judgment cache (``judge.cache_dir``: sweep points, ``task=judge|judge_ft`` and the pipeline's stage judge once).
    """
    from filelock import FileLock

    from mmembed.judge.curate import curate

    Path(j.cache_dir).mkdir(parents=True, exist_ok=True)
    with FileLock(str(Path(j.cache_dir)) + ".lock"):
        return curate(embedder, judge, shards, out_dir, k=j.retrieve_top_k, max_negatives=j.max_negatives,
                      strategy=j.strategy, margin=j.margin, skip_datasets=list(j.skip_datasets),
                      batch_size=j.batch_size,
                      embed_batch_size=j.embed_batch_size, reuse_prefix=j.reuse_prefix, seed=seed,
                      cache_dir=j.cache_dir)


def make_judge(j: DictConfig, seed: int, model: str | Path | None = None) -> Any:
    """The judge a ``judge:`` block names (``model`` overrides ``judge.model``): ``simulated`` -> the simulated
    expert judge (``judge.recall`` / ``judge.false_yes_rate``, seeded by the run's seed), a folder -> the MLLM judge,
    none -> None."""
    from mmembed.judge.simulated import load_judge

    model = model if model is not None else j.model
    return load_judge(str(model), recall=j.recall, false_yes_rate=j.false_yes_rate, seed=seed) if model else None


@register_stage("judge", requires=("hnm",), uses=("stage1",), available=_judge_available)
def judge(pipe: Pipeline, deps: Mapping[str, StageResult]) -> StageResult | None:
    """MLLM-as-a-judge curation of the top-K the stage-2 model retrieves (``mmembed.judge.curate``).

    Settings: the ``judge:`` block as the stage-3 exp file composes it (``pipeline.exp.stage3``; K, n, strategy,
    skipped datasets, batch sizes, the shared retrieval + judgment cache), the same block ``task=judge|judge_ft`` read,
    so a pipeline and an ``ablation_hn*`` run on one stage store judge once. ``judge.model`` null: stage 1's export.
    """
    from mmembed import Embedder

    s: Settings = pipe.settings
    j = compose_stage(s, "judge", s.cfg.pipeline.exp.stage3).judge
    judge_model = j.model or (deps["stage1"].output("model") if "stage1" in deps else None)
    if judge_model is None and j.strategy == "judge":
        pipe.skip("judge", "no judge model: set judge.model=<MLLM folder> (or keep stage1 enabled)")
        return None
    retriever = deps["hnm"].output("model")
    shards = compose_stage(s, "judge", s.cfg.pipeline.exp.warmup).data.train_shards  # stage 2's training data
    settings = {k: v for k, v in OmegaConf.to_container(j, resolve=True).items()
                if k not in ("checkpoint", "model", "shards", "out_dir", "cache_dir")}  # inputs and locations
    ident = {"judge": settings, "shards": str(shards), "seed": s.cfg.seed}

    def build(ctx):
        judge_obj = make_judge(j, s.cfg.seed, judge_model) if j.strategy == "judge" else None
        summary = curate_with(j, Embedder.from_pretrained(retriever), judge_obj, shards, ctx.folder, s.cfg.seed)
        return {"outputs": {"shards": "shards", "summary": "summary.json"}, "metrics": {"summary": summary.to_json()}}

    inputs = {"retriever": fingerprint(retriever)}
    if judge_model is not None:  # the simulated judge's settings are in ident (the judge: block)
        inputs["judge_model"] = "simulated" if str(judge_model) == "simulated" else fingerprint(judge_model)
    return pipe.store.run("judge", ident, build, inputs=inputs)


@register_stage("stage3", requires=("hnm", "judge"))
def stage3(pipe: Pipeline, deps: Mapping[str, StageResult]) -> StageResult | None:
    """Stage 3: continue the stage-2 model on the judge-curated shards."""
    model, shards = deps["hnm"].output("model"), deps["judge"].output("shards")
    return train_stage(pipe, "stage3", {"init_from": model, "shards": shards}, {"init_from": model},
                       train_shards=str(shards / "*.tar"))


def _reranker_available() -> str | None:
    if not hasattr(importlib.import_module("mmembed.modules"), "RerankerModule"):
        return "mmembed.modules.RerankerModule is not in this checkout yet (issue 11)"
    return None


@register_stage("reranker", requires=("stage1",), uses=("judge", "mine"), available=_reranker_available)
def reranker(pipe: Pipeline, deps: Mapping[str, StageResult]) -> StageResult | None:
    """The reranker from the stage-1 model (paper §3.4), on judge-curated shards (mined ones as the fallback)."""
    data = deps.get("judge") or deps.get("mine")
    if data is None:
        pipe.skip("reranker", "no curated or mined shards to train on")
        return None
    model, shards = deps["stage1"].output("model"), data.output("shards")
    return train_stage(pipe, "reranker", {"init_from": model, "shards": shards}, {"init_from": model},
                       train_shards=str(shards / "*.tar"), output="reranker")


STEPS = (  # Table 7's cumulative rows: (label, stage whose "after" is the row)
    ("+ stage 1 restoration", "stage1"),
    ("+ stage 2 warm-up", "warmup"),
    ("+ global HNM", "hnm"),
    ("+ judge curation (stage 3)", "stage3"),
)


def summary_rows(results: Mapping[str, StageResult | None]) -> list[dict[str, Any]]:
    """One row per cumulative step (base model first): the MMEB / VisDoc overall scores after each stage."""
    rows = []
    first = next((results[n] for _, n in STEPS if results.get(n) is not None), None)
    if first is not None:
        rows.append({"step": "base model", "stage": "-", **first.metrics.get("before", {})})
    for label, name in STEPS:
        r = results.get(name)
        if r is not None:
            rows.append({"step": label, "stage": name, **r.metrics.get("after", {})})
    return rows


@register_stage("eval", uses=("stage1", "warmup", "hnm", "stage3", "reranker"))
def final_eval(pipe: Pipeline, deps: Mapping[str, StageResult]) -> StageResult | None:
    """Final evaluation: the last embedder alone (E, its stage's end-of-training evaluation) and, once a reranker
    exists, embedder + reranker (E+R) on the same sets."""
    rows = summary_rows(pipe.results)
    if "reranker" in deps:
        rows.append(_rerank_row(pipe, deps))
    metrics = {"rows": rows}
    return StageResult("eval", "-", Path(pipe.settings.cfg.paths.output_dir), {}, metrics, reused=False)


def _rerank_row(pipe: Pipeline, deps: Mapping[str, StageResult]) -> dict[str, Any]:
    """E+R: the final embedder's shortlist reranked (``mmembed.reranker.Reranker`` through the eval callbacks)."""
    from hydra.utils import instantiate

    from mmembed import Embedder

    Reranker = importlib.import_module("mmembed.reranker").Reranker  # noqa: N806  (issue 11)
    s: Settings = pipe.settings
    last = next(deps[n] for n in ("stage3", "hnm", "warmup") if n in deps)
    embedder = Embedder.from_pretrained(last.output("model"))
    rr = Reranker.from_pretrained(str(deps["reranker"].output("model")))
    row: dict[str, Any] = {"step": "+ reranker (E+R)", "stage": "reranker"}
    for name, c in (s.cfg.get("callbacks") or {}).items():
        if c and str(c.get("_target_", "")).startswith("mmembed.callbacks.eval.") and name in ("mmeb", "visdoc"):
            cb = instantiate(c, reranker=rr)
            result = cb.evaluate(embedder, Path(s.cfg.paths.output_dir) / "eval_er" / cb.benchmark, {}, reranker=rr)
            if result.mode != "E+R":
                raise RuntimeError(f"the E+R row of {cb.benchmark} was evaluated without its reranker")
            row.update(result.flat(cb.prefix))
    return row


# ------------------------------------------------------------------------------------------------- drivers
def _settings(cfg: DictConfig, fit, mine, parent_run_id: str | None = None) -> Settings:
    return Settings(cfg=cfg, fit=fit, mine=mine, overrides=inherited_overrides(cfg), parent_run_id=parent_run_id)


def prerequisite(cfg: DictConfig, name: str, fit, mine) -> StageResult:
    """Build or reuse stage ``name`` (and what it needs) for a run that was not given it (e.g. the warm-up model
    for ``+exp=ablation_hn16``). Stages built here are MLflow runs of their own, not points of a sweep."""
    pipe = Pipeline(StageStore(cfg.pipeline.store), _settings(cfg, fit, mine), disabled=tuple(cfg.pipeline.disabled))
    result = pipe.build(name)
    if result is None:
        raise SystemExit(f"config error: prerequisite stage {name} could not run ({pipe.notes.get(name)})")
    return result


def print_table(rows: list[dict[str, Any]], notes: Mapping[str, str], elapsed: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="pipeline summary (Table 7 shape: one row per cumulative step)")
    table.add_column("step")
    for m in MAIN_METRICS:
        table.add_column(m.split("/")[1].upper(), justify="right")
    for r in rows:
        table.add_row(r["step"], *("-" if r.get(m) is None else f"{r[m]:.2f}" for m in MAIN_METRICS))
    console = Console()
    console.print(table)
    for name, why in notes.items():
        console.print(f"skipped {name}: {why}")
    console.print(f"pipeline took {elapsed:.1f}s")


def run_pipeline(cfg: DictConfig, fit, mine) -> dict[str, Any]:
    """``task=pipeline``: build (or reuse) ``pipeline.stages`` in order, print the Table 7-shaped summary, log a
    parent MLflow run with one child per stage and the summary table + plot as its artifacts."""
    import pandas as pd

    t0 = time.perf_counter()
    parent = None
    if cfg.get("logger"):
        from mmembed.tracking import start_pipeline_run

        parent = start_pipeline_run(cfg.logger.experiment_name, f"pipeline: {cfg.exp_name}",
                                    tracking_uri=_tracking_uri(cfg), output_dir=cfg.logger.output_dir,
                                    tags={"mmembed.experiment": cfg.exp_name, "mmembed.seed": cfg.seed})
    pipe = Pipeline(StageStore(cfg.pipeline.store), _settings(cfg, fit, mine, parent),
                    disabled=tuple(cfg.pipeline.disabled))
    status = "FAILED"
    try:
        results = pipe.run(list(cfg.pipeline.stages))
        status = "FINISHED"
    finally:
        done = pipe.results.get("eval")
        rows = done.metrics["rows"] if done is not None else summary_rows(pipe.results)
        if parent is not None:
            from mmembed.tracking import log_pipeline_summary

            frame = pd.DataFrame([{"step": r["step"], **{m: r.get(m, float("nan")) for m in MAIN_METRICS}}
                                  for r in rows], columns=["step", *MAIN_METRICS])
            log_pipeline_summary(parent, frame, MAIN_METRICS, tracking_uri=_tracking_uri(cfg), status=status)
    elapsed = time.perf_counter() - t0
    print_table(rows, pipe.notes, elapsed)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    import json

    (out / "pipeline_summary.json").write_text(json.dumps(
        {"rows": rows, "skipped": pipe.notes, "seconds": elapsed,
         "stages": {n: (None if r is None else {"folder": str(r.folder), "reused": r.reused})
                    for n, r in results.items()}}, indent=2, default=str))
    return {"seconds": elapsed}
