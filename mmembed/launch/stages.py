"""The paper's stages as Hydra-composed runs, in one explicit table (:data:`STAGES`) for ``mmembed.pipeline``.

Each training stage composes ``run.yaml`` + ``+exp=<pipeline.exp[stage]>`` + the keys this run inherits
(``pipeline.inherit``: ``synth.size=ci``, ``trainer.max_steps=...`` given on the command line) + ``pipeline.overrides``
+ ``pipeline.stage_overrides[stage]``, then points its inputs at its prerequisites' folders (``init_from``,
``mining.checkpoint``, ``data.train_shards``). The resolved config, with output locations masked, and the inputs'
keys make the stage's key (``mmembed.pipeline.store``): the same stage asked for by ``+exp=pipeline``, by
``+exp=ablation_hn16`` or by every point of a ``-m`` sweep is the same folder, built once.

Composing needs Hydra initialised on ``experiments/configs`` (``experiments/run.py`` does that).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from mmembed.launch import tasks
from mmembed.launch.settings import mlflow_settings
from mmembed.pipeline import Pipeline, StageDef, StageResult, StageStore, fingerprint

MASK = "<stage folder>"  # stands for the stage's own folder in the hashed config
NOT_HASHED = ("paths", "logger", "exp_name", "sweep", "pipeline", "save_embedder", "ckpt_path")
# Options added after stages were first built: hashed only when set, so stage folders built before they existed
# keep their keys (and stay reusable) while the option is off.
HASHED_WHEN_SET = (("backbone", "in_tower_layer"),)


@dataclass
class Settings:
    """What the stage functions need from the launching run.

    Attributes:
        cfg: The launching run's composed config.
        overrides: Command-line overrides the stages inherit.
        parent_run_id: MLflow parent of the stages built in this run (None: each is a run of its own).
    """

    cfg: DictConfig
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


def exp_exists(exp: str | None) -> bool:
    """Whether the composed config tree has ``exp/<exp>.yaml``."""
    from hydra.core.global_hydra import GlobalHydra

    return bool(exp) and exp in GlobalHydra.instance().config_loader().get_group_options("exp")


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
    if not exp_exists(exp):
        pipe.skip(name, f"no exp file experiments/configs/exp/{exp}.yaml")
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
        metrics, rows = tasks.fit(cfg, parent_run_id=s.parent_run_id, standalone=True)
        return {"outputs": {"model": output}, "metrics": {**_rows_metrics(rows), "fit_s": metrics.get("time/fit_s")}}

    result = pipe.store.run(name, ident, build, inputs={k: fingerprint(v) for k, v in inputs.items()})
    _note_reuse(pipe, result)
    return result


def _note_reuse(pipe: Pipeline, result: StageResult) -> None:
    s: Settings = pipe.settings
    settings = mlflow_settings(s.cfg)
    if result.reused and s.parent_run_id and settings is not None:
        from mmembed.tracking import log_reused_stage

        after = result.metrics.get("after", {}) if isinstance(result.metrics.get("after"), dict) else {}
        log_reused_stage(s.parent_run_id, result.name, after, result.folder, tracking_uri=settings.uri)


# --------------------------------------------------------------------------------------------------- stages
def _start_model(deps: Mapping[str, StageResult]) -> dict[str, Path]:
    return {"init_from": deps["stage1"].output("model")} if "stage1" in deps else {}


def stage1(pipe: Pipeline, deps: Mapping[str, StageResult]) -> StageResult | None:
    """Generative restoration (exp ``stage1_restoration``) from the backbone preset."""
    return train_stage(pipe, "stage1", {}, {})


def warmup(pipe: Pipeline, deps: Mapping[str, StageResult]) -> StageResult | None:
    """Stage-2 warm-up from the stage-1 model (from the preset when stage 1 is disabled)."""
    start = _start_model(deps)
    return train_stage(pipe, "warmup", start, start)


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
        shards = tasks.mine(cfg)
        summary = Path(cfg.mining.out_dir) / "summary.json"
        return {"outputs": {"shards": str(shards), "summary": str(summary)}, "metrics": {}}

    return pipe.store.run("mine", ident, build, inputs={"model": fingerprint(model)})


def hnm(pipe: Pipeline, deps: Mapping[str, StageResult]) -> StageResult | None:
    """Stage-2 hard-negative round: continues the warm-up model on the mined shards."""
    model, shards = deps["warmup"].output("model"), deps["mine"].output("shards")
    return train_stage(pipe, "hnm", {"init_from": model, "shards": shards},
                       {"mining.checkpoint": model, "init_from": model}, train_shards=str(shards / "*.tar"))


def judge(pipe: Pipeline, deps: Mapping[str, StageResult]) -> StageResult | None:
    """MLLM-as-a-judge curation of the top-K the stage-2 model retrieves (``mmembed.judge.curate``).

    Settings: the ``judge:`` group as the stage-3 exp file composes it (``pipeline.exp.stage3``; K, n, strategy,
    skipped datasets, batch sizes, the shared retrieval + judgment cache), the same group ``task=judge|judge_ft``
    read, so a pipeline and an ``ablation_hn*`` run on one stage store judge once. ``judge.model`` null: stage 1's
    export.
    """
    from mmembed import Embedder

    s: Settings = pipe.settings
    j = tasks.judge_settings(compose_stage(s, "judge", s.cfg.pipeline.exp.stage3))
    judge_model = j.model or (deps["stage1"].output("model") if "stage1" in deps else None)
    if judge_model is None and j.strategy == "judge":
        pipe.skip("judge", "no judge model: set judge.model=<MLLM folder> (or keep stage1 enabled)")
        return None
    retriever = deps["hnm"].output("model")
    shards = compose_stage(s, "judge", s.cfg.pipeline.exp.warmup).data.train_shards  # stage 2's training data
    ident = {"judge": j.identity(), "shards": str(shards), "seed": s.cfg.seed}

    def build(ctx):
        judge_obj = tasks.make_judge(j, s.cfg.seed, judge_model) if j.strategy == "judge" else None
        summary = tasks.curate_with(j, Embedder.from_pretrained(retriever), judge_obj, shards, ctx.folder, s.cfg.seed)
        return {"outputs": {"shards": "shards", "summary": "summary.json"}, "metrics": {"summary": summary.to_json()}}

    inputs = {"retriever": fingerprint(retriever)}
    if judge_model is not None:  # the simulated judge's settings are in ident (the judge: block)
        inputs["judge_model"] = "simulated" if str(judge_model) == "simulated" else fingerprint(judge_model)
    return pipe.store.run("judge", ident, build, inputs=inputs)


def stage3(pipe: Pipeline, deps: Mapping[str, StageResult]) -> StageResult | None:
    """Stage 3: continue the stage-2 model on the judge-curated shards."""
    model, shards = deps["hnm"].output("model"), deps["judge"].output("shards")
    return train_stage(pipe, "stage3", {"init_from": model, "shards": shards}, {"init_from": model},
                       train_shards=str(shards / "*.tar"))


RERANKER_INITS = ("stage1", "warmup", "hnm", "stage3")


def reranker(pipe: Pipeline, deps: Mapping[str, StageResult]) -> StageResult | None:
    """The reranker on judge-curated shards (mined ones as the fallback), initialised from ``pipeline.reranker_init``:
    the stage-1 model (paper §3.4, the default) or one of the pipeline's embedders (``warmup`` / ``hnm`` /
    ``stage3``; the miniature's choice, where the random-init stage-1 model leaves the reranker at chance)."""
    s: Settings = pipe.settings
    data = deps.get("judge") or deps.get("mine")
    if data is None:
        pipe.skip("reranker", "no curated or mined shards to train on")
        return None
    start = str(s.cfg.pipeline.get("reranker_init") or "stage1")
    if start not in RERANKER_INITS:
        raise ValueError(f"pipeline.reranker_init={start!r}: use one of {', '.join(RERANKER_INITS)}")
    if start not in deps:
        pipe.skip("reranker", f"its initialisation {start} (pipeline.reranker_init) did not run")
        return None
    model, shards = deps[start].output("model"), data.output("shards")
    return train_stage(pipe, "reranker", {"init_from": model, "shards": shards}, {"init_from": model},
                       train_shards=str(shards / "*.tar"), output="reranker")


