"""The reproduction report (``mmembed-report``): the paper's ablation Tables 7-10 from our MLflow runs.

``paper`` holds the paper's numbers, ``collect`` finds the runs, ``stats`` aggregates seeds and judges claims against
seed noise, ``tables`` builds each table's section and plot, ``document`` writes ``docs/reproduction.md``.
``stats``, ``plots``, ``markdown`` and ``sweeps`` read no store: ``mmembed.tracking`` uses them for a sweep's summary,
so this package's names are imported lazily (PEP 562) and importing one of those does not pull in the MLflow side.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"Cell": "stats", "Comparison": "stats", "ReportError": "collect", "Store": "collect",
            "write_report": "document"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
