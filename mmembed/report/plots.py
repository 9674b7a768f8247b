"""One PNG per table for the reproduction report: ours (mean ± std over seeds) above, the paper's numbers below.

Our runs are small models on the synthetic world, so their scores live on another scale than the paper's. Rather
than a second y-axis against ours (which invites reading the two scales as one), every metric gets a column of two
panels with their own axes: ours on top (error bars = sample std over seeds), the paper's beneath, over the same
categories, so the *shapes* (orderings) can be compared. One legend for the figure sits outside the panels. Swept
values are evenly spaced categories (ranks 8/16/32, factors 1/2/4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmembed.report.stats import Cell

COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red"]


@dataclass
class Series:
    """One line of a panel: our cells per category, or the paper's values (``paper=[...]``)."""

    label: str
    cells: Sequence[Cell] | None = None
    paper: Sequence[float | None] | None = None


@dataclass
class Panel:
    """One metric: its series (ours and the paper's), the y label of ours, and of the paper's (default the same)."""

    title: str
    series: Sequence[Series]
    ylabel: str = "score (x100)"
    paper_ylabel: str | None = None


def draw_panels(categories: Sequence[str], panels: Sequence[Panel], title: str, xlabel: str = "") -> Any:
    """A matplotlib ``Figure`` (Agg canvas, no display needed): one column per panel over ``categories``, ours on
    top, the paper's below, each on its own y-axis; one figure legend outside the panels when series are named."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.6 + 3.4 * len(panels), 5.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(panels), squeeze=False, sharex="col")
    x = list(range(len(categories)))
    # One color per series label across all panels and both rows, so a single figure legend names them.
    names = list(dict.fromkeys(s.label for p in panels for s in p.series))
    color = {name: COLORS[i % len(COLORS)] for i, name in enumerate(names)}
    legend: dict[str, object] = {}
    for col, panel in enumerate(panels):
        ours_ax, paper_ax = axes[0][col], axes[1][col]
        ours = [s for s in panel.series if s.cells is not None]
        for i, s in enumerate(ours):
            ys = [c.mean for c in s.cells]
            err = [0.0 if math.isnan(c.std) else c.std for c in s.cells]
            shift = (i - (len(ours) - 1) / 2) * 0.06  # a small offset so overlapping error bars stay readable
            h = ours_ax.errorbar([v + shift for v in x], ys, yerr=err, marker="o", capsize=4, color=color[s.label])
            legend.setdefault(s.label, h)
        papers = [s for s in panel.series if s.paper is not None]
        for s in papers:
            ys = [math.nan if v is None else v for v in s.paper]
            (h,) = paper_ax.plot(x, ys, linestyle="--", marker="x", color=color[s.label])
            legend.setdefault(s.label, h)
        if not papers:
            paper_ax.text(0.5, 0.5, "no figure in the paper", ha="center", va="center", fontsize=8, color="grey",
                          transform=paper_ax.transAxes)
            paper_ax.set_yticks([])
        ours_ax.set_title(f"{panel.title}: ours (mean ± std)", fontsize=9)
        paper_ax.set_title(f"{panel.title}: paper", fontsize=9)
        ours_ax.set_ylabel(panel.ylabel, fontsize=8)
        paper_ax.set_ylabel(panel.paper_ylabel or panel.ylabel, fontsize=8)
        for ax in (ours_ax, paper_ax):
            ax.set_xticks(x, list(categories), fontsize=8)
            ax.set_xlim(-0.5, max(len(x) - 0.5, 0.5))
            ax.grid(alpha=0.3)
            ax.tick_params(axis="y", labelsize=8)
        if xlabel:
            paper_ax.set_xlabel(xlabel, fontsize=8)
    if len(legend) > 1:  # outside the data: to the right of the panels (constrained layout makes room for it)
        fig.legend(list(legend.values()), list(legend), loc="outside right upper", fontsize=8,
                   title="ours: solid, paper: dashed", title_fontsize=7)
    fig.suptitle(title, fontsize=11)
    return fig


def plot_panels(path: Path, categories: Sequence[str], panels: Sequence[Panel], title: str, xlabel: str = "") -> Path:
    """:func:`draw_panels`, saved as a PNG at ``path``."""
    fig = draw_panels(categories, panels, title, xlabel)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def plot_steps(frame: Any, metrics: Sequence[str], path: Path) -> Path:
    """A grouped bar chart of a pipeline's cumulative steps (``frame``: a ``step`` column, one column per metric)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(metrics))
    x = list(range(len(frame)))
    for j, m in enumerate(metrics):
        ax.bar([i + (j - (len(metrics) - 1) / 2) * width for i in x], frame[m], width, label=m)
    ax.set_xticks(x, [str(s) for s in frame["step"]], rotation=20, ha="right")
    ax.set_ylabel("score")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    return path
