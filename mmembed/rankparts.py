"""Work shared out across ranks through files: each rank writes its part, rank 0 waits for the others with a deadline.

Used by corpus embedding for mining and curation (:mod:`mmembed.mining.embedding`), the judge's scores
(:mod:`mmembed.judge.curate`) and saved-index encoding (:mod:`mmembed.index.build`). Ranks may be processes of one
job or separate runs one after another: nothing but the files connects them, so a part carries a fingerprint of the
settings it was made with, and a stale part of another run is refused rather than merged.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


def part_path(folder: Path, rank: int, world_size: int) -> Path:
    """Where rank ``rank`` of ``world_size`` leaves its part in ``folder``."""
    return folder / "tmp" / f"part-{rank:03d}-of-{world_size:03d}.pt"


def write_part(folder: Path, rank: int, world_size: int, fingerprint: str, blocks: Mapping[int, Any]) -> Path:
    """Save this rank's ``{block: tensor}`` with the run's fingerprint, atomically (rank 0 never reads half a part)."""
    path = part_path(folder, rank, world_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"fingerprint": fingerprint, "blocks": dict(blocks)}, tmp)
    os.replace(tmp, path)
    return path


def wait_for(paths: Sequence[Path], timeout_s: float, missing: Callable[[Path], str], poll_s: float = 1.0) -> None:
    """Block until every path exists, all within one deadline of ``timeout_s`` seconds.

    Raises:
        TimeoutError: ``missing(path)`` for the first path that did not appear, with the wait in seconds.
    """
    deadline = time.monotonic() + timeout_s
    for path in paths:
        while not path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{missing(path)} did not appear within {timeout_s:.0f}s; run that rank with the "
                                   "same settings, or raise the timeout")
            time.sleep(poll_s)


def gather_parts(folder: Path, world_size: int, fingerprint: str, own: Mapping[int, Any], timeout_s: float,
                 poll_s: float = 2.0) -> dict[int, Any]:
    """Rank 0: wait for the other ranks' parts, check they belong to this run (``fingerprint``) and merge them.

    Raises:
        TimeoutError: A rank's part did not appear in time.
        ValueError: A part was written by a run with other settings.
    """
    paths = [part_path(folder, r, world_size) for r in range(1, world_size)]
    wait_for(paths, timeout_s, lambda p: f"rank {paths.index(p) + 1}'s part {p}", poll_s)
    merged = dict(own)
    for path in paths:
        part = torch.load(path, map_location="cpu", weights_only=True)
        if part["fingerprint"] != fingerprint:
            raise ValueError(f"{path} was written for other shards, model, batch_size or world_size; delete "
                             f"{path.parent} and rerun every rank")
        merged.update(part["blocks"])
    return merged
