"""Lightning callbacks of the kit: evaluation on MMEB / VisDoc-format data during training.

Installed as ``mmembed.callbacks`` (the repository folder ``callbacks/``). Names are imported lazily (PEP 562): a
config error must stay a one-line answer in seconds, and importing Lightning through ``mmembed.callbacks.eval`` for
every run before the config is checked would delay it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"BenchmarkEvalCallback": "eval", "MMEBEvalCallback": "eval", "VisDocEvalCallback": "eval"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
