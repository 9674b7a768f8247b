"""Process liveness: runs carry their host and process (:func:`process_tags`); a RUNNING run whose process is gone is
marked KILLED when the next run starts (:func:`mark_stale_runs`); a resumed run reopens its own run
(:func:`reopen_run`)."""

from __future__ import annotations

import os
import shlex
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mmembed.tracking.store import (
    COMMAND_TAG,
    END_REASON_TAG,
    HOST_TAG,
    PID_START_TAG,
    PID_TAG,
    RESUMED_TAG,
    _quote,
)

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """``(state, start time)`` of a process from ``/proc/<pid>/stat`` (Linux); None when unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[-1].split()  # the command name (field 2) may hold spaces and parentheses
    return (fields[0], fields[19]) if len(fields) > 19 else None


def command_line() -> str:
    """This process's command line as it can be typed again (``python experiments/run.py +exp=x seed=0``)."""
    argv = list(sys.argv)
    return shlex.join((["python"] if argv and argv[0].endswith(".py") else []) + argv)[:5000]


def process_tags() -> dict[str, str]:
    """Tags naming this process (host, pid, start time), by which :func:`mark_stale_runs` tells a dead run, and its
    command line (:data:`~mmembed.tracking.store.COMMAND_TAG`)."""
    stat = _proc_stat(os.getpid())
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), PID_START_TAG: stat[1] if stat else "",
            COMMAND_TAG: command_line()}


def process_alive(pid: int, start: str | None = None) -> bool:
    """Whether process ``pid`` of this host runs (and, when ``start`` is given, is the one started then)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, started = stat
    return state not in ("Z", "X") and (not start or started == start)


def mark_stale_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this host whose process is gone (e.g. killed with ``kill -9``).

    Runs recorded on other hosts are left alone: their processes cannot be checked from here.

    Returns:
        The ids of the runs marked.
    """
    host = socket.gethostname()
    runs = client.search_runs([experiment_id], max_results=1000,
                              filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{_quote(host)}'")
    marked = []
    for run in runs:
        pid = run.data.tags.get(PID_TAG, "")
        if not pid.isdigit() or process_alive(int(pid), run.data.tags.get(PID_START_TAG) or None):
            continue
        client.set_tag(run.info.run_id, END_REASON_TAG, f"process {pid} on {host} ended without closing the run")
        client.set_terminated(run.info.run_id, "KILLED")
        marked.append(run.info.run_id)
    return marked


def reopen_run(client: MlflowClient, run_id: str) -> None:
    """Continue ``run_id`` in this process (resume from a checkpoint): RUNNING again, this process's tags."""
    run = client.get_run(run_id)
    resumed = int(run.data.tags.get(RESUMED_TAG, "0") or 0) + 1
    client.update_run(run_id, status="RUNNING")
    for key, value in {**process_tags(), RESUMED_TAG: str(resumed)}.items():
        client.set_tag(run_id, key, value)
