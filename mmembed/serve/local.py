"""Starting ``mmembed-serve`` as a local child process (for tests, benchmarks and notebooks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalServer:
    """``with LocalServer("tiny", ["--device", "cpu"]) as srv: requests.post(srv.url + "/v1/embeddings", ...)``.

    Runs ``python -m mmembed.serve.cli`` on a free loopback port in its own process group, waits for ``/health``,
    and on exit stops it with SIGTERM (graceful), then SIGKILL for the whole group if it lingers.

    Args:
        model: Preset name or model folder.
        args: Extra ``mmembed-serve`` arguments.
        startup_timeout: Seconds to wait for ``/health`` (the worker loads the model first).
        log_path: Where the server's output goes (default: a file next to nothing -- discarded).
    """

    def __init__(self, model: str, args: Sequence[str] = (), *, startup_timeout: float = 300.0,
                 log_path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> None:
        self.model, self.args, self.startup_timeout = model, list(args), startup_timeout
        self.log_path = Path(log_path) if log_path is not None else None
        self.env = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> LocalServer:
        cmd = [sys.executable, "-m", "mmembed.serve.cli", "--model", self.model, "--port", str(self.port),
               *self.args]
        out = open(self.log_path, "wb") if self.log_path is not None else subprocess.DEVNULL  # noqa: SIM115
        env = {**os.environ, **(self.env or {})}
        # The repo root first on the child's path, so a source checkout serves its own code.
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text()[-2000:] if self.log_path is not None else ""
                raise RuntimeError(f"mmembed-serve exited with code {self.proc.returncode} before it was ready\n{tail}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"mmembed-serve was not healthy within {self.startup_timeout:.0f}s")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        try:  # the server's own children (HTTP process, model worker) share its process group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(timeout=10)

    def __exit__(self, *exc) -> None:
        self.stop()
