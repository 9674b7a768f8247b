"""One PNG per table for the reproduction report: our mean ± std over seeds, the paper's numbers on a second axis.

Our runs are small models on the synthetic world, so their scores live on another scale than the paper's: each panel
draws ours on the left axis (error bars = sample std over seeds) and the paper's on a right axis (grey, dashed), so
the *shapes* (orderings) can be compared. Swept values are evenly spaced categories (ranks 8/16/32, factors 1/2/4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmembed.report.stats import Cell


@dataclass
class Series:
    """One line of a panel: our cells per category, or the paper's values (``paper=True``)."""

    label: str
    cells: Sequence[Cell] | None = None
    paper: Sequence[float] | None = None


@dataclass
class Panel:
    title: str
    series: Sequence[Series]
    ylabel: str = "score (x100)"


def plot_panels(path: Path, categories: Sequence[str], panels: Sequence[Panel], title: str, xlabel: str = "") -> Path:
    """Draw ``panels`` side by side over ``categories`` and save a PNG (Agg canvas, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(0.8 + 3.6 * len(panels), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    x = list(range(len(categories)))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for ax, panel in zip(axes, panels):
        twin = None
        ours = [s for s in panel.series if s.cells is not None]
        for i, s in enumerate(ours):
            ys = [c.mean for c in s.cells]
            err = [0.0 if math.isnan(c.std) else c.std for c in s.cells]
            shift = (i - (len(ours) - 1) / 2) * 0.06  # a small offset so overlapping error bars stay readable
            ax.errorbar([v + shift for v in x], ys, yerr=err, marker="o", capsize=4, color=colors[i % 4],
                        label=s.label if s.label == "ours" else f"{s.label}, ours")
        papers = [s for s in panel.series if s.paper is not None]
        if papers:
            twin = ax.twinx()
            for i, s in enumerate(papers):
                ys = [math.nan if v is None else v for v in s.paper]
                twin.plot(x, ys, linestyle="--", marker="x", color=colors[i % 4], alpha=0.45,
                          label=("paper" if s.label == "paper" else f"{s.label}, paper") + " (right axis)")
            twin.set_ylabel("paper", color="grey", fontsize=8)
            twin.tick_params(axis="y", labelcolor="grey", labelsize=8)
        ax.set_xticks(x, list(categories), fontsize=8)
        ax.set_xlim(-0.5, max(len(x) - 0.5, 0.5))
        ax.set_title(panel.title, fontsize=10)
        ax.set_ylabel(panel.ylabel, fontsize=8)
        if xlabel:
            ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if twin is not None:
            h2, l2 = twin.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        if handles:
            ax.legend(handles, labels, fontsize=7, loc="best")
    fig.suptitle(title, fontsize=11)
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
