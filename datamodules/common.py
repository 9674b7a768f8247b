"""Pieces the DataModules share: rank resolution, a shared epoch, seeded WebDataset stages, the per-rank loader.

The streaming pipeline every shard-based DataModule builds per rank (open_clip's order)::

    ShardSource (same seeded permutation on every rank, new one per epoch and per pass)
      -> split_by_rank (this rank's shards) -> wds.split_by_worker (this worker's shards)
      -> read_shard_samples -> decode_and_skip (skips counted, see mmembed.data.decode)
      -> SeededShuffle (buffer) -> ... DataModule-specific grouping and collate ...

wrapped in a :class:`RankLoader` (a ``wds.WebLoader``) that yields a fixed number of batches per epoch, so every
rank runs the same number of steps (unequal counts hang DDP).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from typing import Any

import torch
import webdataset as wds
from webdataset.utils import PipelineStage

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- ranks and workers
def resolve_world(trainer: Any = None, rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` for splitting data: explicit values, else the Trainer's, else torch.distributed, else env.

    Resolved once in the main process: DataLoader workers started with ``spawn`` do not inherit the process group,
    so ``wds.split_by_node`` (which asks torch.distributed or ``RANK``/``WORLD_SIZE`` inside the worker) could see
    rank 0 everywhere; fixing the values here makes the split the same under fork and spawn.
    """
    if (rank is None) != (world_size is None):
        raise ValueError(f"give both rank and world_size or neither (got rank={rank}, world_size={world_size})")
    if rank is None:
        if trainer is not None:
            rank, world_size = int(trainer.global_rank), int(trainer.world_size)
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        else:
            rank, world_size = 0, 1
    assert world_size is not None
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return rank, world_size


