"""Quiet logs: every line printed once, and third-party lines that tell a user nothing dropped at their source.

:func:`quiet_logs` is the one place the kit touches other libraries' logging. It is called by the entry points
(``experiments/run.py``, ``mmembed-index``, the mining CLI), never on import: a library user's logging stays theirs.

What it does, and why:

- **Lightning's duplicate console line.** ``import lightning`` attaches its own console handler (format
  ``INFO: ...``) to the ``lightning`` logger unconditionally, while its records also propagate to the root logger,
  which Hydra has already given a console (and run log file) handler: every Lightning INFO line printed twice.
  When the root logger has handlers, Lightning's own console handler is removed, so its lines go through root
  once, in the run's format and into the run's log file (what Lightning does for its subpackages already).
- **bitsandbytes' kernel warning.** On CPUs with AVX512-BF16, importing bitsandbytes (``import peft`` does) asks
  the hub for an optional CPU kernel and warns when it cannot have it ("Failed to load CPU gemm_4bit_forward ...");
  the ``kernels`` package adds "Skipping publisher trust check ..." in offline mode. The kit never needs that
  kernel: both records are dropped by message on their own loggers.
- **Lightning's cloud tips** ("💡 Tip: ... litlogger / litmodels"): advertisements, dropped by message.
- **faiss' loader** logs 7 INFO lines about instruction sets on first import: its logger is set to WARNING.
- **Deprecations between pinned libraries** (peft reading transformers' ``is_gradient_checkpointing``, Lightning
  building torch's ``LeafSpec``): warnings about other libraries' internals a user cannot act on, ignored by
  message (:data:`IGNORED_WARNINGS`).

Filters sit on the loggers that create the records (a logger's filters do not see records propagated from its
children), so they apply whatever handlers are configured later.
"""

from __future__ import annotations

import logging
import sys
import warnings

#: logger name -> message prefixes whose records are dropped there.
DROPPED_MESSAGES: dict[str, tuple[str, ...]] = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    "kernels._internals.hf_hub": ("Skipping publisher trust check for 'kernels-community/",),
    "lightning.pytorch.utilities.rank_zero": ("💡 Tip:",),
    "lightning.fabric.utilities.rank_zero": ("💡 Tip:",),
}

#: (message regex, category) of Python warnings ignored: one library's use of another's deprecated internals.
IGNORED_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", Warning),
)

#: The format of the console handler ``import lightning`` attaches (lightning/__init__.py).
LIGHTNING_FORMAT = "%(levelname)s: %(message)s"

#: logger name -> the lowest level it emits.
LEVELS: dict[str, int] = {"faiss.loader": logging.WARNING}


class DropMessages(logging.Filter):
    """Drops records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_logs(*, lightning: bool = True) -> None:
    """Install the filters and levels above, and (when the root logger has handlers) one Lightning output.

    Idempotent; safe before or after the libraries are imported.

    Args:
        lightning: Also remove Lightning's duplicate console handler when the root logger has handlers (imports
            ``lightning`` if it is not imported yet; pass ``False`` from entry points that never use it).
    """
    for name, prefixes in DROPPED_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(prefixes))
    for name, level in LEVELS.items():
        logging.getLogger(name).setLevel(level)
    for message, category in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    if lightning and logging.getLogger().handlers:
        if "lightning" not in sys.modules:
            import lightning  # noqa: F401  (its import attaches the handler removed below)
        _drop_lightning_console()


def _drop_lightning_console() -> None:
    logger = logging.getLogger("lightning")
    for handler in list(logger.handlers):
        # Lightning's own handler, recognised by its format; a handler a user attached to "lightning" stays.
        fmt = getattr(handler.formatter, "_fmt", None)
        if type(handler) is logging.StreamHandler and fmt == LIGHTNING_FORMAT:
            logger.removeHandler(handler)
