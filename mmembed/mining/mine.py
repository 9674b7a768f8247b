"""Global hard-negative mining over training shards (§3.3 Stage 2 "Global-HNM"; Table 8 rule-based baseline).

For every sub-dataset (the samples' ``dataset`` field) separately:

1. the candidate corpus is the dataset's unique positives -- deduplicated by ``Side.id`` when the positive has one,
   else by content (text + decoded pixels);
2. all candidates (role ``"candidate"``) and all distinct queries (role ``"query"``; a query repeated in several
   samples -- same instruction, text and pixels -- is embedded once) are embedded, in order of size, so that a
   batch holds items of similar length;
3. every query's candidates are ranked exactly (:func:`~mmembed.mining.search.topk_search`);
4. the ground-truth positive and its exact duplicates (same id, or same text + pixels under another id) are removed;
5. ``strategy="window"`` samples ``n`` negatives uniformly from filtered ranks ``[start, end)`` -- the paper's 2 from
   positions 50-100 -- and ``strategy="rule"`` keeps the top ``k`` (Table 8's rule-based baseline).

Outputs under ``out_dir``:

* ``shards/{dataset}-{i:06d}.tar`` -- every input sample, in input order, with its negatives **replaced** by the
  mined ones (negative images stored as ``neg{j}.png``; the mining ranks are added to ``meta["mined_negatives"]``).
  Replacing rather than appending keeps the negative count per sample fixed at what the next stage was configured
  for; the previous negatives are dropped.
* ``manifest.jsonl`` -- one line per query: ids, chosen negatives, their 0-based ranks in the filtered list and
  1-based raw ranks, scores, strategy and window, ``list_length`` (candidates left in the searched list after
  filtering -- the ``L`` a clamped window was scaled to) and ``clamped``. Identical inputs and seed give an identical
  file.
* ``summary.json`` -- per dataset: queries, corpus size, rank statistics, window clamps, and how many planted false
  negatives (``meta["false_negative_ids"]`` of the synthetic world) were picked -- the number that separates
  rule-based from judge-based mining. Also timings and queries/s.

Several devices: every rank reads the shards (cheap next to embedding), embeds the work blocks ``b`` with
``b % world_size == rank`` and writes them to ``out_dir/tmp``; rank 0 then waits for the other ranks' parts, merges
them, searches, samples and writes everything. Blocks have a fixed size (``batch_size * 8`` items) and are encoded
the same way whatever ``world_size`` is, so a split run gives the same embeddings -- and manifest -- as a single
one. The ranks can also run one after the other in one process (rank 0 last), which is how the tests check it.

Memory: all decoded samples are held while mining. For very large collections pass one dataset's shards per call
(with its own ``out_dir``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mmembed.data.reading import expand_urls
from mmembed.data.schema import Sample, Side
from mmembed.data.skips import SkipCounter
from mmembed.data.writing import write_atomic, write_shards
from mmembed.index.search import topk_search
from mmembed.mining.corpus import DatasetCorpus, collect_datasets
from mmembed.mining.embedding import ROLES, embed_datasets, model_fingerprint, part_path
from mmembed.mining.sampling import filter_ranked, rule_based_negatives, sample_window_negatives
from mmembed.mining.stats import DatasetMiningStats, MiningSummary, false_negative_totals

log = logging.getLogger(__name__)

Strategy = Literal["window", "rule"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def _open_corpus_index(corpus_index: Any, embedder: Any):
    from mmembed.index import Index

    index = corpus_index if isinstance(corpus_index, Index) else Index.load(corpus_index)
    if index.info.get("role", "candidate") != "candidate":
        raise ValueError(f"corpus_index holds {index.info['role']!r} embeddings; mining needs candidate ones")
    made_by, ours = index.info.get("model_fingerprint"), model_fingerprint(embedder)
    if made_by and ours and made_by != ours:
        raise ValueError("corpus_index was built with other model weights than this embedder; rebuild it with "
                         "this model (mmembed-index build --model ...) or drop corpus_index")
    return index


# ---------------------------------------------------------------------------------------------------- ranking
def _dataset_seed(seed: int, name: str) -> int:
    # Each dataset gets its own streams: with a shared seed, query i of every dataset would draw the same positions.
    return seed * 2**32 + zlib.crc32(name.encode())


def _mine_dataset(ds: DatasetCorpus, q: torch.Tensor, c: torch.Tensor, *, strategy: Strategy, window: tuple[int, int],
                  n: int, k: int, seed: int, backend: str, device: torch.device | None
                  ) -> tuple[list[dict[str, Any]], DatasetMiningStats]:
    """Search, filter and choose negatives for one dataset; returns manifest rows and its statistics."""
    keys = np.asarray([cand.key for cand in ds.corpus])
    positives = np.asarray(ds.positive_index, dtype=np.int64)
    # Deep enough that removing the positive and all its exact duplicates still leaves the window (or top-k) whole.
    dup_count = np.unique(keys, return_inverse=True, return_counts=True)[2]
    max_dups = int(dup_count.max()) if len(dup_count) else 1
    needed = window[1] if strategy == "window" else k
    search_k = min(len(ds.corpus), needed + max_dups)
    scores, ranked = topk_search(q, c, search_k, backend=backend, device=device)  # type: ignore[arg-type]
    scores, ranked = scores.cpu().numpy(), ranked.cpu().numpy()
    lists = filter_ranked(ranked, positives, corpus_keys=keys)

    clamp_warning = None
    try:
        if strategy == "window":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                chosen, ranks = sample_window_negatives(ranked, positives, corpus_keys=keys, window=window, n=n,
                                                        seed=_dataset_seed(seed, ds.name))
            clamp_warning = " ".join(str(w.message) for w in caught) or None
        else:
            # A corpus smaller than k + 1 (e.g. a 7-label classification set with k=16) cannot give k negatives:
            # clamp to what every query's filtered list holds, and report it like the window clamp.
            shortest = min(len(x) for x in lists)
            k_eff = min(k, shortest)
            if k_eff < 1:
                raise ValueError(f"no candidate is left after removing the positive and its duplicates (k={k})")
            if k_eff < k:
                clamp_warning = (f"rule top-{k} clamped to top-{k_eff}: the shortest filtered list has {shortest} "
                                 "candidates")
                log.warning("[mine] %s: %s", ds.name, clamp_warning)
            chosen = rule_based_negatives(ranked, positives, k_eff, corpus_keys=keys)
            ranks = np.tile(np.arange(k_eff, dtype=np.int64), (len(ds.samples), 1))
    except ValueError as err:
        raise ValueError(f"dataset {ds.name!r} (corpus of {len(ds.corpus)} unique positives): {err}") from err

    rows, picked_fn, queries_fn_picked, planted, queries_planted, has_fn_meta = [], 0, 0, 0, 0, False
    raw_all = np.empty_like(ranks)
    corpus_ids = {cand.cid for cand in ds.corpus}
    for i, dec in enumerate(ds.samples):
        row_pos = {int(ix): p for p, ix in enumerate(ranked[i])}
        raw = np.asarray([row_pos[int(ix)] + 1 for ix in chosen[i]], dtype=np.int64)
        raw_all[i] = raw
        neg_ids = [ds.corpus[int(ix)].cid for ix in chosen[i]]
        fn_ids = dec.sample.meta.get("false_negative_ids") if isinstance(dec.sample.meta, dict) else None
        fn_hit: list[str] = []
        if fn_ids is not None:
            has_fn_meta = True
            fn_set = set(fn_ids)
            fn_hit = [x for x in neg_ids if x in fn_set]
            in_corpus = len(fn_set & corpus_ids)
            planted += in_corpus
            queries_planted += in_corpus > 0
            picked_fn += len(fn_hit)
            queries_fn_picked += bool(fn_hit)
        rows.append({
            "id": dec.sample.id,
            "dataset": ds.name,
            "positive_id": ds.corpus[ds.positive_index[i]].cid,
            "negative_ids": neg_ids,
            "ranks": [int(r) for r in ranks[i]],
            "raw_ranks": [int(r) for r in raw],
            "scores": [round(float(scores[i][p - 1]), 6) for p in raw],
            "strategy": strategy,
            "window": list(window) if strategy == "window" else None,
            "list_length": int(len(lists[i])),
            "clamped": bool(strategy == "window" and len(lists[i]) < window[1]),
            "false_negatives_picked": fn_hit,
        })
    clamped = [len(x) for x in lists if len(x) < (window[1] if strategy == "window" else k)]
    stats = DatasetMiningStats(
        queries=len(ds.samples),
        distinct_queries=len(ds.unique_queries),
        corpus_size=len(ds.corpus),
        merged_positives=ds.merged,
        search_k=search_k,
        negatives_per_query=int(ranks.shape[1]),
        rank_mean=round(float(ranks.mean()), 4),
        rank_min=int(ranks.min()),
        rank_max=int(ranks.max()),
        raw_rank_mean=round(float(raw_all.mean()), 4),
        raw_rank_min=int(raw_all.min()),
        raw_rank_max=int(raw_all.max()),
        clamped_queries=len(clamped),
        shortest_list=min(clamped) if clamped else None,
        clamp_warning=clamp_warning,
        false_negatives_planted=planted if has_fn_meta else None,
        queries_with_false_negatives=queries_planted if has_fn_meta else None,
        false_negatives_picked=picked_fn if has_fn_meta else None,
        queries_with_false_negative_picked=queries_fn_picked if has_fn_meta else None,
        false_negative_share=round(picked_fn / ranks.size, 6) if has_fn_meta and ranks.size else None,
    )
    return rows, stats


def _mined_samples(ds: DatasetCorpus, rows: list[dict[str, Any]]):
    """The dataset's samples with their negatives replaced by the mined ones, ready for ``write_shards``."""
    index = {cand.cid: cand for cand in ds.corpus}
    for dec, row in zip(ds.samples, rows):
        s = dec.sample
        images: dict[str, Any] = {side.image: dec.images[side.image] for side in (s.query, s.positive)
                                  if side.image is not None}
        negatives = []
        for j, cid in enumerate(row["negative_ids"]):
            cand = index[cid]
            member = f"neg{j}.png" if cand.image is not None else None
            negatives.append(Side(text=cand.side.text, image=member, instruction=cand.side.instruction,
                                  kind=cand.side.kind, id=cand.cid))
            if member is not None:
                images[member] = cand.image
        meta = {**s.meta, "mined_negatives": {k: row[k] for k in ("strategy", "window", "ranks", "raw_ranks")}}
        yield Sample(id=s.id, dataset=s.dataset, task=s.task, meta_task=s.meta_task, query=s.query,
                     positive=s.positive, negatives=negatives, meta=meta), images


