"""Table 7 of the report: the pipeline's cumulative steps (warm-up, + global HNM, + judge FT, + reranker E+R) over
pipeline runs (one per seed), and, beside it, where the embedder chain starts (the warm-up from the stage-1 model,
``+exp=start_stage1``, against Table 7's own start)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmembed.report import paper
from mmembed.report.collect import RunRecord, Store, record
from mmembed.report.markdown import markdown_table
from mmembed.report.plots import Panel, Series, plot_panels
from mmembed.report.stats import Cell, Comparison
from mmembed.report.tables import (
    MMEB,
    NAMES,
    PAPER_STEP_NAMES,
    SHORT_STEP_NAMES,
    STEP_LABELS,
    TITLES,
    VISDOC,
    Section,
    claims_lines,
    failed_lines,
    fmt_paper,
    image_ref,
    metric_cells,
    not_run,
    run_lines,
)
from mmembed.tracking.store import PIPELINE_START_TAG as START_TAG
from mmembed.tracking.store import RERANKER_INIT_TAG, STAGE_REUSED_TAG


def pipeline_step_records(store: Store, parents: Sequence[Any]
                          ) -> tuple[dict[str, list[RunRecord]], list[str], list[RunRecord]]:
    """One record per (pipeline, step) with the step's scores, keyed by the pipeline's seed; the step labels in
    order; one record per pipeline."""
    steps: dict[str, list[RunRecord]] = {}
    order: list[str] = []
    pipelines = []
    for p in parents:
        rec = record(p)
        rec.seed = store.pipeline_seed(p)
        pipelines.append(rec)
        for row in store.pipeline_steps(p.info.run_id):
            label = str(row.get("step"))
            if label not in order:
                order.append(label)
            metrics = {k: float(v) for k, v in row.items() if k in (MMEB, VISDOC) and v is not None}
            steps.setdefault(label, []).append(RunRecord(p.info.run_id, label, "FINISHED", rec.experiment, rec.seed,
                                                         metrics=metrics, start_ms=rec.start_ms))
    return steps, order, pipelines


START_EXPERIMENT = "start_stage1"  # exp file of the stage-1 start (experiments/configs/exp/start_stage1.yaml)


def start_block(store: Store, section: Section, warmup: dict[str, Cell] | None) -> None:
    """Where the chain starts: Table 7's warm-up (from whatever its pipelines started from) beside the warm-up from
    the stage-1 model (``+exp=start_stage1`` pipelines, same seeds), with the paper's order as the claim."""
    import pandas as pd

    parents = store.pick_pipelines(START_EXPERIMENT)
    if not parents or warmup is None:
        return
    steps, _, _ = pipeline_step_records(store, parents)
    stage1 = metric_cells(steps.get("+ stage 1 restoration", []))
    from_stage1 = metric_cells(steps.get("+ stage 2 warm-up", []))
    section.parents += [p.info.run_id for p in parents]
    section.runs += [*parents, *(ch for p in parents for ch in store.children.get(p.info.run_id, []))]
    rows = [{"start": "warm-up from Table 7's start (the row above)", "MMEB": warmup["mmeb"].fmt(),
             "VisDoc": warmup["visdoc"].fmt()},
            {"start": "stage 1 restoration alone", "MMEB": stage1["mmeb"].fmt(), "VisDoc": stage1["visdoc"].fmt()},
            {"start": "warm-up from the stage-1 model (paper's order)", "MMEB": from_stage1["mmeb"].fmt(),
             "VisDoc": from_stage1["visdoc"].fmt()}]
    section.body += ["### Where the chain starts", "",
                     f"Pipelines `{'`, `'.join(p.info.run_id[:8] for p in parents)}` (`+exp={START_EXPERIMENT}`): "
                     "stage 1, then the same warm-up from its model, at the same seeds as Table 7. The claim "
                     "\"(start)\" below is the paper's order (stage 1 helps the embedder); where it is contradicted, "
                     "Table 7's chain starting from the random preset is the measured choice, not a shortcut.", "",
                     markdown_table(pd.DataFrame(rows)), ""]
    for m in ("mmeb", "visdoc"):
        section.claims.append(Comparison("(start) the warm-up from the stage-1 model beats the warm-up from Table 7's "
                                         "start", NAMES[m], from_stage1[m], warmup[m]))


