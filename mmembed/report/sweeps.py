"""A sweep's points: per swept value, the mean ± sample std of each metric over its runs (seeds), the best point, and
the plot the sweep's MLflow parent carries (``mmembed.tracking.summarize_sweep`` writes them as its artifacts)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmembed.report.plots import Panel, Series, plot_panels
from mmembed.report.stats import Cell

if TYPE_CHECKING:
    import pandas as pd

GOOD_STATUSES = ("FINISHED", "RUNNING")  # children whose values count (failed and killed ones are listed, not averaged)


def point_cells(frame: pd.DataFrame, param: str, metrics: list[str]) -> dict[Any, dict[str, Cell]]:
    """``{swept value: {metric: Cell}}``: one cell per point and metric, a value per run (finite values only)."""
    out: dict[Any, dict[str, Cell]] = {}
    for value, group in frame.groupby(param, sort=True):
        out[value] = {m: Cell({str(i): float(v) for i, v in enumerate(group[m].dropna())}) for m in metrics}
    return out


def point_table(frame: pd.DataFrame, param: str, metrics: list[str]) -> pd.DataFrame:
    """Per swept value: ``runs`` (how many children) and each metric's mean and ``<metric> std`` (0 for one run)."""
    import pandas as pd

    rows = []
    cells = point_cells(frame, param, metrics)
    for value, group in frame.groupby(param, sort=True):
        row: dict[str, Any] = {param: value, "runs": len(group)}
        for m in metrics:
            c = cells[value][m]
            row[m] = c.mean
            row[f"{m} std"] = c.std if c.n > 1 else 0.0
        rows.append(row)
    return pd.DataFrame(rows, columns=[param, "runs", *[c for m in metrics for c in (m, f"{m} std")]])


def mean_std_table(points: pd.DataFrame, param: str, metrics: list[str]) -> pd.DataFrame:
    """The point table as text cells: ``mean ± std`` where a point has several runs, ``mean`` otherwise."""
    import pandas as pd

    out = {param: list(points[param]), "runs": list(points["runs"])}
    for m in metrics:
        out[m] = [("" if math.isnan(v) else f"{v:.2f}" + (f" ± {s:.2f}" if n > 1 else ""))
                  for v, s, n in zip(points[m], points[f"{m} std"], points["runs"])]
    return pd.DataFrame(out)


def best_point(points: pd.DataFrame, param: str, metrics: list[str]) -> tuple[Any, str, float] | None:
    """``(value, metric, score)`` of the best point by the first metric that has values (lowest for losses)."""
    for m in metrics:
        vals = points[m]
        if len(vals) and not vals.isna().all():
            idx = vals.idxmin() if "loss" in m else vals.idxmax()
            return points.loc[idx, param], m, float(vals[idx])
    return None


def plot_sweep(frame: pd.DataFrame, param: str, metrics: list[str], path: Path) -> None:
    """One panel per metric (their scales differ: a loss and a percentage share no axis), the swept values as evenly
    spaced categories (ranks 8/16/32 and factors 1/2/4 are not linear quantities), error bars = sample std when a
    point has several runs (:func:`mmembed.report.plots.plot_panels`)."""
    cells = point_cells(frame, param, metrics)
    shown = [m for m in metrics if any(c[m].n for c in cells.values())] or metrics[:1]
    panels = [Panel(m, [Series("ours", cells=[cells[v][m] for v in cells])], ylabel=m.rsplit("/", 1)[-1])
              for m in shown]
    most = max((c[m].n for c in cells.values() for m in metrics), default=1)
    runs = f"mean \u00b1 std over up to {most} runs per point" if most > 1 else "one run per point"
    plot_panels(path, [str(v) for v in cells], panels, f"{param} ({runs})", xlabel=param.rsplit(".", 1)[-1])
