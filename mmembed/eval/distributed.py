"""Evaluation across processes: share every ``encode`` call out over the ranks of a ``torch.distributed`` group.

Wired into ``mmembed-eval --devices N`` (:func:`spawn_evaluation`) and into the eval callbacks under DDP.

The runners (``evaluate_mmeb``, ``evaluate_visdoc``, the eval callbacks) only call ``encode``; wrapping the embedder
in :class:`ShardedEncoder` lets N processes (``torchrun``, or Lightning's DDP ranks, which have the group set up)
embed 1/N of every set each, and every rank receives all rows, so every rank computes the same metrics. Write
result files from rank 0 only (``out_dir=None`` on the others)::

    torch.distributed.init_process_group("nccl")          # or let torchrun / Lightning do it
    enc = ShardedEncoder(Embedder.from_pretrained(model, device=f"cuda:{local_rank}"))
    result = evaluate_mmeb(enc, data, out_dir=out if dist.get_rank() == 0 else None)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from mmembed.types import Item, Role


class ShardedEncoder:
    """An encoder whose ``encode`` is split over the processes of a group, with the full result on every rank.

    The items are ordered and cut into batches exactly as the wrapped ``Embedder.encode`` does in one process
    (by token count, ``batch_size`` per batch); batch ``b`` goes to rank ``b % N``, which embeds it as one
    batch; the rows are all-gathered and put back in input order. Every item therefore sits in the same batch, with
    the same neighbours and padding, as in a single-process run, so the embeddings -- and the metrics -- are the
    same to the bit. An encoder without an ``input_builder`` is batched in input order. Without an initialised
    process group this is the wrapped encoder.

    Args:
        encoder: an ``Embedder`` or anything with its ``encode``; every rank must hold the same model.
        group: the process group (default: the global one).
    """

    def __init__(self, encoder: Any, group: dist.ProcessGroup | None = None) -> None:
        self.encoder = encoder
        self.group = group

    def __getattr__(self, name: str) -> Any:  # embed_dim, device, input_builder, ... of the wrapped encoder
        return getattr(self.__dict__["encoder"], name)

    def _batches(self, items: list[Item], batch_size: int, role: Role) -> list[list[int]]:
        # Embedder.encode's own order: a stable sort by token count (its input builder's ``num_tokens``); a batch
        # passed back to encode is already sorted, so it keeps that order and its padding.
        builder = getattr(self.encoder, "input_builder", None)
        if builder is not None and hasattr(builder, "num_tokens"):
            lengths = builder.num_tokens(items, role)
            order = sorted(range(len(items)), key=lengths.__getitem__)
        else:
            order = list(range(len(items)))
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    def encode(self, items: list[Item], role: Role = "query", batch_size: int = 16,
               show_progress: bool | None = None, **kwargs: Any) -> torch.Tensor:
        """Embed ``items`` with all ranks; every rank must call this with the same items, in the same order."""
        if not (dist.is_available() and dist.is_initialized()) or not items:
            return self.encoder.encode(items, role=role, batch_size=batch_size, show_progress=show_progress, **kwargs)
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        mine = self._batches(items, batch_size, role)[rank::world]
        rows = [(idx, self.encoder.encode([items[i] for i in idx], role=role, batch_size=len(idx),
                                          show_progress=False, **kwargs).cpu()) for idx in mine]
        # Objects rather than tensors: ranks hold different numbers of rows (or none), and gloo and NCCL groups
        # both take objects. The embeddings of an evaluation set are small.
        parts: list[list] = [[] for _ in range(world)]
        dist.all_gather_object(parts, rows, group=self.group)
        first = next(emb for part in parts for _, emb in part)
        out = torch.empty(len(items), first.shape[1], dtype=first.dtype)
        for part in parts:
            for idx, emb in part:
                out[torch.tensor(idx, dtype=torch.long)] = emb
        return out


def init_rank(rank: int, world: int, init_file: str, device: str | None) -> str:
    """Join a ``world``-process group as ``rank`` (NCCL on CUDA, gloo on CPU); returns this rank's device.

    CPU ranks split the machine's threads unless ``OMP_NUM_THREADS`` is set (then every rank keeps it), so N
    processes do not each start a thread per core.
    """
    import os

    cuda = device != "cpu" and torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if cuda:
        if torch.cuda.device_count() < world:
            raise RuntimeError(f"--devices {world} but torch sees {torch.cuda.device_count()} CUDA device(s); "
                               f"use --devices {torch.cuda.device_count()} or --device cpu")
        torch.cuda.set_device(rank)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, torch.get_num_threads() // world))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    return f"cuda:{rank}" if cuda else "cpu"
