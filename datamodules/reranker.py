"""Reranker data (paper §3.4): pointwise pairs and listwise lists built from curated (or mined) shards.

The stream is the contrastive one (shards -> rank/worker split -> decode, skips counted -> shuffle -> per-dataset
batches with mixture weights, see :class:`datamodules.contrastive.ContrastiveDataModule`); only the collate differs.
For each sample of a batch:

* augmented positives ``C_aug+ = {positive} + extra_positives`` (the judge's 'yes' candidates of stage-3 curated
  shards, :class:`mmembed.data.schema.Sample`);
* negatives ``C-`` = the sample's ``negatives`` (the judge-verified hard negatives of curated shards);
* pointwise (eq. 5): one ``(q, c+)`` pair labelled Yes and one ``(q, c-)`` pair labelled No;
* listwise (eq. 6): ``M`` negatives, ``M`` uniform in ``[min_negatives, max_negatives]`` (paper: [2, 5]), and one
  positive inserted at a uniformly drawn position ``k``; the target is ``k``.

Weaker fallback, for shards without judge curation (the synthetic world, converted or mined shards): the sample's
own negatives are whatever the shards hold (mined by rank window or rule, possibly false negatives) and, with
``fill_in_batch=True``, the pool is topped up to ``max_negatives`` with the positives of *other* samples of the same
batch (same dataset). Nothing checks those for relevance, which is what the judge adds; a candidate whose id equals
one of the sample's positives is never used as a negative.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from mmembed.datamodules.contrastive import ContrastiveDataModule

from mmembed.backbone.rerank_inputs import MAX_LIST, RerankInputBuilder
from mmembed.data.shards import DecodedSample

T = TypeVar("T")


@dataclass
class RerankExample(Generic[T]):
    """The training material drawn for one query.

    Attributes:
        positive: The pointwise positive (labelled Yes).
        negative: The pointwise negative (labelled No).
        candidates: The listwise list (``M`` negatives with one positive), or ``None`` when too few negatives.
        target: Position of the positive in ``candidates`` (0-based; the answer token is ``str(target + 1)``).
    """

    positive: T
    negative: T
    candidates: list[T] | None
    target: int


def sample_example(rng: random.Random, positives: Sequence[T], negatives: Sequence[T], min_negatives: int = 2,
                   max_negatives: int = 5) -> RerankExample[T]:
    """Draw one query's pointwise pair and listwise list (paper §3.4).

    ``M`` is uniform in ``[min_negatives, min(max_negatives, len(negatives))]``, the ``M`` negatives are drawn
    without replacement, and the positive (uniform over ``positives``) is inserted at a position uniform in
    ``[0, M]``. With fewer than ``min_negatives`` negatives there is no list (``candidates=None``).

    Raises:
        ValueError: no positive or no negative.
    """
    if not positives or not negatives:
        raise ValueError(f"need at least one positive and one negative, got {len(positives)} and {len(negatives)}")
    positive = rng.choice(list(positives))
    negative = rng.choice(list(negatives))
    if len(negatives) < min_negatives:
        return RerankExample(positive, negative, None, -1)
    m = rng.randint(min_negatives, min(max_negatives, len(negatives)))
    listed = rng.sample(list(negatives), m)
    k = rng.randint(0, m)
    list_positive = rng.choice(list(positives))
    return RerankExample(positive, negative, listed[:k] + [list_positive] + listed[k:], k)


def side_id(sample_id: str, side_id_: str | None, role: str, index: int = 0) -> str:
    """A side's id, or a stable stand-in (``<sample>#pos``, ``#neg3``, ``#xpos1``) when the shard gives none."""
    return side_id_ or (f"{sample_id}#{role}" if role == "pos" else f"{sample_id}#{role}{index}")


def check_settings(min_negatives: int, max_negatives: int, pointwise: bool, listwise: bool) -> None:
    """Reject list settings the prompts cannot express, with the fix."""
    if not 1 <= min_negatives <= max_negatives or max_negatives + 1 > MAX_LIST:
        raise ValueError(f"need 1 <= min_negatives <= max_negatives <= {MAX_LIST - 1} (the position is one digit), "
                         f"got min_negatives={min_negatives}, max_negatives={max_negatives}")
    if not (pointwise or listwise):
        raise ValueError("pointwise and listwise are both off; enable one or both")


