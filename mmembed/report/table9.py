"""Table 9 of the report: visual token compression factor 1 (vanilla) vs 2 (the paper's VTC) -- training time, peak
memory, MMEB / VisDoc -- with, beyond the paper, VTC + in-tower compression (issue 27) as extra rows compared with
s=2 on the same seeds (``+exp=ablation_vtc2_tower``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from mmembed.report import paper
from mmembed.report.collect import RunRecord, Store, params_of
from mmembed.report.markdown import markdown_table
from mmembed.report.plots import Panel, Series, plot_panels
from mmembed.report.stats import Cell, Comparison, ratio
from mmembed.report.tables import (
    FIT_S,
    PEAK_GIB,
    TITLES,
    TRAIN_S,
    Section,
    _number_key,
    _sweep_section,
    cell,
    claims_lines,
    failed_lines,
    fmt_paper,
    fmt_seconds,
    image_ref,
    metric_cells,
)


def _tower_layer(r: RunRecord) -> int | None:
    """The run's ``backbone.in_tower_layer`` (None: compression only before the connector, the paper's VTC)."""
    raw = r.params.get("backbone.in_tower_layer")
    try:
        return int(float(raw)) if raw not in (None, "None", "null", "") else None
    except ValueError:
        return None


def train_seconds(r: RunRecord) -> float:
    """The run's training time: ``time/train_s`` (the fit less the evaluations inside it), else ``time/fit_s``
    (runs made before evaluations were timed apart; those include end-of-stage evaluation)."""
    value = r.metric(TRAIN_S)
    return value if math.isfinite(value) else r.metric(FIT_S)


def _cells(runs: Sequence[RunRecord]) -> dict[str, Cell]:
    return {**metric_cells(runs), "time": cell(runs, train_seconds),
            "mem": cell(runs, lambda r: r.metric(PEAK_GIB))}


def table9(store: Store, out: Path | None, img_dir: Path, pinned: Sequence[str] | None = None) -> Section:
    """Table 9: compression factor 1 (vanilla) vs 2: training time, peak memory, MMEB / VisDoc; runs with
    ``backbone.in_tower_layer`` set (``+exp=ablation_vtc2_tower``, beyond the paper) are extra rows compared with s=2.
    """
    import pandas as pd

    section, records = _sweep_section(store, "9", pinned)
    if not section.ran:
        return section
    plain: list[RunRecord] = []
    towers: dict[int, list[RunRecord]] = {}
    for r in records:
        k = _tower_layer(r)
        if k is None:
            plain.append(r)
        else:
            towers.setdefault(k, []).append(r)
    groups = _number_key(plain, "9", "backbone.vtc_factor")
    factors = sorted(set(groups) | {1, 2})
    c = {s: _cells(groups.get(s, [])) for s in factors}
    tc = {k: _cells(towers[k]) for k in sorted(towers)}
    label = {1: "InternVL3 (vanilla), s=1", 2: "InternVL3-VTC, s=2"}
    rows = []
    for s in factors:
        p = paper.TABLE9.get(s, {})
        batch = ", ".join(params_of(groups.get(s, []), "data.batch_size")) or "—"
        rows.append({"backbone": label.get(s, f"s={s} (not in the paper)"),
                     "training time (ours, s)": c[s]["time"].fmt(1),
                     "training time (paper)": fmt_seconds(p["train_s"]) if p else "—",
                     "peak memory above start, GiB (ours)": c[s]["mem"].fmt(2),
                     "MMEB (ours)": c[s]["mmeb"].fmt(), "MMEB (paper)": fmt_paper(p.get("mmeb")),
                     "VisDoc (ours)": c[s]["visdoc"].fmt(), "VisDoc (paper)": fmt_paper(p.get("visdoc")),
                     "batch size (ours)": batch, "global batch (paper)": fmt_paper(p.get("global_batch"), 0)})
    for k, ck in tc.items():
        rows.append({"backbone": f"VTC s=2 + in-tower pooling after vision block {k} (not in the paper)",
                     "training time (ours, s)": ck["time"].fmt(1), "training time (paper)": "—",
                     "peak memory above start, GiB (ours)": ck["mem"].fmt(2), "MMEB (ours)": ck["mmeb"].fmt(),
                     "MMEB (paper)": "—", "VisDoc (ours)": ck["visdoc"].fmt(), "VisDoc (paper)": "—",
                     "batch size (ours)": ", ".join(params_of(towers[k], "data.batch_size")) or "—",
                     "global batch (paper)": "—"})
    section.body += [markdown_table(pd.DataFrame(rows))]
    t_ratio, m_ratio = ratio(c[1]["time"], c[2]["time"]), ratio(c[1]["mem"], c[2]["mem"])
    p_ratio = paper.TABLE9[1]["train_s"] / paper.TABLE9[2]["train_s"]
    section.body += [(
        f"Ratios s=1 / s=2: training time **{t_ratio:.2f}×** (paper {p_ratio:.2f}×), peak memory "
        f"**{m_ratio:.2f}×** (the paper gives no memory figure; it trains each model at the largest batch its memory "
        "allows, and prints 6144 for vanilla and 3456 for VTC, the opposite of what its text implies). "
        + ("No run logged `peak_memory/fit_gib`." if not (c[1]["mem"].n or c[2]["mem"].n) else "")).rstrip(), ""]
    section.body += failed_lines(records) + [""]
    section.claims = [
        Comparison("s=2 trains faster than s=1", "training time (s)", c[2]["time"], c[1]["time"], lower_is_better=True),
        Comparison("s=2 uses less memory than s=1", "peak memory (GiB)", c[2]["mem"], c[1]["mem"],
                   lower_is_better=True),
        Comparison("s=2 about as good as s=1", "MMEB", c[2]["mmeb"], c[1]["mmeb"], not_worse=True),
        Comparison("s=2 about as good as s=1", "VisDoc", c[2]["visdoc"], c[1]["visdoc"], not_worse=True),
    ]
    for k, ck in tc.items():  # beyond the paper (issue 27): does moving the pooling into the tower cost quality?
        what = f"in-tower k={k}"
        section.claims += [
            Comparison(f"{what} trains faster than s=2", "training time (s)", ck["time"], c[2]["time"],
                       lower_is_better=True),
            Comparison(f"{what} about as good as s=2", "MMEB", ck["mmeb"], c[2]["mmeb"], not_worse=True),
            Comparison(f"{what} about as good as s=2", "VisDoc", ck["visdoc"], c[2]["visdoc"], not_worse=True)]
    section.body += claims_lines(section, store, ["", "For the quality rows the claim is \"about as good\": a tie "
                                                  "counts as the right sign, and only *contradicted beyond noise* "
                                                  "refutes it (within noise either way is consistent with it)."])
    path = img_dir / "repro_table9.png"
    cats = [f"s={s}" for s in factors] + [f"s=2, in-tower k={k}" for k in tc]
    arms = [c[s] for s in factors] + list(tc.values())
    paper9 = [paper.TABLE9.get(s, {}) for s in factors] + [{} for _ in tc]
    panels = [Panel("MMEB", [Series("s", [a["mmeb"] for a in arms]),
                             Series("s", paper=[p.get("mmeb") for p in paper9])]),
              Panel("VisDoc", [Series("s", [a["visdoc"] for a in arms]),
                               Series("s", paper=[p.get("visdoc") for p in paper9])]),
              Panel("training time", [Series("s", [a["time"] for a in arms]),
                                      Series("s", paper=[(p["train_s"] / 3600 if p else None) for p in paper9])],
                    ylabel="seconds", paper_ylabel="hours"),
              Panel("peak memory", [Series("s", [a["mem"] for a in arms])], ylabel="GiB above the fit's start")]
    plot_panels(path, cats, panels, TITLES["9"], xlabel="compression factor")
    section.body += ["", f"![Table 9]({image_ref(path, out)})"]
    return section


