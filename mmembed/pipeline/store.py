"""Stage folders keyed by content, completed atomically, built once under a file lock.

A stage's identity is a hash of what defines its work: its resolved config (minus output locations) and the
identities of its inputs (the keys of the stages it consumes, or fingerprints of explicit files / folders). Its
folder is ``<root>/<name>-<key[:12]>``; it is complete only when ``COMPLETE`` exists there, a JSON record written to
a temporary file and moved into place with ``os.replace`` (atomic on POSIX), as the very last act of the stage. So:

* re-running the same stage finds ``COMPLETE`` and reuses the folder (and says so);
* a stage killed mid-way leaves a folder without ``COMPLETE``; the next run re-enters it and the stage function is
  told where its last Lightning checkpoint is (``StageContext.resume_from``), so training continues from there;
* two processes that need the same stage at once (a parallel Hydra sweep sharing a warm-up) serialise on
  ``<folder>.lock`` (``filelock``): the first builds, the second waits and then finds ``COMPLETE``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

COMPLETE = "COMPLETE"
LAST_CKPT = "checkpoints/last.ckpt"


def canonical_json(value: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces); non-JSON leaves become their ``str``."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def stage_key(config: Mapping[str, Any], inputs: Mapping[str, str] | None = None) -> str:
    """SHA-256 (hex) of a stage's config and its inputs' keys / fingerprints."""
    payload = canonical_json({"config": config, "inputs": dict(inputs or {})})
    return hashlib.sha256(payload.encode()).hexdigest()


def fingerprint(path: str | Path) -> str:
    """Identity of an explicit input path.

    A completed stage folder (or a path inside one) -> that stage's key; a file -> SHA-256 of its bytes; a folder
    -> SHA-256 of its file names, sizes and modification times (cheap, and changes whenever a file is rewritten).
    """
    path = Path(path).expanduser().resolve()
    for folder in (path, *path.parents):
        marker = folder / COMPLETE
        if marker.is_file():
            record = json.loads(marker.read_text())
            rel = path.relative_to(folder).as_posix()
            return record["key"] + ("" if rel == "." else f":{rel}")
    if path.is_file():
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    if path.is_dir():
        entries = sorted((p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                         for p in path.rglob("*") if p.is_file())
        return hashlib.sha256(canonical_json(entries).encode()).hexdigest()
    raise FileNotFoundError(f"stage input {path} does not exist")


@dataclass
class StageContext:
    """What a stage function receives.

    Attributes:
        name: Stage name.
        key: The stage's full key.
        folder: Where it writes everything (created).
        resume_from: The last Lightning checkpoint a killed earlier attempt left (``folder/checkpoints/last.ckpt``),
            or None: pass it as ``ckpt_path`` to ``Trainer.fit``.
    """

    name: str
    key: str
    folder: Path
    resume_from: Path | None = None


@dataclass
class StageResult:
    """A completed stage: its folder, the outputs and metrics its function returned, and whether it was reused."""

    name: str
    key: str
    folder: Path
    outputs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    reused: bool = False
    seconds: float = 0.0

    def output(self, name: str) -> Path:
        """An output path of the stage (relative outputs are taken relative to its folder)."""
        if name not in self.outputs:
            raise KeyError(f"stage {self.name} has no output {name!r} (it has {sorted(self.outputs)})")
        p = Path(self.outputs[name])
        return p if p.is_absolute() else self.folder / p


StageFn = Callable[[StageContext], Mapping[str, Any]]


def read_complete(folder: Path) -> StageResult | None:
    """The completion record of a stage folder, or None when the stage never finished there."""
    marker = Path(folder) / COMPLETE
    if not marker.is_file():
        return None
    r = json.loads(marker.read_text())
    return StageResult(r["name"], r["key"], Path(folder), r.get("outputs", {}), r.get("metrics", {}), True,
                       r.get("seconds", 0.0))


def _write_complete(folder: Path, record: Mapping[str, Any]) -> None:
    tmp = folder / f".{COMPLETE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, folder / COMPLETE)  # atomic: readers see no marker or a whole one


class StageStore:
    """The folder of all stage folders (e.g. ``<root>/stages``).

    Args:
        root: The store's folder.
        log: Where progress lines go (default ``print``).
    """

    def __init__(self, root: str | Path, log: Callable[[str], None] = print) -> None:
        self.root = Path(root)
        self.log = log

    def folder(self, name: str, key: str) -> Path:
        return self.root / f"{name}-{key[:12]}"

    def run(self, name: str, config: Mapping[str, Any], fn: StageFn,
            inputs: Mapping[str, str] | None = None) -> StageResult:
        """Reuse the completed stage for ``(config, inputs)`` or build it with ``fn`` (once, under a lock).

        Args:
            name: Stage name (the folder's prefix).
            config: What defines the stage's work (plain containers; output locations left out).
            fn: Builds the stage into ``ctx.folder``; returns ``{"outputs": {...}, "metrics": {...}}`` (paths in
                outputs may be relative to the folder).
            inputs: The stage's inputs as keys / fingerprints (:func:`fingerprint`, or ``StageResult.key``).
        """
        key = stage_key(config, inputs)
        folder = self.folder(name, key)
        done = read_complete(folder)
        if done is not None:
            self.log(f"[pipeline] {name}: reusing complete stage {folder}")
            return done
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder) + ".lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            self.log(f"[pipeline] {name}: another process is building {folder}; waiting for it")
            lock.acquire()
        try:
            done = read_complete(folder)
            if done is not None:  # built by the process we waited for
                self.log(f"[pipeline] {name}: reusing stage {folder} (built by a concurrent run)")
                return done
            folder.mkdir(parents=True, exist_ok=True)
            ckpt = folder / LAST_CKPT
            resume = ckpt if ckpt.is_file() else None
            self.log(f"[pipeline] {name}: " + (f"resuming from {ckpt}" if resume else f"building in {folder}"))
            (folder / "stage.json").write_text(json.dumps({"name": name, "key": key, "config": config,
                                                           "inputs": dict(inputs or {})}, indent=2, default=str))
            t0 = time.perf_counter()
            out = dict(fn(StageContext(name, key, folder, resume)) or {})
            seconds = time.perf_counter() - t0
            record = {"name": name, "key": key, "inputs": dict(inputs or {}), "outputs": out.get("outputs", {}),
                      "metrics": out.get("metrics", {}), "seconds": seconds,
                      "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            _write_complete(folder, record)
            self.log(f"[pipeline] {name}: complete in {seconds:.1f}s")
            return StageResult(name, key, folder, record["outputs"], record["metrics"], False, seconds)
        finally:
            lock.release()
