"""Encoding a corpus into a saved index: resumable chunks, shared across ranks, merged by rank 0.

The corpus is cut into fixed chunks of ``chunk_size`` items; chunk ``c`` belongs to rank ``c % world_size``. Each
finished chunk is written at once to ``OUT/chunks/chunk-{c:06d}.npy`` (atomically), so an interrupted run -- or a
crashed rank -- picks up where it stopped: chunks already on disk are not encoded again. ``OUT/chunks/run.json``
records what the chunks were made from (model fingerprint, ids, chunk size, role); a mismatch stops with the line to
delete the stale chunks. Rank 0 waits for all chunks, concatenates them in chunk order -- the same vectors whatever
``world_size`` was -- builds the index and removes the chunks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mmembed.index.core import Index, IndexKind
from mmembed.index.corpus import Corpus
from mmembed.rankparts import wait_for
from mmembed.types import Role

log = logging.getLogger(__name__)


def _chunk_path(out: Path, c: int) -> Path:
    return out / "chunks" / f"chunk-{c:06d}.npy"


def _run_record(embedder: Any, corpus: Corpus, chunk_size: int, role: str) -> dict[str, Any]:
    from mmembed.embedder import model_fingerprint

    ids = hashlib.sha1("\n".join(corpus.ids).encode()).hexdigest()
    return {"model_fingerprint": model_fingerprint(embedder), "ids_sha1": ids, "count": len(corpus),
            "chunk_size": chunk_size, "role": role}


def encode_corpus(embedder: Any, corpus: Corpus, out_dir: str | os.PathLike, *, role: Role = "candidate",
                  batch_size: int = 32, chunk_size: int = 1024, rank: int = 0, world_size: int = 1,
                  timeout_s: float = 3600.0, show_progress: bool = True) -> np.ndarray | None:
    """Encode this rank's chunks of the corpus (skipping those on disk); rank 0 returns all vectors in order.

    Args:
        embedder: An :class:`~mmembed.embedder.Embedder`.
        corpus: What to encode (:func:`mmembed.index.corpus.load_corpus`).
        out_dir: The index folder; chunks go to ``out_dir/chunks/``.
        role: ``"candidate"`` for a corpus (the paper's target template).
        batch_size: ``Embedder.encode`` batch size (each chunk is sorted by length inside).
        chunk_size: Items per chunk -- the unit of resuming and of sharing between ranks.
        rank / world_size: This process's share; other ranks' chunks are awaited by rank 0.
        timeout_s: How long rank 0 waits for the other ranks' chunks.
        show_progress: A progress bar over this rank's items.

    Returns:
        (N, D) float32 on rank 0; None on other ranks.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out = Path(out_dir)
    (out / "chunks").mkdir(parents=True, exist_ok=True)
    record = _run_record(embedder, corpus, chunk_size, role)
    rec_path = out / "chunks" / "run.json"
    if rec_path.exists():
        old = json.loads(rec_path.read_text())
        if old != record:
            changed = sorted(k for k in record if old.get(k) != record[k])
            raise ValueError(f"{out / 'chunks'} holds chunks of another run (different {', '.join(changed)}); "
                             "delete that folder to start over, or pass the same model, corpus and chunk size")
    else:
        tmp = rec_path.with_name(f"run.json.{rank}.tmp")
        tmp.write_text(json.dumps(record, sort_keys=True))
        os.replace(tmp, rec_path)

    n_chunks = (len(corpus) + chunk_size - 1) // chunk_size
    mine = [c for c in range(n_chunks) if c % world_size == rank]
    todo = [c for c in mine if not _chunk_path(out, c).exists()]
    done_items = sum(min(chunk_size, len(corpus) - c * chunk_size) for c in mine if c not in todo)
    if done_items:
        log.info("resuming: %d of this rank's %d chunks are already encoded", len(mine) - len(todo), len(mine))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not show_progress) as progress:
        task = progress.add_task(f"encoding corpus (rank {rank}/{world_size})",
                                 total=sum(min(chunk_size, len(corpus) - c * chunk_size) for c in mine),
                                 completed=done_items)
        for c in todo:
            items = corpus.items[c * chunk_size : (c + 1) * chunk_size]
            vecs = embedder.encode(items, role=role, batch_size=batch_size, convert_to_numpy=True,
                                   show_progress_bar=False)
            path = _chunk_path(out, c)
            tmp = path.with_name(path.name + ".tmp.npy")
            np.save(tmp, np.asarray(vecs, dtype=np.float32))
            os.replace(tmp, path)  # a chunk on disk is always complete
            progress.advance(task, len(items))
    if rank != 0:
        return None
    paths = [_chunk_path(out, c) for c in range(n_chunks)]
    wait_for(paths, timeout_s, lambda p: f"chunk {paths.index(p)} (rank {paths.index(p) % world_size}) {p}")
    if n_chunks == 0:
        return np.zeros((0, embedder.embed_dim), np.float32)
    return np.concatenate([np.load(_chunk_path(out, c)) for c in range(n_chunks)])


def build_index(embedder: Any, corpus: Corpus, out_dir: str | os.PathLike, *, kind: IndexKind = "flat",
                model: str | None = None, batch_size: int = 32, chunk_size: int = 1024, rank: int = 0,
                world_size: int = 1, show_progress: bool = True, keep_chunks: bool = False,
                **index_kwargs: Any) -> Index | None:
    """Encode a corpus (resumable, across ranks) and save it as an :class:`Index` in ``out_dir``.

    Args:
        model: The model name or folder recorded in ``index.json`` (``mmembed-index search`` loads it).
        keep_chunks: Leave ``out_dir/chunks`` in place after the index is written.
        **index_kwargs: ``nlist``, ``nprobe``, ``hnsw_m``, ``ef_search``, ... for :meth:`Index.build`.

    Returns:
        The saved index on rank 0; None on other ranks.
    """
    vectors = encode_corpus(embedder, corpus, out_dir, batch_size=batch_size, chunk_size=chunk_size, rank=rank,
                            world_size=world_size, show_progress=show_progress)
    if vectors is None:
        return None
    from mmembed.embedder import model_fingerprint

    info = {"model": model, "role": "candidate", "model_fingerprint": model_fingerprint(embedder),
            "source": corpus.source, "skipped": corpus.skipped}
    index = Index.build(vectors, corpus.ids, corpus.metadata, kind=kind, info=info, **index_kwargs)
    index.save(out_dir)
    if not keep_chunks:
        for p in (Path(out_dir) / "chunks").iterdir():
            p.unlink()
        (Path(out_dir) / "chunks").rmdir()
    log.info("index: %s -> %s", index, out_dir)
    return index
