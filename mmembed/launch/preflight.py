"""The command line checked before Hydra runs it: an unknown key or an unknown ``+exp`` is one line, exit status 2.

Hydra reports composition errors itself, over several lines (and a hint about ``HYDRA_FULL_ERROR``) after its own
start-up; composing the same overrides once here first turns them into the launcher's ``config error: ...`` line.
Runs with Hydra flags (``-m``, ``--cfg``, ``--help``, ...) are left to Hydra as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mmembed.launch.config import ConfigError


def _one_line(exn: BaseException) -> str:
    lines = [line.strip() for line in str(exn).splitlines() if line.strip()]
    head = []
    for line in lines:
        if line.startswith("Available options"):
            break
        head.append(line.rstrip("."))
    text = "; ".join(head) or type(exn).__name__
    options = getattr(exn, "options", None)
    if options:
        text += f"; available: {', '.join(options)}"
    cause = exn.__cause__
    if cause is not None and str(cause).strip():
        text += f" ({str(cause).strip().splitlines()[0]})"
    return text


def check_overrides(argv: Sequence[str], config_dir: str | Path, config_name: str = "run") -> None:
    """Compose ``config_name`` with the command line's overrides; a composition error becomes a :class:`ConfigError`.

    Args:
        argv: The command line after the program name.
        config_dir: The primary config folder (``experiments/configs``).
        config_name: The primary config.

    Raises:
        ConfigError: One line: what Hydra refused (unknown key, unknown group option, bad override syntax).
    """
    if any(a.startswith("-") for a in argv):
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
            compose(config_name, overrides=list(argv))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_one_line(e)) from None