def worker_info() -> tuple[int, int]:
    """``(worker id, number of workers)`` of the current DataLoader worker; ``(0, 1)`` in the main process."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def check_shard_count(n_shards: int, world_size: int, num_workers: int, what: str = "train") -> None:
    """Fail with the fix when some worker of some rank would get no shard.

    Raises:
        ValueError: ``n_shards < world_size * max(1, num_workers)``.
    """
    workers = max(1, num_workers)
    need = world_size * workers
    if n_shards < need:
        raise ValueError(
            f"{what}: {n_shards} shard(s) for {world_size} rank(s) x {workers} DataLoader worker(s); need at least "
            f"{need} shards so that every worker of every rank reads one. Re-write the shards smaller "
            f"(write_shards(maxcount=...)) or lower num_workers."
        )


# ------------------------------------------------------------------------------------------------------ epoch clock
class SharedEpoch:
    """An epoch number shared between the main process and DataLoader workers (fork or spawn, persistent or not).

    The main process sets it before each epoch's iteration starts; the pipeline stages read it when a pass begins.
    A plain attribute would be frozen into persistent workers at their start; a ``multiprocessing.Value`` is not.
    """

    def __init__(self, epoch: int = 0) -> None:
        self._value = mp.Value("i", epoch)

    def set(self, epoch: int) -> None:
        self._value.value = int(epoch)

    def get(self) -> int:
        return int(self._value.value)


class EpochClock:
    """``(epoch, pass)`` of the pipeline running in this process (each worker holds its own copy).

    A worker's stream repeats its shards pass after pass; :class:`ShardSource` ticks the clock at the start of
    each pass and the later stages read ``current`` to seed themselves, so every (epoch, pass) has its own
    permutation and shuffle order while staying reproducible.
    """

    def __init__(self, shared: SharedEpoch) -> None:
        self.shared = shared
        self._epoch = -1
        self._pass = -1

    def tick(self) -> tuple[int, int]:
        epoch = self.shared.get()
        if epoch != self._epoch:
            self._epoch, self._pass = epoch, -1
        self._pass += 1
        return self.current

    @property
    def current(self) -> tuple[int, int]:
        return self._epoch, self._pass


# ---------------------------------------------------------------------------------------------- pipeline stages
class ShardSource(PipelineStage):
    """Pipeline source: the shard URLs as ``{"url": ...}`` dicts, permuted by ``(seed, epoch, pass)`` when shuffling.

    The permutation depends on nothing rank- or worker-specific, so every rank computes the same one and the
    node/worker splitters that follow hand out disjoint shards (webdataset's explicit ``shardshuffle`` with a
    seed, plus the epoch).
    """

    def __init__(self, urls: list[str], clock: EpochClock, seed: int = 0, shuffle: bool = True) -> None:
        self.urls = list(urls)
        self.clock = clock
        self.seed = seed
        self.shuffle = shuffle

    def run(self) -> Iterator[dict[str, str]]:
        epoch, pas = self.clock.tick()
        urls = list(self.urls)
        if self.shuffle:
            random.Random(f"shards/{self.seed}/{epoch}/{pas}").shuffle(urls)
        return iter([{"url": u} for u in urls])


def _split_by_rank(src: Iterable[Any], rank: int, world_size: int) -> Iterator[Any]:
    # wds.split_by_node with the rank fixed in the main process (see resolve_world for why).
    for i, item in enumerate(src):
        if i % world_size == rank:
            yield item


#: Pipeline stage: ``split_by_rank(rank, world_size)``; the node splitter of these pipelines.
split_by_rank = wds.pipelinefilter(_split_by_rank)


class SeededShuffle(PipelineStage):
    """A shuffle buffer seeded by ``(seed, epoch, pass, rank, worker)``.

    ``wds.detshuffle`` seeds every worker of every rank identically and keeps its own epoch counter, which restarts
    with non-persistent workers; this one takes the epoch from the shared :class:`EpochClock`.
    """

    def __init__(self, bufsize: int, clock: EpochClock, seed: int = 0, rank: int = 0, initial: int | None = None):
        self.bufsize = bufsize
        self.initial = bufsize // 2 if initial is None else initial
        self.clock = clock
        self.seed = seed
        self.rank = rank

    def run(self, src: Iterable[Any]) -> Iterator[Any]:
        epoch, pas = self.clock.current
        worker, _ = worker_info()
        rng = random.Random(f"samples/{self.seed}/{epoch}/{pas}/{self.rank}/{worker}")
        return wds.shuffle(self.bufsize, self.initial, rng=rng)(src)


# -------------------------------------------------------------------------------------------------------- loader
def worker_base_seed(seed: int, rank: int, epoch: int) -> int:
    """The DataLoader worker base seed of one epoch: a function of ``(seed, rank, epoch)`` alone.

    Given to a DataLoader through its ``generator``, so that starting an epoch does not draw from the global torch
    RNG (a resumed run restores that RNG to the checkpoint's state; the draw would make the two runs' dropout
    streams differ) and a resumed run's workers get the seeds the uninterrupted run's had.
    """
    return random.Random(f"loader/{seed}/{rank}/{epoch}").getrandbits(63)


class EpochSeededLoader(torch.utils.data.DataLoader):
    """A map-style ``DataLoader`` over a ``DistributedSampler`` with worker seeds from ``(seed, rank, epoch)``.

    The epoch is the sampler's (Lightning calls ``sampler.set_epoch`` before each epoch). See
    :func:`worker_base_seed` for why. Mid-epoch positions are not saved (Lightning warns that it is not resumable);
    checkpoints at epoch ends resume exactly.
    """

    def __init__(self, dataset: Any, *, sampler: torch.utils.data.DistributedSampler, seed: int = 0, rank: int = 0,
                 **loader_kwargs: Any) -> None:
        if "generator" in loader_kwargs:
            raise ValueError("EpochSeededLoader seeds its workers from (seed, rank, epoch); pass seed=, not generator=")
        self._worker_seeds = torch.Generator()
        super().__init__(dataset, sampler=sampler, generator=self._worker_seeds, **loader_kwargs)
        self.seed, self.rank = seed, rank

    def __iter__(self) -> Iterator[Any]:
        self._worker_seeds.manual_seed(worker_base_seed(self.seed, self.rank, int(getattr(self.sampler, "epoch", 0))))
        return super().__iter__()


class RankLoader(wds.WebLoader):
    """The per-rank loader: a ``wds.WebLoader`` (DataLoader with ``batch_size=None``: batches are made in the
    pipeline) that yields exactly ``num_batches`` batches per epoch via ``.with_epoch``.

    Before each epoch's iteration it writes the epoch (``epoch_fn()``, e.g. the Trainer's ``current_epoch``, else
    the number of earlier iterations) into the :class:`SharedEpoch` the workers' stages read. If the stream ends
    early (every worker ran dry) it raises instead of returning fewer batches, which under DDP would hang the
    other ranks.

    Exact resume (Lightning calls :meth:`state_dict` / :meth:`load_state_dict` of a loader that has them and saves
    the state in the checkpoint's loop state): the state is the epoch and the number of batches of it already
    trained on (``position_fn``, e.g. the Trainer's batch progress; else the batches yielded so far). After a load,
    the next iteration of that same epoch regenerates and discards that many batches, so training continues on
    batch ``k + 1`` of the very stream the interrupted run saw. The stream is a pure function of the seed, the
    epoch and the rank, so replaying it is exact; it costs the decoding of the skipped batches once.

    Each epoch's DataLoader iterator takes its worker base seed from a generator seeded by ``(seed, rank, epoch)``
    instead of drawing it from the global torch RNG: worker seeds are then reproducible on resume, and creating the
    iterator does not shift the model's RNG stream (dropout) depending on when the loader was (re)started.

    Why a hand-made position rather than torchdata's ``StatefulDataLoader`` (tried, torchdata 0.11.0): (1) for an
    ``IterableDataset`` without a state of its own, such as this WebDataset pipeline, it also fast-forwards by
    regenerating the skipped items (it says "naively fast-forwarding"), so the replay costs the same; (2) its saved
    position is that of the iterator, resumed by whichever ``iter()`` comes next, while this stream restarts every
    epoch as a function of ``(seed, epoch)``: a position saved at the end of an epoch must not skip batches of the
    next one; (3) Lightning drops a loader's own state when ``configure_optimizers`` reads
    ``trainer.estimated_stepping_batches`` (the loader is built before the loops are restored), so the position has
    to travel in the DataModule's state whichever loader holds it. Lightning counts any loader with
    ``state_dict`` / ``load_state_dict`` as resumable, so it does not warn for this one.

    Args:
        dataset: The per-worker pipeline (infinite when ``num_batches`` is set).
        num_batches: Batches per epoch on this rank; ``None`` = one natural pass (no ``len``).
        shared_epoch: Written at the start of each epoch.
        epoch_fn: Returns the current epoch or ``None``.
        num_workers: DataLoader worker processes.
        name: Used in error messages.
        seed: Base seed of the per-epoch worker seeds.
        rank: This rank (part of the worker seeds).
        position_fn: Returns the number of batches of the current epoch already trained on (for :meth:`state_dict`);
            ``None`` counts the batches this loader yielded.
        **loader_kwargs: Other ``torch.utils.data.DataLoader`` arguments.
    """

    def __init__(self, dataset: Any, *, num_batches: int | None, shared_epoch: SharedEpoch,
                 epoch_fn: Callable[[], int | None] | None = None, num_workers: int = 0, name: str = "train",
                 seed: int = 0, rank: int = 0, position_fn: Callable[[], int | None] | None = None,
                 **loader_kwargs: Any) -> None:
        loader_kwargs.setdefault("persistent_workers", False)
        if num_workers > 0:
            loader_kwargs.setdefault("prefetch_factor", 2)
        if "generator" in loader_kwargs:
            raise ValueError("RankLoader seeds its workers from (seed, rank, epoch); pass seed=, not generator=")
        # wds.WebLoader wraps a DataLoader (it is not one): the generator must be handed to that inner DataLoader,
        # since an attribute set on the wrapper is never read and the DataLoader then draws its worker base seed
        # from the global torch RNG at every iter(), shifting the model's dropout stream between the checkpoint
        # and the next step (a resumed run restores the RNG after that draw and trains with other masks).
        self._worker_seeds = torch.Generator()
        super().__init__(dataset, batch_size=None, shuffle=False, num_workers=num_workers,
                         generator=self._worker_seeds, **loader_kwargs)
        self.num_batches = num_batches
        self.shared_epoch = shared_epoch
        self.epoch_fn = epoch_fn
        self.name = name
        self.seed = seed
        self.rank = rank
        self.position_fn = position_fn
        self._iterations = 0
        self._yielded = 0  # batches yielded in the current iteration
        self._resume: tuple[int, int] | None = None  # (epoch, batches to skip) after load_state_dict
        if num_batches is not None:
            self.with_epoch(nbatches=num_batches)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches"}``: where in the stream training stands (Lightning saves it in checkpoints)."""
        position = self.position_fn() if self.position_fn is not None else None
        return {"epoch": self.shared_epoch.get(), "batches": int(self._yielded if position is None else position)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Make the next iteration of ``state["epoch"]`` skip the ``state["batches"]`` already trained on."""
        batches = int(state.get("batches", 0))
        full = self.num_batches is not None and batches >= self.num_batches  # saved at the epoch's end: nothing
        self._resume = None if full or batches <= 0 else (int(state.get("epoch", 0)), batches)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError(f"{self.name} loader makes one natural pass and has no length")
        return self.num_batches

    def __iter__(self) -> Iterator[Any]:
        epoch = self.epoch_fn() if self.epoch_fn is not None else None
        epoch = self._iterations if epoch is None else epoch
        self.shared_epoch.set(epoch)
        self._iterations += 1
        skip = 0
        if self._resume is not None:
            if self._resume[0] == epoch:
                skip = self._resume[1]
            self._resume = None
        self._worker_seeds.manual_seed(worker_base_seed(self.seed, self.rank, epoch))
        n = 0
        self._yielded = 0
        for batch in super().__iter__():
            n += 1
            if n <= skip:  # replaying the part of the epoch an interrupted run already trained on
                continue
            self._yielded = n
            yield batch
        if self.num_batches is not None and n < self.num_batches:
            raise RuntimeError(
                f"{self.name}: the data stream of this rank ended after {n} of {self.num_batches} batches; every "
                f"worker ran out of full batches (each needs at least batch_size samples of one dataset per pass "
                f"over its shards). Use more or larger shards, fewer workers or a smaller batch_size."
            )


# ---------------------------------------------------------------------------------------------------- bookkeeping
def add_counts(into: MutableMapping[str, int], new: Mapping[str, int] | None) -> MutableMapping[str, int]:
    """Add ``new``'s counts into ``into`` (in place) and return it."""
    for key, n in (new or {}).items():
        if n:
            into[key] = into.get(key, 0) + int(n)
    return into


def peek_dataset(url: str, max_members: int = 64) -> str | None:
    """The ``dataset`` field of the first readable sample JSON in a shard (reads only the shard's head).

    Returns ``None`` for a shard that cannot be opened or holds no readable JSON near its start; the training
    pipeline will count such shards as skips.
    """
    try:
        stream = wds.gopen(url)
    except Exception:  # noqa: BLE001 -- unreadable shards are the reading pipeline's to count, not setup's
        return None
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for i, member in enumerate(tar):
                if i >= max_members:
                    break
                if member.isfile() and member.name.endswith(".json"):
                    f = tar.extractfile(member)
                    try:
                        return str(json.loads(f.read())["dataset"]) if f is not None else None
                    except (ValueError, KeyError, TypeError):
                        continue
    except (tarfile.TarError, OSError, EOFError):
        return None
    finally:
        stream.close()
    return None
