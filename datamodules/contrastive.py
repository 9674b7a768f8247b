"""Stages 2-3 data: streamed (query, positive, hard negatives) shards in per-dataset homogeneous batches.

Every batch holds samples of ONE dataset, so its in-batch negatives come from the same task and candidate
distribution (an image-to-text query is not "beaten" by a document page). Datasets are mixed across batches by the
mixture weights. See :class:`ContrastiveDataModule` for the batch layout and the DDP rules.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import lightning as L
import webdataset as wds
from mmembed.datamodules.common import (
    EpochClock,
    RankLoader,
    SeededShuffle,
    ShardSource,
    SharedEpoch,
    add_counts,
    check_shard_count,
    peek_dataset,
    resolve_world,
    split_by_rank,
    worker_info,
)
from webdataset.utils import PipelineStage

from mmembed.backbone.inputs import InputBuilder
from mmembed.data.decode import DecodedSample, decode_and_skip
from mmembed.data.inspection import count_shards
from mmembed.data.reading import expand_urls, read_shard_samples
from mmembed.data.skips import SkipCounter

log = logging.getLogger(__name__)


class GroupByDataset(PipelineStage):
    """Pipeline stage: decoded samples -> lists of ``batch_size`` samples of one dataset, mixed by weights.

    Why not ``wds.batched``: it cuts the stream into consecutive runs whatever their dataset, so a batch would mix
    datasets (and its collate cannot hold samples back for a later batch). Here each dataset has its own buffer;
    once two datasets have a full batch ready, or one buffer holds two batches, the dataset of the next batch is
    drawn by weighted sampling among those with a full batch ready.

    Why the weights also thin the stream: choosing among ready buffers only reorders batches. Every sample that
    enters a buffer eventually leaves it in a batch, so without dropping anything each dataset's share of batches
    is its share of the stream, whatever the weights. To reach weight ``w_d``, each arriving sample of dataset ``d``
    is kept with probability ``a_d = (w_d / n_d) / max_e (w_e / n_e)``, where ``n_d`` counts the samples of ``d``
    this worker has seen (plus an optional prior, so the first shards do not swing the estimate). Kept samples then
    occur in proportion to ``w_d``; the most under-represented dataset keeps all its samples, the others are
    downsampled (counted per dataset in ``dropped``); nothing is upsampled. Only datasets seen by this worker
    take part, so a worker whose shards lack a dataset is not starved waiting for it. ``weights=None`` keeps
    every sample (shares follow the data: proportional to sample counts).

    Emitted items are dicts ``{"dataset", "samples": [DecodedSample], "skipped", "dropped"}``: ``skipped`` holds
    the skips counted by this worker since its previous batch (from the samples' own ``skipped`` plus whatever the
    counter recorded after the last decoded sample, e.g. a truncated shard tail) and ``dropped`` the samples
    discarded by the mixture since then; both ride to the main process inside the batch.

    Args:
        batch_size: Samples per batch.
        clock: Seeds the draw per (epoch, pass).
        weights: Dataset -> weight; datasets missing or with weight 0 are never emitted. ``None``: keep everything.
        prior: Dataset -> prior sample count for the keep-probability estimate.
        seed: Base seed.
        rank: This rank (part of the seed).
        counter: The worker's skip counter (to collect counts made after the last decoded sample).
        flush_partial: At the end of a pass also emit the incomplete batches (validation); otherwise they are
            dropped like ``drop_last``.
    """

    def __init__(self, batch_size: int, clock: EpochClock, weights: Mapping[str, float] | None = None,
                 prior: Mapping[str, float] | None = None, seed: int = 0, rank: int = 0,
                 counter: SkipCounter | None = None, flush_partial: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.clock = clock
        self.weights = dict(weights) if weights is not None else None
        self.prior = dict(prior or {})
        self.seed = seed
        self.rank = rank
        self.counter = counter
        self.flush_partial = flush_partial
        self._seen: Counter[str] = Counter()
        self._skipped: dict[str, int] = {}
        self._dropped: dict[str, int] = {}

    def weight(self, dataset: str) -> float:
        if self.weights is None:
            return 1.0
        return float(self.weights.get(dataset, 0.0))

    def keep_probability(self, dataset: str) -> float:
        """Probability of keeping the next sample of ``dataset`` (see the class docstring)."""
        if self.weights is None:
            return 1.0
        ratio = {d: self.weight(d) / (n + self.prior.get(d, 0.0)) for d, n in self._seen.items() if self.weight(d) > 0}
        if dataset not in ratio:
            return 0.0
        return min(1.0, ratio[dataset] / max(ratio.values()))

    def run(self, src: Iterable[DecodedSample]) -> Iterator[dict[str, Any]]:
        epoch, pas = self.clock.current
        worker, _ = worker_info()
        rng = random.Random(f"group/{self.seed}/{epoch}/{pas}/{self.rank}/{worker}")
        return self._group(src, rng)

    def _pick(self, ready: list[str], rng: random.Random) -> str:
        if len(ready) == 1:
            return ready[0]
        # Natural mode: weight the choice by how much of each dataset arrived (its share of the stream).
        weights = [self.weight(d) if self.weights is not None else float(self._seen[d]) for d in ready]
        return rng.choices(ready, weights=weights)[0]

    def _emit(self, dataset: str, samples: list[DecodedSample]) -> dict[str, Any]:
        if self.counter is not None:
            add_counts(self._skipped, self.counter.take_new())
        out = {"dataset": dataset, "samples": samples, "skipped": self._skipped, "dropped": self._dropped}
        self._skipped, self._dropped = {}, {}
        return out

    def _group(self, src: Iterable[DecodedSample], rng: random.Random) -> Iterator[dict[str, Any]]:
        b = self.batch_size
        buffers: dict[str, list[DecodedSample]] = {}
        for dec in src:
            add_counts(self._skipped, dec.skipped)
            name = dec.sample.dataset
            if self.weight(name) <= 0:
                self._dropped[name] = self._dropped.get(name, 0) + 1
                continue
            self._seen[name] += 1
            if self.weights is not None and rng.random() >= self.keep_probability(name):
                self._dropped[name] = self._dropped.get(name, 0) + 1
                continue
            buffers.setdefault(name, []).append(dec)
            while True:
                ready = [d for d, buf in buffers.items() if len(buf) >= b]
                if not (len(ready) >= 2 or any(len(buffers[d]) >= 2 * b for d in ready)):
                    break
                d = self._pick(ready, rng)
                yield self._emit(d, buffers[d][:b])
                del buffers[d][:b]
        # End of this pass over the worker's shards: what is full goes out (weighted order), the rest is dropped
        # unless flushing. Skip counts still pending travel with the next pass's first batch.
        while ready := [d for d, buf in buffers.items() if len(buf) >= b]:
            d = self._pick(ready, rng)
            yield self._emit(d, buffers[d][:b])
            del buffers[d][:b]
        if self.flush_partial:
            for d, buf in buffers.items():
                if buf:
                    yield self._emit(d, buf)


class ContrastiveCollate:
    """Turns a :class:`GroupByDataset` group into the model batch (runs in the DataLoader workers).

    Args:
        input_builder: Templates + chat template + tiling + padding.
        num_hard_negatives: At most this many negatives per query; a batch uses ``min(N, fewest in the batch)``.
    """

    def __init__(self, input_builder: InputBuilder, num_hard_negatives: int = 0) -> None:
        if num_hard_negatives < 0:
            raise ValueError(f"num_hard_negatives must be >= 0, got {num_hard_negatives}")
        self.input_builder = input_builder
        self.num_hard_negatives = num_hard_negatives

    def __call__(self, group: Mapping[str, Any]) -> dict[str, Any]:
        samples: list[DecodedSample] = group["samples"]
        n = 0
        if self.num_hard_negatives:
            # Rectangular shapes: every query of the batch gets the same number of negatives.
            n = min(self.num_hard_negatives, min(len(s.sample.negatives) for s in samples))
        queries, positives, negatives = [], [], []
        pos_ids, neg_ids, ids = [], [], []
        for dec in samples:
            s = dec.sample
            q, p, negs = dec.items()
            queries.append(q)
            positives.append(p)
            negatives.extend(negs[:n])
            ids.append(s.id)
            pos_ids.append(s.positive.id or f"{s.id}#pos")
            neg_ids.extend(neg.id or f"{s.id}#neg{i}" for i, neg in enumerate(s.negatives[:n]))
        return {
            "query": self.input_builder(queries, "query"),
            "candidate": self.input_builder(positives + negatives, "candidate"),
            "num_negatives": n,
            "dataset": group["dataset"],
            "ids": ids,
            "pos_ids": pos_ids,
            "neg_ids": neg_ids,
            "skipped": dict(group["skipped"]),
            "dropped": dict(group["dropped"]),
        }


class ContrastiveDataModule(L.LightningDataModule):
    """WebDataset shards -> per-dataset homogeneous (query, positive, hard negatives) batches, DDP-safe.

    Use with ``Trainer(use_distributed_sampler=False)``: the data is split across ranks and workers here, by
    shards (``split_by_rank`` then ``wds.split_by_worker``), and Lightning must not wrap the iterable loader.

    Pipeline per rank and worker: shards permuted by ``(seed, epoch, pass)`` identically on every rank -> this
    rank's and worker's shards -> samples (bad ones skipped and counted) -> shuffle buffer -> per-dataset grouping
    with mixture weights (:class:`GroupByDataset`) -> collate (:class:`ContrastiveCollate`). The stream repeats its
    shards pass after pass and the per-rank loader stops after ``samples_per_epoch // (world_size * batch_size)``
    batches (``.with_epoch``), so every rank runs the same number of steps. As with webdataset's
    ``empty_check=False``, a worker left without shards yields nothing instead of raising; :meth:`setup` rejects
    that configuration up front. Memory per worker: up to ``shuffle_buffer`` decoded samples plus about
    ``2 * batch_size`` per dataset in the grouping buffers.

    Batch layout (a dict; the default Lightning ``transfer_batch_to_device`` moves the ``BatchFeature`` s)::

        query        BatchFeature(input_ids, attention_mask, num_tiles[, pixel_values])  B rows
        candidate    BatchFeature(...)  B*(1+n) rows: rows 0..B-1 the positives, then the negatives query-major:
                     row B + i*n + j is negative j of query i
        num_negatives  n = min(num_hard_negatives, fewest negatives of a sample in the batch) (0: in-batch only)
        dataset      the one dataset of the batch
        ids          sample ids (B)
        pos_ids      positive ids (B; ``Side.id`` or ``"<sample id>#pos"``) for duplicate masking
        neg_ids      negative ids (B*n, query-major; ``Side.id`` or ``"<sample id>#neg<j>"``)
        skipped      {reason: count} skipped in that worker since its previous batch
        dropped      {dataset: count} samples the mixture discarded in that worker since its previous batch

    Skip counts are made in the worker processes and travel inside batches; :meth:`on_before_batch_transfer`
    (called by Lightning in the main process for every batch) adds them into :attr:`skip_counts` (training) or
    :attr:`val_skip_counts` and the mixture's discards into :attr:`dropped_counts`. Outside Lightning call
    :meth:`record_skips` on each batch.

    Args:
        train_shards: Shard spec(s): brace patterns, globs, directories or lists (``expand_urls``).
        batch_size: Queries per batch (per rank).
        num_hard_negatives: Hard negatives per query N (paper Table 8; 0 = in-batch negatives only).
        mixture: Dataset -> weight (share of batches). Names must occur in the shards; datasets not named get weight
            0. ``None`` (default) keeps every sample, so datasets are mixed in proportion to their sample counts.
            Weights are reached by downsampling the over-represented datasets; see :class:`GroupByDataset`.
        shuffle_buffer: Samples in each worker's shuffle buffer (0 or 1: no sample shuffling).
        num_workers: DataLoader workers per rank; needs ``len(shards) >= world_size * max(1, num_workers)``.
        samples_per_epoch: Queries per epoch over all ranks; ``None`` counts the samples once at setup (reads every
            shard; set it for large corpora).
        seed: Base seed of the shard permutation, shuffle buffers and mixture draws.
        val_shards: Optional validation shards (no shuffling, no mixture, incomplete batches kept).
        val_samples_per_epoch: Validation queries per epoch over all ranks; required under DDP with ``val_shards``
            (equal batch counts); ``None`` on one process = one pass.
        input_builder: The backbone's ``InputBuilder`` (``backbone.input_builder``: processor, templates and tile
            policy that match its compression); the launcher passes it in. Required by :meth:`setup`.
        rank: Override the rank (tests, custom launchers); default from the Trainer / torch.distributed / env.
        world_size: Override the world size (with ``rank``).
        pin_memory: Passed to the DataLoader.

    Raises:
        FileNotFoundError: (at setup) no shard matches a spec.
        ValueError: (at setup) too few shards for ranks x workers, unknown dataset names or bad weights in
            ``mixture``, or an epoch shorter than one batch per rank.
    """

    def __init__(
        self,
        train_shards: str | list[str],
        batch_size: int = 8,
        num_hard_negatives: int = 0,
        mixture: dict[str, float] | None = None,
        shuffle_buffer: int = 1000,
        num_workers: int = 2,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        val_shards: str | list[str] | None = None,
        val_samples_per_epoch: int | None = None,
        input_builder: InputBuilder | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["input_builder"])
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_hard_negatives < 0:
            raise ValueError(f"num_hard_negatives must be >= 0, got {num_hard_negatives}")
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.batch_size = batch_size
        self.num_hard_negatives = num_hard_negatives
        self.mixture = dict(mixture) if mixture is not None else None
        self.shuffle_buffer = shuffle_buffer
        self.num_workers = num_workers
        self.samples_per_epoch = samples_per_epoch
        self.val_samples_per_epoch = val_samples_per_epoch
        self.seed = seed
        self.input_builder = input_builder
        self.pin_memory = pin_memory
        self._rank_override = (rank, world_size)
        self.rank, self.world_size = 0, 1
        self.skip_counts = SkipCounter("train")
        self.val_skip_counts = SkipCounter("val")
        self.dropped_counts: Counter[str] = Counter()
        self.train_urls: list[str] = []
        self.val_urls: list[str] = []
        self.shard_datasets: dict[str, str | None] = {}
        self.weights: dict[str, float] | None = None
        self.num_train_batches = 0
        self.num_val_batches: int | None = None
        self._train_epoch = SharedEpoch()
        self._train_loader: RankLoader | None = None
        self._train_position: dict[str, int] | None = None  # from a checkpoint, for the next train loader
        self._val_epoch = SharedEpoch()
        self._configured = False

    # ----------------------------------------------------------------------------------------------- setup
    def setup(self, stage: str | None = None) -> None:
        """Resolve rank/world size, expand and check the shards, validate the mixture, size the epoch."""
        # Re-resolved on every call: a setup() made by hand before Trainer.fit must not freeze rank 0 of 1.
        rank, world_size = resolve_world(self.trainer, *self._rank_override)
        if self._configured and (rank, world_size) == (self.rank, self.world_size):
            return
        self.rank, self.world_size = rank, world_size
        self.train_urls = expand_urls(self.train_shards)
        check_shard_count(len(self.train_urls), self.world_size, self.num_workers, "train_shards")
        self.shard_datasets = {u: peek_dataset(u) for u in self.train_urls}
        self.weights = self._resolve_mixture()
        total = self.samples_per_epoch
        if total is None:
            total = count_shards(self.train_urls)["samples"]
            log.info("train_shards hold %d samples; set samples_per_epoch to skip this count", total)
        self.num_train_batches = total // (self.world_size * self.batch_size)
        if self.num_train_batches < 1:
            raise ValueError(
                f"samples_per_epoch={total} gives no batch per rank (world_size={self.world_size}, batch_size="
                f"{self.batch_size}); raise it to at least {self.world_size * self.batch_size}"
            )
        if self.val_shards is not None:
            self.val_urls = expand_urls(self.val_shards)
            check_shard_count(len(self.val_urls), self.world_size, 0, "val_shards")
            if self.val_samples_per_epoch is None and self.world_size > 1:
                raise ValueError(
                    f"val_shards under {self.world_size} ranks need val_samples_per_epoch, so that every rank runs "
                    "the same number of validation batches"
                )
            if self.val_samples_per_epoch is not None:
                self.num_val_batches = max(1, self.val_samples_per_epoch // (self.world_size * self.batch_size))
        if self.input_builder is None:
            raise ValueError("ContrastiveDataModule needs input_builder=backbone.input_builder (the processor and "
                             "tiling that match the backbone); the launcher (mmembed.launch.tasks.fit) passes it")
        self._configured = True

    def _resolve_mixture(self) -> dict[str, float] | None:
        if self.mixture is None:
            return None
        found = sorted({d for d in self.shard_datasets.values() if d is not None})
        unknown = sorted(set(self.mixture) - set(found))
        if unknown:
            raise ValueError(
                f"mixture names unknown dataset(s) {unknown}; the shards hold {found} (names are read from the first "
                "sample of each shard)"
            )
        bad = {d: w for d, w in self.mixture.items() if not w >= 0}
        if bad or not any(w > 0 for w in self.mixture.values()):
            raise ValueError(f"mixture weights must be >= 0 with at least one > 0, got {self.mixture}")
        left_out = sorted(set(found) - set(self.mixture))
        if left_out:
            log.warning("datasets %s are not in the mixture: weight 0, their samples are skipped", left_out)
        return {d: float(w) for d, w in self.mixture.items()}

    def _prior(self) -> dict[str, float]:
        # Shards per dataset x batch_size pseudo-samples: a rough prior on each dataset's share of the stream.
        shards = Counter(d for d in self.shard_datasets.values() if d is not None)
        return {d: float(n * self.batch_size) for d, n in shards.items()}

    # --------------------------------------------------------------------------------------------- loaders
    def _current_epoch(self) -> int | None:
        trainer = self.trainer
        return None if trainer is None else int(trainer.current_epoch)

    def _trained_batches(self) -> int | None:
        # Batches of the current epoch the Trainer has trained on (a checkpoint saved in on_train_batch_end of batch
        # k counts k); None outside a Trainer. The loader itself has already prefetched further ahead.
        trainer = self.trainer
        if trainer is None:
            return None
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def _pipeline(self, urls: list[str], *, train: bool, counter: SkipCounter, shared: SharedEpoch,
                  repeat: bool) -> wds.DataPipeline:
        assert self.input_builder is not None, "call setup() first"
        clock = EpochClock(shared)
        stages: list[Any] = [
            ShardSource(urls, clock, seed=self.seed, shuffle=train),
            split_by_rank(self.rank, self.world_size),
            wds.split_by_worker,
            read_shard_samples(counter=counter),
            decode_and_skip(counter=counter),
        ]
        if train and self.shuffle_buffer > 1:
            stages.append(SeededShuffle(self.shuffle_buffer, clock, seed=self.seed, rank=self.rank))
        stages.append(GroupByDataset(
            self.batch_size, clock, weights=self.weights if train else None, prior=self._prior() if train else None,
            seed=self.seed, rank=self.rank, counter=counter, flush_partial=not train))
        stages.append(wds.map(self.make_collate()))
        pipeline = wds.DataPipeline(*stages)
        return pipeline.repeat() if repeat else pipeline

    def make_collate(self):
        """The batch builder run in the loader workers (subclasses build other batches from the same stream)."""
        return ContrastiveCollate(self.input_builder, self.num_hard_negatives)

    def train_dataloader(self) -> RankLoader:
        self.setup("fit")
        dataset = self._pipeline(self.train_urls, train=True, counter=SkipCounter("train"),
                                 shared=self._train_epoch, repeat=True)
        loader = RankLoader(dataset, num_batches=self.num_train_batches, shared_epoch=self._train_epoch,
                            epoch_fn=self._current_epoch, num_workers=self.num_workers, name="train",
                            pin_memory=self.pin_memory, seed=self.seed, rank=self.rank,
                            position_fn=self._trained_batches)
        if self._train_position is not None:  # resuming: continue the epoch where the checkpoint stood
            loader.load_state_dict(self._train_position)
            self._train_position = None
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> RankLoader | list:
        self.setup("validate")
        if not self.val_urls:
            return []
        repeat = self.num_val_batches is not None
        dataset = self._pipeline(self.val_urls, train=False, counter=SkipCounter("val"), shared=self._val_epoch,
                                 repeat=repeat)
        # Validation reads as many workers as it has shards for (it has no ranks x workers requirement).
        workers = min(self.num_workers, len(self.val_urls) // self.world_size)
        return RankLoader(dataset, num_batches=self.num_val_batches, shared_epoch=self._val_epoch,
                          epoch_fn=self._current_epoch, num_workers=workers, name="val", pin_memory=self.pin_memory,
                          seed=self.seed, rank=self.rank)

    # ------------------------------------------------------------------------------------------ skip counts
    def record_skips(self, batch: Mapping[str, Any], split: str = "train") -> None:
        """Add a batch's ``skipped`` counts (and the mixture's ``dropped`` ones) to this DataModule's totals."""
        (self.val_skip_counts if split == "val" else self.skip_counts).merge(batch.get("skipped") or {})
        if split != "val":
            self.dropped_counts.update({k: int(v) for k, v in (batch.get("dropped") or {}).items()})

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning hook (main process, every batch): record the counts that travelled in the batch."""
        if isinstance(batch, Mapping) and "skipped" in batch:
            trainer = self.trainer
            training = trainer is None or bool(trainer.training)
            self.record_skips(batch, "train" if training else "val")
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Skip and drop totals and the training stream's position survive a checkpoint/resume.

        The position is also what Lightning saves of the loader itself (``RankLoader.state_dict``), but Lightning
        hands that back only if it builds the train loader after restoring its loops; a module whose
        ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (e.g. a warm-up schedule) makes it
        build the loader earlier, and the loader state is then silently dropped. The DataModule's own state is
        restored before anything builds a loader, so the position travels here.
        """
        state: dict[str, Any] = {"skip_counts": self.skip_counts.as_dict(),
                                 "val_skip_counts": self.val_skip_counts.as_dict(),
                                 "dropped_counts": dict(self.dropped_counts)}
        if self._train_loader is not None:
            state["train_position"] = self._train_loader.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train_position = state_dict.get("train_position")
        self.skip_counts = SkipCounter("train").merge(state_dict.get("skip_counts", {}))
        self.val_skip_counts = SkipCounter("val").merge(state_dict.get("val_skip_counts", {}))
        self.dropped_counts = Counter(state_dict.get("dropped_counts", {}))
