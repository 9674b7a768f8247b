"""Embedding the corpora and queries of a collection, shared out across ranks (mining and judge curation).

Work is cut into fixed-size blocks (``batch_size * BLOCK_BATCHES`` items per role and dataset, items ordered by size)
that are encoded the same way whatever the world size; block ``b`` belongs to rank ``b % world_size``. Ranks other
than 0 write their blocks to a part file; rank 0 waits for the parts, checks they belong to the same split, merges
them and puts the rows back in list order. :func:`embed_datasets` does all of it; mining and curation call it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from rich.progress import track

from mmembed.embedder import model_fingerprint  # noqa: F401  (re-exported: mining callers use it here)
from mmembed.rankparts import gather_parts, part_path, write_part  # noqa: F401  (part_path: re-exported)
from mmembed.types import Item

if TYPE_CHECKING:
    from mmembed.mining.corpus import DatasetCorpus

log = logging.getLogger(__name__)

#: Encode calls are made on blocks of ``batch_size * BLOCK_BATCHES`` items: big enough for the embedder's
#: length-sorted batching to save padding, and the unit that ranks share out.
BLOCK_BATCHES = 8
ROLES = ("candidate", "query")

def size_key(item: Item) -> tuple[int, int]:
    """Cheap length proxy (image pixels, text characters): sorting by it puts items of like cost in one block."""
    image = item.image
    area = 0 if image is None else (image.size[0] * image.size[1] if isinstance(image, Image.Image) else 1)
    return area, len(item.text or "")


def embedding_order(items: list[Item]) -> list[int]:
    """The order a role's items are embedded in: by size, so a block (and each batch in it) holds items of similar
    length and pads little; stable, so every rank and every world size derives the same order."""
    return sorted(range(len(items)), key=lambda i: size_key(items[i]))


def work_blocks(datasets: dict[str, DatasetCorpus], block_size: int,
            roles: Sequence[str] = ROLES) -> list[tuple[str, str, int, int]]:
    """The work blocks ``(dataset, role, start, stop)`` in a fixed order; block ``b`` belongs to rank ``b % world``."""
    out = []
    for name, ds in datasets.items():
        for role in roles:
            total = len(ds.corpus) if role == "candidate" else len(ds.unique_queries)
            out.extend((name, role, s, min(s + block_size, total)) for s in range(0, total, block_size))
    return out


def split_fingerprint(embedder: Any, datasets: dict[str, DatasetCorpus], block_size: int, world_size: int) -> str:
    """Identifies the work split, so a merge never mixes parts from another input, split or model.

    The model enters through a few values of every parameter: cheap even for a 1B model, and enough to tell a
    stale part left by a crashed run with other weights from this run's.
    """
    h = hashlib.sha1(f"{block_size}/{world_size}".encode())
    h.update(model_fingerprint(embedder).encode())
    for name, ds in datasets.items():
        h.update(name.encode())
        h.update("\n".join(c.cid + c.key for c in ds.corpus).encode())
        h.update("\n".join(d.sample.id for d in ds.samples).encode())
    return h.hexdigest()


def embed_blocks(embedder: Any, datasets: dict[str, DatasetCorpus], blocks: list[tuple[str, str, int, int]],
                 mine: list[int], batch_size: int, show_progress: bool,
                 description: str = "embedding") -> dict[int, torch.Tensor]:
    items = {(name, role): ds.items(role) for name, ds in datasets.items() for role in ROLES}
    order = {key: embedding_order(its) for key, its in items.items()}
    it = track(mine, description=description) if show_progress else mine
    out = {}
    for b in it:
        name, role, start, stop = blocks[b]
        block = [items[name, role][i] for i in order[name, role][start:stop]]
        out[b] = embedder.encode(block, role=role, batch_size=batch_size, show_progress=False)
    return out


def assemble(datasets: dict[str, DatasetCorpus], blocks: list[tuple[str, str, int, int]],
              embedded: dict[int, torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
    missing = [b for b in range(len(blocks)) if b not in embedded]
    if missing:
        raise RuntimeError(f"{len(missing)} embedding blocks are missing after the merge (first: {blocks[missing[0]]})")
    pieces: dict[tuple[str, str], list[torch.Tensor]] = {}
    for b, (name, role, _, _) in enumerate(blocks):
        pieces.setdefault((name, role), []).append(embedded[b])
    out = {}
    for (name, role), parts in pieces.items():
        ds, ordered = datasets[name], torch.cat(parts)
        emb = torch.empty_like(ordered)
        emb[torch.tensor(embedding_order(ds.items(role)), dtype=torch.long)] = ordered  # back to list order
        out[name, role] = emb[torch.tensor(ds.query_index, dtype=torch.long)] if role == "query" else emb
    return out


def embed_datasets(embedder: Any, datasets: dict[str, DatasetCorpus], parts_dir: str | os.PathLike, *,
                   batch_size: int, world_size: int = 1, rank: int = 0, roles: Sequence[str] = ROLES,
                   fingerprint_extra: str = "", part_timeout_s: float = 3600.0, show_progress: bool | None = None,
                   description: str = "embedding") -> dict[tuple[str, str], torch.Tensor] | None:
    """Embed every dataset's ``roles`` (queries and/or corpus), shared out across ranks.

    Returns:
        On rank 0, ``{(dataset, role): (N, D) embeddings}`` in list order (queries: one row per sample);
        ``None`` on the other ranks, whose blocks are left in ``parts_dir`` for rank 0 to merge.
    """
    block_size = batch_size * BLOCK_BATCHES
    blocks = work_blocks(datasets, block_size, roles=roles)
    mine = [b for b in range(len(blocks)) if b % world_size == rank]
    show = len(mine) > 8 if show_progress is None else show_progress
    embedded = embed_blocks(embedder, datasets, blocks, mine, batch_size, show, description=description)
    if world_size > 1:
        fingerprint = split_fingerprint(embedder, datasets, block_size, world_size) + fingerprint_extra
        parts = Path(parts_dir)
        if rank != 0:
            path = write_part(parts, rank, world_size, fingerprint, embedded)
            log.info("rank %d/%d: embedded %d blocks -> %s", rank, world_size, len(mine), path)
            return None
        embedded = gather_parts(parts, world_size, fingerprint, embedded, part_timeout_s)
    return assemble(datasets, blocks, embedded)