class RerankerCollate:
    """Turns a per-dataset group of decoded samples into a reranker batch (runs in the loader workers).

    Batch layout::

        point         BatchFeature, 2B rows: row 2i = (q_i, c+) and row 2i+1 = (q_i, c-)
        point_labels  (2B,) 1 = Yes, 0 = No
        list          BatchFeature, one row per sample that got a list (L rows)
        list_target   (L,) position of the positive; list_size (L,) candidates in the list (M + 1)
        dataset, ids, skipped, dropped   as in the contrastive batches; skipped also counts samples without a
                      negative (``rerank_no_negative``) or without a list (``rerank_short_list``)

    Args:
        rerank_inputs: Prompt and input builder.
        min_negatives, max_negatives: Range of ``M`` (paper: 2, 5).
        fill_in_batch: Top the negative pool up with other samples' positives (fallback data, see module doc).
        pointwise, listwise: Which parts to build.
        seed: Seed of the draws (combined with the batch's sample ids and a per-worker call count).
    """

    def __init__(self, rerank_inputs: RerankInputBuilder, min_negatives: int = 2, max_negatives: int = 5,
                 fill_in_batch: bool = True, pointwise: bool = True, listwise: bool = True, seed: int = 0) -> None:
        check_settings(min_negatives, max_negatives, pointwise, listwise)
        self.rerank_inputs = rerank_inputs
        self.min_negatives, self.max_negatives = min_negatives, max_negatives
        self.fill_in_batch = fill_in_batch
        self.pointwise, self.listwise = pointwise, listwise
        self.seed = seed
        self._calls = 0

    def pools(self, samples: Sequence[DecodedSample]) -> list[tuple[list, list]]:
        """Per sample ``(positives, negatives)`` as ``(id, Item)`` lists (see the module docstring)."""
        per_sample = []
        for dec in samples:
            s = dec.sample
            _, p, negs = dec.items()
            xpos = dec.extra_positive_items()
            positives = [(side_id(s.id, s.positive.id, "pos"), p)]
            positives += [(side_id(s.id, x.id, "xpos", j), it)
                          for j, (x, it) in enumerate(zip(s.extra_positives, xpos))]
            negatives = [(side_id(s.id, n.id, "neg", j), it) for j, (n, it) in enumerate(zip(s.negatives, negs))]
            per_sample.append((positives, negatives))
        out = []
        for i, (positives, negatives) in enumerate(per_sample):
            banned = {pid for pid, _ in positives}
            pool, seen = [], set(banned)
            for nid, it in negatives:
                if nid not in seen:
                    pool.append((nid, it))
                    seen.add(nid)
            if self.fill_in_batch:
                for j, (others, _) in enumerate(per_sample):
                    if len(pool) >= self.max_negatives:
                        break
                    oid, it = others[0]
                    if j != i and oid not in seen:
                        pool.append((oid, it))
                        seen.add(oid)
            out.append((positives, pool))
        return out

    def __call__(self, group: Mapping[str, Any]) -> dict[str, Any]:
        samples: list[DecodedSample] = group["samples"]
        ids = [d.sample.id for d in samples]
        rng = random.Random(f"rerank/{self.seed}/{self._calls}/{ids[0] if ids else ''}")
        self._calls += 1
        skipped = dict(group["skipped"])
        pairs, labels, lists, targets = [], [], [], []
        for dec, (positives, negatives) in zip(samples, self.pools(samples)):
            if not negatives:
                skipped["rerank_no_negative"] = skipped.get("rerank_no_negative", 0) + 1
                continue
            q = dec.items()[0]
            ex = sample_example(rng, [it for _, it in positives], [it for _, it in negatives], self.min_negatives,
                                self.max_negatives)
            pairs += [(q, ex.positive), (q, ex.negative)]
            labels += [1, 0]
            if ex.candidates is None:
                skipped["rerank_short_list"] = skipped.get("rerank_short_list", 0) + 1
            else:
                lists.append((q, ex.candidates))
                targets.append(ex.target)
        batch: dict[str, Any] = {"dataset": group["dataset"], "ids": ids, "skipped": skipped,
                                 "dropped": dict(group["dropped"])}
        if self.pointwise and pairs:
            batch["point"] = self.rerank_inputs.pointwise(pairs)
            batch["point_labels"] = torch.tensor(labels, dtype=torch.long)
        if self.listwise and lists:
            batch["list"] = self.rerank_inputs.listwise(lists)
            batch["list_target"] = torch.tensor(targets, dtype=torch.long)
            batch["list_size"] = torch.tensor([len(c) for _, c in lists], dtype=torch.long)
        return batch


class RerankerDataModule(ContrastiveDataModule):
    """Reranker batches (:class:`RerankerCollate`) over the contrastive shard stream.

    Takes every argument of :class:`ContrastiveDataModule` except ``num_hard_negatives`` (the negatives come from the
    samples, see the module docstring), plus:

    Args:
        min_negatives, max_negatives: Range of the listwise ``M`` (paper: [2, 5]).
        fill_in_batch: Fallback for shards without judge negatives: top the pool up with in-batch positives.
        pointwise, listwise: Which objectives get data.
        **kwargs: :class:`ContrastiveDataModule` arguments (shards, batch size, mixture, workers, tiling, ...).
    """

    def __init__(self, min_negatives: int = 2, max_negatives: int = 5, fill_in_batch: bool = True,
                 pointwise: bool = True, listwise: bool = True, **kwargs: Any) -> None:
        kwargs.pop("num_hard_negatives", None)
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["input_builder"])
        self.min_negatives, self.max_negatives = min_negatives, max_negatives
        self.fill_in_batch = fill_in_batch
        self.pointwise, self.listwise = pointwise, listwise
        check_settings(min_negatives, max_negatives, pointwise, listwise)  # now, not in a loader worker

    def make_collate(self) -> RerankerCollate:
        return RerankerCollate(RerankInputBuilder(self.input_builder), self.min_negatives, self.max_negatives,
                               self.fill_in_batch, self.pointwise, self.listwise, seed=self.seed)
