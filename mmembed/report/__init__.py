"""The reproduction report (``mmembed-report``): the paper's ablation Tables 7-10 from our MLflow runs.

``paper`` holds the paper's numbers, ``collect`` finds the runs, ``stats`` aggregates seeds and judges claims against
seed noise, ``tables`` builds each table's section and plot, ``document`` writes ``docs/reproduction.md``.
"""

from mmembed.report.collect import ReportError, Store
from mmembed.report.document import write_report
from mmembed.report.stats import Cell, Comparison

__all__ = ["Cell", "Comparison", "ReportError", "Store", "write_report"]
