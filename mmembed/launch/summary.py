"""``task=pipeline``: build the stage table, print the Table-7-shaped summary, record it on a parent MLflow run."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mmembed.launch.settings import mlflow_settings
from mmembed.pipeline import StageResult

MAIN_METRICS = ("val/mmeb/overall", "val/visdoc/overall")
STEPS = (  # Table 7's cumulative rows: (label, stage whose "after" is the row)
    ("+ stage 1 restoration", "stage1"),
    ("+ stage 2 warm-up", "warmup"),
    ("+ global HNM", "hnm"),
    ("+ judge curation (stage 3)", "stage3"),
)
RERANK_STEP = "+ reranker (E+R)"  # the last row, once a reranker exists: the final embedder's shortlist reranked


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


def rerank_row(cfg: DictConfig, deps: Mapping[str, StageResult]) -> dict[str, Any]:
    """E+R: the final embedder's shortlist reranked (``mmembed.reranker.Reranker`` through the eval callbacks)."""
    from mmembed import Embedder, Reranker
    from mmembed.launch.config import instantiate

    last = next(deps[n] for n in ("stage3", "hnm", "warmup") if n in deps)
    embedder = Embedder.from_pretrained(last.output("model"))
    rr = Reranker.from_pretrained(str(deps["reranker"].output("model")))
    row: dict[str, Any] = {"step": RERANK_STEP, "stage": "reranker"}
    for name, c in (cfg.get("callbacks") or {}).items():
        if c and str(c.get("_target_", "")).startswith("mmembed.callbacks.eval.") and name in ("mmeb", "visdoc"):
            cb = instantiate(c, reranker=rr)
            result = cb.evaluate(embedder, Path(cfg.paths.output_dir) / "eval_er" / cb.benchmark, {}, reranker=rr)
            if result.mode != "E+R":
                raise RuntimeError(f"the E+R row of {cb.benchmark} was evaluated without its reranker")
            row.update(result.flat(cb.prefix))
    return row


def print_table(rows: list[dict[str, Any]], notes: Mapping[str, str], elapsed: float) -> None:
    """The step table on the console, then the skipped stages and the time taken."""
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


def start_tags(cfg: DictConfig) -> dict[str, str]:
    """Where the pipeline's embedder chain and its reranker start, as the report names them: ``stage 1`` (when it
    is a stage of the run and not disabled), else the backbone (preset or folder) the warm-up starts from."""
    p = cfg.pipeline
    stage1 = "stage1" in p.stages and "stage1" not in p.disabled
    from mmembed.tracking import PIPELINE_START_TAG, RERANKER_INIT_TAG

    return {PIPELINE_START_TAG: "stage 1" if stage1 else f"backbone {cfg.backbone.name_or_path}",
            RERANKER_INIT_TAG: str(p.get("reranker_init") or "stage1")}


def run_pipeline(cfg: DictConfig) -> dict[str, Any]:
    """``task=pipeline``: build (or reuse) ``pipeline.stages`` in order, print the Table 7-shaped summary, log a
    parent MLflow run with one child per stage and the summary table + plot as its artifacts."""
    import pandas as pd

    from mmembed.launch.stages import pipeline

    t0 = time.perf_counter()
    parent = None
    settings = mlflow_settings(cfg)
    if settings is not None:
        from mmembed.tracking import start_pipeline_run

        parent = start_pipeline_run(settings.experiment_name, f"pipeline: {cfg.exp_name}", tracking_uri=settings.uri,
                                    output_dir=settings.output_dir,
                                    tags={"mmembed.experiment": cfg.exp_name, "mmembed.seed": cfg.seed,
                                          **start_tags(cfg)})
    pipe = pipeline(cfg, parent)
    status, results = "FAILED", {}
    try:
        results = pipe.run(list(cfg.pipeline.stages))
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        done = pipe.results.get("eval")
        rows = done.metrics["rows"] if done is not None else summary_rows(pipe.results)
        if parent is not None:
            from mmembed.tracking import log_pipeline_summary

            frame = pd.DataFrame([{"step": r["step"], **{m: r.get(m, float("nan")) for m in MAIN_METRICS}}
                                  for r in rows], columns=["step", *MAIN_METRICS])
            log_pipeline_summary(parent, frame, MAIN_METRICS, tracking_uri=settings.uri, status=status)
    elapsed = time.perf_counter() - t0
    print_table(rows, pipe.notes, elapsed)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline_summary.json").write_text(json.dumps(
        {"rows": rows, "skipped": pipe.notes, "seconds": elapsed,
         "stages": {n: (None if r is None else {"folder": str(r.folder), "reused": r.reused})
                    for n, r in results.items()}}, indent=2, default=str))
    return {"seconds": elapsed}