# -------------------------------------------------------------------------------------------------------- entry
def mine_hard_negatives(
    embedder: Any,
    shards: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    strategy: Strategy = "window",
    window: tuple[int, int] = (50, 100),
    n: int = 2,
    k: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    maxcount: int = 1000,
    world_size: int = 1,
    rank: int = 0,
    backend: Literal["exact", "faiss"] = "exact",
    part_timeout_s: float = 3600.0,
    show_progress: bool | None = None,
    corpus_index: str | os.PathLike | Any | None = None,
) -> MiningSummary | None:
    """Mine hard negatives for every query of every sub-dataset and write new shards, a manifest and a summary.

    Args:
        embedder: An :class:`~mmembed.embedder.Embedder` (anything with ``encode(items, role, batch_size,
            show_progress)`` returning L2-normalised rows).
        shards: Input shards: a directory, glob, brace pattern or list (see :func:`~mmembed.data.reading.expand_urls`).
        out_dir: Output folder (``shards/``, ``manifest.jsonl``, ``summary.json``; ``tmp/`` while ranks merge).
            Earlier output shards of the same datasets are replaced.
        strategy: ``"window"`` (paper Stage 2: ``n`` uniform picks from filtered ranks ``[start, end)``) or
            ``"rule"`` (Table 8 baseline: the top ``k`` once the positive and its duplicates are removed).
        window: 0-based half-open rank window of the window strategy; ``(50, 100)`` is the paper's positions 50-100.
            A dataset with fewer candidates gets a proportionally scaled window (reported, not an error).
        n: Negatives per query for the window strategy.
        k: Negatives per query for the rule strategy (default ``n``); must be left None for ``"window"``.
        seed: Sampling seed; each dataset and query draws from its own stream, so results do not depend on the
            order of datasets or on ``world_size``.
        batch_size: Encoder batch size.
        maxcount: Samples per output shard.
        world_size: Ranks sharing the embedding work.
        rank: This process's rank; ranks other than 0 only embed their blocks and return None.
        backend: Search backend, ``"exact"`` (torch) or ``"faiss"`` (exact flat index).
        part_timeout_s: How long rank 0 waits for the other ranks' embeddings.
        show_progress: Progress bar over the embedding blocks; default when there are more than 8.
        corpus_index: A saved :class:`~mmembed.index.Index` (folder or object) built from these shards with this
            model (``mmembed-index build --corpus SHARDS``): candidate embeddings are read from it by corpus id
            instead of being encoded again; only the queries are embedded.

    Returns:
        The :class:`MiningSummary` on rank 0, None on other ranks.

    Raises:
        ValueError: For inconsistent settings, or a dataset too small to give every query its negatives.
    """
    if strategy not in ("window", "rule"):
        raise ValueError(f"strategy must be 'window' or 'rule', got {strategy!r}")
    window = (int(window[0]), int(window[1]))
    if strategy == "window":
        if k is not None:
            raise ValueError("k is the rule strategy's top-K; for strategy='window' set n (and window) instead")
        if not 0 <= window[0] < window[1]:
            raise ValueError(f"window must satisfy 0 <= start < end, got {window}")
        if not 1 <= n <= window[1] - window[0]:
            raise ValueError(f"n must be in [1, window end - start = {window[1] - window[0]}], got {n}")
    k = (n if k is None else k) if strategy == "rule" else None
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if batch_size < 1 or maxcount < 1:
        raise ValueError("batch_size and maxcount must be >= 1")

    t0 = time.perf_counter()
    out = Path(out_dir)
    counter = SkipCounter("mining")
    urls = expand_urls(shards) if isinstance(shards, str | os.PathLike) else expand_urls([str(s) for s in shards])
    datasets = collect_datasets(urls, counter)
    t_read = time.perf_counter()

    index = _open_corpus_index(corpus_index, embedder) if corpus_index is not None else None
    emb = embed_datasets(embedder, datasets, out, batch_size=batch_size, world_size=world_size, rank=rank,
                         roles=("query",) if index is not None else ROLES, part_timeout_s=part_timeout_s,
                         show_progress=show_progress, description="embedding for mining")
    if emb is None:  # a rank other than 0: its blocks are in out/tmp for rank 0
        return None
    if index is not None:
        for name, ds in datasets.items():
            try:
                emb[name, "candidate"] = torch.from_numpy(index.vectors_for([c.cid for c in ds.corpus]))
            except KeyError as err:
                raise ValueError(f"dataset {name!r}: {err.args[0]}; build the index from the same shards "
                                 "(mmembed-index build --corpus SHARDS) or drop corpus_index") from None
    t_embed = time.perf_counter()  # on rank 0 this includes waiting for the other ranks

    device = getattr(embedder, "device", None)
    rows_by_ds, stats = {}, {}
    for name, ds in datasets.items():
        rows_by_ds[name], stats[name] = _mine_dataset(
            ds, emb[name, "query"], emb[name, "candidate"], strategy=strategy, window=window, n=n, k=k or 0,
            seed=seed, backend=backend, device=device)
        s = stats[name]
        what = "window" if strategy == "window" else f"top-{k}"
        clamp = (f"; {what} clamped for {s.clamped_queries} queries (shortest list {s.shortest_list})"
                 if s.clamped_queries else "")
        fn = (f"; {s.false_negatives_picked} of {s.queries * s.negatives_per_query} chosen negatives are false "
              f"negatives ({s.false_negatives_planted} in the corpus)" if s.false_negatives_picked is not None else "")
        log.info("mined %s: %d queries, corpus %d, ranks %d-%d (mean %.1f)%s%s", name, s.queries, s.corpus_size,
                 s.rank_min, s.rank_max, s.rank_mean, clamp, fn)
    t_search = time.perf_counter()

    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    all_shards: list[str] = []
    for name, ds in datasets.items():
        safe = _UNSAFE.sub("_", name)
        for stale in shard_dir.glob(f"{safe}-[0-9]*.tar"):
            stale.unlink()  # a previous, larger run would otherwise leave extra shards of this dataset
        paths = write_shards(_mined_samples(ds, rows_by_ds[name]), str(shard_dir / f"{safe}-%06d.tar"),
                             maxcount=maxcount)
        stats[name].shards = paths
        all_shards.extend(paths)
    manifest = out / "manifest.jsonl"
    write_atomic(manifest, "".join(json.dumps(row, sort_keys=True) + "\n"
                                    for rows in rows_by_ds.values() for row in rows))
    t_end = time.perf_counter()

    queries = sum(len(ds.samples) for ds in datasets.values())
    timing = {"read_s": t_read - t0, "embed_s": t_embed - t_read, "search_s": t_search - t_embed,
              "write_s": t_end - t_search, "total_s": t_end - t0}
    summary = MiningSummary(
        out_dir=str(out), strategy=strategy, window=window if strategy == "window" else None, n=n, k=k, seed=seed,
        world_size=world_size, queries=queries, datasets=stats, skipped=counter.as_dict(),
        timing={key: round(v, 3) for key, v in timing.items()},
        queries_per_s=round(queries / max(timing["total_s"], 1e-9), 2), manifest=str(manifest), shards=all_shards)
    fn_totals = false_negative_totals(stats)
    summary.false_negatives_picked, summary.negatives_picked, summary.false_negative_share = fn_totals
    write_atomic(out / "summary.json", json.dumps(summary.to_json(), indent=2, sort_keys=True) + "\n")
    if world_size > 1:
        for r in range(1, world_size):
            part_path(out, r, world_size).unlink(missing_ok=True)
        if not any((out / "tmp").iterdir()):
            (out / "tmp").rmdir()
    log.info("mining: %s", summary.false_negative_line())
    log.info("mining: %d queries in %.1fs (%.1f queries/s; embedding %.1fs) -> %s", queries, timing["total_s"],
             summary.queries_per_s, timing["embed_s"], out)
    return summary