def table7(store: Store, out: Path | None, img_dir: Path, pinned: Sequence[str] | None = None,
           experiment: str | None = "pipeline") -> Section:
    """Table 7: the cumulative pipeline steps (warm-up, + HNM, + judge FT, + reranker) over pipeline runs (seeds)."""
    import pandas as pd

    parents = [store.get(p) for p in pinned] if pinned else store.pick_pipelines(experiment)
    if not parents:
        return not_run("7", f"no finished pipeline run (tag `mmembed.pipeline`, exp `{experiment}`)")
    section = Section("7")
    section.parents = [p.info.run_id for p in parents]
    children = [ch for p in parents for ch in store.children.get(p.info.run_id, [])]
    section.runs = [*parents, *children]
    steps, order, pipelines = pipeline_step_records(store, parents)
    child_records = [record(ch) for ch in children]
    section.body += run_lines(section, parents, child_records, "pipeline parents", seeds_of=pipelines)
    section.body[0] = section.body[0].replace("jobs, seeds", "stage runs, pipeline seeds")
    reused = sum(ch.data.tags.get(STAGE_REUSED_TAG) == "true" for ch in children)
    if reused:  # a rerun that reused stages: their build time lives in the runs that built them, not counted here
        section.body[1] = section.body[1].rstrip() + (f" {reused} of the {len(children)} stage runs stand for stages "
                                                      "reused from an earlier run; their build time is not counted.")
    starts = sorted({f"the warm-up from {p.data.tags.get(START_TAG, '?')}, the reranker from "
                     f"{p.data.tags.get(RERANKER_INIT_TAG, '?')}" for p in parents})
    section.body.insert(1, f"Starts from: {'; '.join(starts)} (`mmembed.pipeline.start` / "
                        "`mmembed.pipeline.reranker_init` tags of the pipeline runs; '?': runs made before they "
                        "were recorded).")
    section.body.insert(1, "Seeds of the pipelines: " + ", ".join(f"`{r.run_id[:8]}` seed {r.seed or '?'}"
                                                                  for r in pipelines) + ".")
    keys = {label: STEP_LABELS.get(label) for label in order}
    cells = {label: metric_cells(recs) for label, recs in steps.items()}
    rows = []
    for label in order:
        key = keys[label]
        p = paper.TABLE7.get(key, {}) if key else {}
        rows.append({"step (ours)": label, "paper row": PAPER_STEP_NAMES.get(key, "— (not in the paper)"),
                     "MMEB (ours)": cells[label]["mmeb"].fmt(), "MMEB (paper)": fmt_paper(p.get("mmeb")),
                     "VisDoc (ours)": cells[label]["visdoc"].fmt(), "VisDoc (paper)": fmt_paper(p.get("visdoc"))})
    section.body += [markdown_table(pd.DataFrame(rows))]
    missing = [PAPER_STEP_NAMES[k] for k in paper.TABLE7 if k not in keys.values()]
    if missing:
        section.body += [f"Rows missing from the pipeline summaries: {', '.join(missing)}.", ""]
    bad = [r for r in pipelines if not r.ok] + [r for r in child_records if not r.ok]
    section.body += failed_lines(bad) + [""]
    if any(not r.ok for r in pipelines):
        section.body += ["(A failed pipeline's summary holds the steps it completed: those rows are real and are "
                         "averaged; the steps it did not reach are missing from its seed.)", ""]
    by_key = {k: cells[label] for label, k in keys.items() if k}
    if not pinned:
        start_block(store, section, by_key.get("warmup"))
    paper_keys = list(paper.TABLE7)
    for prev, cur in zip(paper_keys, paper_keys[1:]):
        if prev in by_key and cur in by_key:
            for m in ("mmeb", "visdoc"):
                section.claims.append(Comparison(f"{PAPER_STEP_NAMES[cur]} improves on the row above", NAMES[m],
                                                 by_key[cur][m], by_key[prev][m]))
    section.body += claims_lines(section, store)
    path = img_dir / "repro_table7.png"
    shown = [k for k in paper_keys if k in by_key]
    if shown:
        panels = [Panel(NAMES[m], [Series("step", [by_key[k][m] for k in shown]),
                                   Series("step", paper=[paper.TABLE7[k][m] for k in shown])])
                  for m in ("mmeb", "visdoc")]
        plot_panels(path, [SHORT_STEP_NAMES[k] for k in shown], panels, TITLES["7"])
        section.body += ["", f"![Table 7]({image_ref(path, out)})"]
    return section
