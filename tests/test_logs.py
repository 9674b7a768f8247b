"""mmembed.logs.quiet_logs: each line once, third-party noise dropped at its source (checked against the real libs)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# A run's logging as Hydra sets it up (a root console handler with its own format), then what the kit's runs emit:
# Lightning INFO lines and tips, bitsandbytes' kernel warning, faiss' loader lines, a deprecation between libraries.
SCRIPT = textwrap.dedent("""
    import logging, sys, warnings
    logging.basicConfig(level=logging.INFO, format="ROOT %(name)s: %(message)s", stream=sys.stderr)
    if sys.argv[1] == "quiet":
        from mmembed.logs import quiet_logs
        quiet_logs()
    from lightning.pytorch.utilities.rank_zero import rank_zero_info
    rank_zero_info("hello from lightning")
    rank_zero_info("💡 Tip: For seamless cloud logging, try installing [litlogger]")
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
        "Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "no network")
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("a bitsandbytes warning that matters")
    import faiss
    warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
""")


def _stderr(mode: str) -> str:
    r = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stderr


@pytest.mark.e2e
def test_quiet_logs_prints_each_line_once_and_drops_the_noise():
    loud, quiet = _stderr("loud"), _stderr("quiet")
    # without it (the control): Lightning's own handler and the root handler both print, and the noise is there
    assert loud.count("hello from lightning") == 2
    assert "Tip:" in loud and "gemm_4bit_forward" in loud and "is_gradient_checkpointing" in loud
    assert "Loading faiss" in loud
    # with it: once, in the root's format; noise gone; other warnings of the same loggers kept
    assert quiet.count("hello from lightning") == 1 and "ROOT lightning.pytorch.utilities.rank_zero: hello" in quiet
    for noise in ("Tip:", "gemm_4bit_forward", "faiss", "is_gradient_checkpointing"):
        assert noise not in quiet, noise
    assert "a bitsandbytes warning that matters" in quiet


def test_quiet_logs_is_idempotent_and_leaves_other_records():
    import logging

    from mmembed.logs import DropMessages, quiet_logs

    quiet_logs(lightning=False)
    quiet_logs(lightning=False)
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert sum(isinstance(f, DropMessages) for f in logger.filters) == 1
    record = logging.LogRecord(logger.name, logging.WARNING, __file__, 1, "Failed to load CPU gemm_4bit_forward", (),
                               None)
    assert not logger.filter(record)
    record.msg = "something else"
    assert logger.filter(record)
    assert logging.getLogger("faiss.loader").getEffectiveLevel() == logging.WARNING