def final_eval(pipe: Pipeline, deps: Mapping[str, StageResult]) -> StageResult | None:
    """Final evaluation: the last embedder alone (E, its stage's end-of-training evaluation) and, once a reranker
    exists, embedder + reranker (E+R) on the same sets. It reads the stages this run built (``pipeline.stages``)
    and builds none: ``pipeline.stages=[stage1, warmup, eval]`` stops after the warm-up."""
    from mmembed.launch.summary import rerank_row, summary_rows

    rows = summary_rows(pipe.results)
    deps = {name: r for name, r in pipe.results.items() if r is not None}
    if "reranker" in deps:
        rows.append(rerank_row(pipe.settings.cfg, deps))
    return StageResult("eval", "-", Path(pipe.settings.cfg.paths.output_dir), {}, {"rows": rows}, reused=False)


#: The stage graph (paper §3.3-3.4): what each stage requires (must have run) and uses (taken when it ran).
STAGES: dict[str, StageDef] = {d.name: d for d in (
    StageDef("stage1", stage1),
    StageDef("warmup", warmup, uses=("stage1",)),
    StageDef("mine", mine, requires=("warmup",)),
    StageDef("hnm", hnm, requires=("warmup", "mine")),
    StageDef("judge", judge, requires=("hnm",), uses=("stage1",)),
    StageDef("stage3", stage3, requires=("hnm", "judge")),
    StageDef("reranker", reranker, uses=("stage1", "judge", "mine", "warmup", "hnm", "stage3")),
    StageDef("eval", final_eval),  # reads what the run built (pipe.results); building nothing itself
)}


def pipeline(cfg: DictConfig, parent_run_id: str | None = None) -> Pipeline:
    """A :class:`Pipeline` over :data:`STAGES` on ``pipeline.store`` for the launching run ``cfg``."""
    settings = Settings(cfg=cfg, overrides=inherited_overrides(cfg), parent_run_id=parent_run_id)
    return Pipeline(StageStore(cfg.pipeline.store), settings, stages=STAGES, disabled=tuple(cfg.pipeline.disabled))


def prerequisite(cfg: DictConfig, name: str) -> StageResult:
    """Build or reuse stage ``name`` (and what it needs) for a run that was not given it (e.g. the warm-up model
    for ``+exp=ablation_hn16``). Stages built here are MLflow runs of their own, not points of a sweep."""
    from mmembed.launch.config import ConfigError

    pipe = pipeline(cfg)
    # ``pipeline.disabled`` keeps a stage out of the chain (e.g. [stage1]: the warm-up starts from the preset); a
    # stage asked for by name (the stage-1 model as the MLLM judge) is still built.
    pipe.disabled = tuple(d for d in pipe.disabled if d != name)
    result = pipe.build(name)
    if result is None:
        raise ConfigError(f"prerequisite stage {name} could not run ({pipe.notes.get(name)})")
    return result
