"""Retrieve-and-judge curation for stage 3 (§3.3 "Stage 3", Table 8, Table 14 "MLLM-Judge-FT").

For every training query, within its own sub-dataset (the samples' ``dataset`` field):

1. **retrieve** the top ``k`` (20) candidates with the stage-2 embedder -- the mining code embeds each dataset's
   deduplicated positive corpus and its queries and ranks exactly (:mod:`mmembed.mining`); the ground truth and its
   exact duplicates are removed from the list;
2. **judge** every remaining candidate with an MLLM (:class:`~mmembed.judge.Judge`, the paper's template and
   Table 13 instruction): ``logit(yes) > logit(no)`` is relevant -- or, on the synthetic world only, with the
   *simulated expert judge* (:class:`~mmembed.judge.simulated.SimulatedJudge`), which answers from the samples'
   ground truth with a set recall and false-yes rate. Datasets with binary labels (Table 13 note;
   ``skip_datasets``) are not judged: every retrieved candidate is a true negative there;
3. **write** curated shards for a given ``n`` (:mod:`mmembed.judge.selection`): ``strategy="judge"`` keeps the
   top-ranked 'no' candidates as hard negatives (up to ``n``) and stores the 'yes' ones as ``extra_positives`` (kept
   for the reranker; the contrastive loss never uses them, the ground truth stays the only positive);
   ``strategy="rule"`` (Table 8's baseline) takes the top ``n`` retrieved candidates whatever the judge says;
   ``strategy="margin"`` (the judge-free control) drops candidates scoring within ``margin`` of the ground truth.

Steps 1 and 2 are the expensive ones and are cached in ``cache_dir`` (``retrieval.json``, ``judgments.jsonl``, each
with the fingerprint of what produced it), so a Table 8 sweep over ``n`` and over judge/rule judges once and only
re-runs step 3.

Outputs under ``out_dir``: ``shards/{dataset}-{i:06d}.tar`` (schema samples, negatives replaced as in mining,
images ``neg{j}.png`` / ``xpos{j}.png``), ``manifest.jsonl`` (per query: candidate ids, 1-based retrieval ranks,
retrieval scores, yes/no logits, decision per candidate, chosen negatives) and ``summary.json`` (counts per dataset,
and the planted false negatives of the synthetic world -- ``meta["false_negative_ids"]`` -- caught as positives by
the judge, and left among the negatives by the judge, the rule and the margin control at the same ``n``).

Several devices: embedding is shared out like mining (``world_size``/``rank``; rank 0 merges and searches), then
the judging: rank ``r`` judges the queries ``i`` with ``i % world_size == r`` once ``retrieval.json`` exists, and
rank 0 merges the parts. Ranks may run one after another in one process (rank 0 last in each step).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmembed.data.decode import side_to_item
from mmembed.data.reading import iter_decoded
from mmembed.data.skips import SkipCounter
from mmembed.data.writing import write_atomic
from mmembed.index.search import topk_search
from mmembed.judge.judge import Judge, JudgePair
from mmembed.judge.selection import (
    DEFAULT_MARGIN,
    STRATEGIES,
    CurationStrategy,
    CurationSummary,
    DatasetCurationStats,
    _urls,
    choose,
    decide,
    within_margin,
    write_curated,
)
from mmembed.judge.simulated import SimulatedJudge
from mmembed.mining.corpus import DatasetCorpus, collect_datasets
from mmembed.mining.embedding import BLOCK_BATCHES, embed_datasets, split_fingerprint
from mmembed.mining.sampling import filter_ranked
from mmembed.prompts.judge import BINARY_LABEL_DATASETS, is_binary_label, judgment_instruction
from mmembed.rankparts import gather_parts, wait_for, write_part
from mmembed.types import Item

log = logging.getLogger(__name__)

# step 3 lives in mmembed.judge.selection; its names stay importable from here
__all__ = ["DEFAULT_MARGIN", "STRATEGIES", "CurationStrategy", "CurationSummary", "DatasetCurationStats", "choose",
           "curate", "decide", "judge_candidates", "retrieve_candidates", "within_margin", "write_curated"]

RETRIEVAL_FILE = "retrieval.json"
#: Part of the retrieval fingerprint: bumped when ``retrieval.json`` gains fields (v2: ``positive_score``), so an
#: older cache is recomputed rather than read without them.
RETRIEVAL_FORMAT = "v2"
JUDGMENTS_FILE = "judgments.jsonl"


# ------------------------------------------------------------------------------------------------------ step 1
def retrieve_candidates(embedder: Any, shards, cache_dir: str | os.PathLike, *, k: int = 20, batch_size: int = 32,
                        world_size: int = 1, rank: int = 0, part_timeout_s: float = 3600.0,
                        show_progress: bool | None = None) -> dict[str, Any] | None:
    """Top-``k`` retrieval per training query within its dataset, ground truth removed; cached in ``cache_dir``.

    Returns:
        On rank 0, ``{"fingerprint", "k", "queries": {dataset: [{"id", "candidate_ids", "ranks", "scores",
        "positive_score"}]}}`` (also ``cache_dir/retrieval.json``); ``positive_score`` is the query's score with its
        ground truth, retrieved or not (``strategy="margin"`` measures from it). None on other ranks.
    """
    if k < 2:
        raise ValueError(f"k must be >= 2 (the ground truth is removed from the top k), got {k}")
    cache = Path(cache_dir)
    counter = SkipCounter("curation")
    datasets = collect_datasets(_urls(shards), counter)
    block_size = batch_size * BLOCK_BATCHES
    fingerprint = split_fingerprint(embedder, datasets, block_size, world_size) + f"/k={k}/{RETRIEVAL_FORMAT}"
    path = cache / RETRIEVAL_FILE
    if rank == 0 and path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("fingerprint") == fingerprint:
            log.info("retrieval: reusing %s", path)
            return cached
    emb = embed_datasets(embedder, datasets, cache / "embed_parts", batch_size=batch_size, world_size=world_size,
                         rank=rank, fingerprint_extra=f"/k={k}", part_timeout_s=part_timeout_s,
                         show_progress=show_progress, description="embedding for curation")
    if emb is None:  # a rank other than 0: its blocks wait in cache/embed_parts for rank 0
        return None
    device = getattr(embedder, "device", None)
    out: dict[str, list[dict[str, Any]]] = {}
    for name, ds in datasets.items():
        scores, ranked = topk_search(emb[name, "query"], emb[name, "candidate"], k, device=device)
        scores, ranked = scores.cpu().numpy(), ranked.cpu().numpy()
        # the ground truth's own score, whether or not it made the top k (same inner product as the search)
        gt = emb[name, "candidate"][torch.as_tensor(ds.positive_index, dtype=torch.long)]
        positive_scores = (emb[name, "query"].float() * gt.float()).sum(-1).cpu().numpy()
        keys = np.asarray([c.key for c in ds.corpus])
        lists = filter_ranked(ranked, np.asarray(ds.positive_index), corpus_keys=keys)
        rows = []
        for i, (dec, kept) in enumerate(zip(ds.samples, lists)):
            where = {int(c): j for j, c in enumerate(ranked[i])}
            rows.append({"id": dec.sample.id, "candidate_ids": [ds.corpus[int(c)].cid for c in kept],
                         "ranks": [where[int(c)] + 1 for c in kept],
                         "scores": [round(float(scores[i, where[int(c)]]), 6) for c in kept],
                         "positive_score": round(float(positive_scores[i]), 6)})
        out[name] = rows
    result = {"fingerprint": fingerprint, "k": k, "queries": out}
    cache.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(result, sort_keys=True) + "\n")
    return result


# ------------------------------------------------------------------------------------------------------ step 2
def _judge_fingerprint(judge: Any, retrieval_fp: str, skip: Sequence[str], instructions: dict) -> str:
    h = hashlib.sha1(f"{retrieval_fp}|{sorted(skip)}|{sorted(instructions.items())}".encode())
    if getattr(judge, "uses_ground_truth", False):  # the simulated judge: its settings are its identity
        h.update(judge.fingerprint.encode())
    elif judge is not None:
        h.update(judge.model_type.encode())
        with torch.no_grad():
            for pname, p in judge.model.named_parameters():
                flat = p.detach().flatten()
                h.update(pname.encode() + torch.cat([flat[:8], flat[-8:]]).float().cpu().numpy().tobytes())
    return h.hexdigest()


def _instruction(ds: DatasetCorpus, instructions: dict[str, str]) -> str:
    s = ds.samples[0].sample
    return instructions.get(ds.name) or judgment_instruction(ds.name, task=s.task, analog=s.meta.get("analog"))


def _skipped(ds: DatasetCorpus, skip: Sequence[str]) -> bool:
    return is_binary_label(ds.name, ds.samples[0].sample.meta.get("analog"), tuple(skip))


def _ground_truth_logits(judge: SimulatedJudge, datasets: dict[str, DatasetCorpus], retrieval: dict[str, Any],
                         work: list[tuple[str, int]]) -> dict[int, torch.Tensor]:
    """The simulated judge's (yes, no) logits per work item, from ids and retrieval scores only; every sample is
    checked for ground truth before any is judged, so data without it is refused as a whole, in one line."""
    truths = {(name, i): judge.ground_truth(datasets[name].samples[i].sample) for name, i in work}
    out = {}
    for g, (name, i) in enumerate(work):
        row = retrieval["queries"][name][i]
        answers = judge.answer(row["id"], truths[name, i], row["candidate_ids"], row["scores"])
        yes, no = judge.logits(answers)
        out[g] = torch.tensor([yes, no], dtype=torch.float32).reshape(2, -1).T
    return out


def _mllm_logits(judge: Judge, datasets: dict[str, DatasetCorpus], retrieval: dict[str, Any],
                 work: list[tuple[str, int]], instructions: dict[str, str], cache: Path, fingerprint: str, *,
                 batch_size: int, reuse_prefix: bool, world_size: int, rank: int, part_timeout_s: float,
                 show_progress: bool | None) -> dict[int, torch.Tensor] | None:
    """The MLLM's (yes, no) logits per work item; rank ``r`` judges items ``g % world_size == r``, rank 0 merges."""
    mine = [(g, w) for g, w in enumerate(work) if g % world_size == rank]
    pairs: list[JudgePair] = []
    spans: dict[int, tuple[int, int]] = {}
    corpus_index = {name: {c.cid: c for c in ds.corpus} for name, ds in datasets.items()}
    for g, (name, i) in mine:
        ds, row = datasets[name], retrieval["queries"][name][i]
        dec = ds.samples[i]
        q = side_to_item(dec.sample.query, dec.images)
        query = Item(text=q.text, image=q.image, kind=q.kind)  # the judge sees content, not the embedding prompt
        inst = _instruction(ds, instructions)
        start = len(pairs)
        for cid in row["candidate_ids"]:
            c = corpus_index[name][cid]
            t = side_to_item(c.side, {c.side.image: c.image} if c.image is not None else {})
            pairs.append(JudgePair(query, Item(text=t.text, image=t.image, kind=t.kind), inst))
        spans[g] = (start, len(pairs))
    scores = judge.score(pairs, batch_size=batch_size, reuse_prefix=reuse_prefix, show_progress=show_progress) \
        if pairs else None
    own = {g: torch.stack([scores.yes[a:b], scores.no[a:b]], 1) for g, (a, b) in spans.items()} if scores else {}
    if world_size > 1:
        parts = cache / "judge_parts"
        if rank != 0:
            write_part(parts, rank, world_size, fingerprint, own)
            return None
        own = gather_parts(parts, world_size, fingerprint, own, part_timeout_s)
    return own


def judge_candidates(judge: Judge | SimulatedJudge | None, shards, cache_dir: str | os.PathLike, *,
                     skip_datasets: Sequence[str] = BINARY_LABEL_DATASETS, instructions: dict[str, str] | None = None,
                     batch_size: int = 8, reuse_prefix: bool = True, world_size: int = 1, rank: int = 0,
                     part_timeout_s: float = 3600.0, show_progress: bool | None = None) -> dict[str, dict] | None:
    """Judge every retrieved candidate of ``cache_dir/retrieval.json``; cached as ``cache_dir/judgments.jsonl``.

    ``judge=None`` records no logits (enough for ``strategy="rule"`` / ``"margin"``) and leaves the cache alone. The
    :class:`~mmembed.judge.simulated.SimulatedJudge` answers on rank 0 from the samples' ground truth (and refuses
    samples without it: :class:`~mmembed.judge.simulated.NoGroundTruthError`). Returns, on rank 0, query id ->
    ``{"dataset", "judged", "yes": [...] | None, "no": [...] | None}``; None on other ranks.
    """
    cache = Path(cache_dir)
    instructions = dict(instructions or {})
    wait_for([cache / RETRIEVAL_FILE], part_timeout_s, lambda p: f"retrieval results {p} (rank 0's)", poll_s=2.0)
    retrieval = json.loads((cache / RETRIEVAL_FILE).read_text())
    simulated = getattr(judge, "uses_ground_truth", False)
    if judge is None or (simulated and rank != 0):  # nothing to compute here; a shared cache is left intact
        if rank != 0:
            return None
        return {row["id"]: {"id": row["id"], "dataset": name, "judged": False, "yes": None, "no": None}
                for name, rows in retrieval["queries"].items() for row in rows}
    fingerprint = _judge_fingerprint(judge, retrieval["fingerprint"], skip_datasets, instructions)
    path = cache / JUDGMENTS_FILE
    if rank == 0 and path.is_file():
        lines = path.read_text().splitlines()
        if lines and json.loads(lines[0]).get("fingerprint") == fingerprint:
            log.info("judging: reusing %s", path)
            return {r["id"]: r for r in map(json.loads, lines[1:])}
    datasets = collect_datasets(_urls(shards), SkipCounter("curation"))
    work: list[tuple[str, int]] = []  # (dataset, query index) in a fixed global order
    for name, ds in datasets.items():
        if not _skipped(ds, skip_datasets):
            work += [(name, i) for i in range(len(ds.samples))]
    if simulated:
        own = _ground_truth_logits(judge, datasets, retrieval, work)
    else:
        own = _mllm_logits(judge, datasets, retrieval, work, instructions, cache, fingerprint, batch_size=batch_size,
                           reuse_prefix=reuse_prefix, world_size=world_size, rank=rank,
                           part_timeout_s=part_timeout_s, show_progress=show_progress)
        if own is None:
            return None
    g_of = {w: g for g, w in enumerate(work)}
    judged = {g: own[g] for g in range(len(work)) if g in own}
    if len(judged) != len(work):
        raise RuntimeError(f"{len(work) - len(judged)} judged queries are missing after merging the ranks")
    out: dict[str, dict] = {}
    for name, ds in datasets.items():
        for i, dec in enumerate(ds.samples):
            g = g_of.get((name, i))
            logits = judged[g] if g is not None else None
            out[dec.sample.id] = {"id": dec.sample.id, "dataset": name, "judged": logits is not None,
                                  "yes": None if logits is None else [round(float(v), 5) for v in logits[:, 0]],
                                  "no": None if logits is None else [round(float(v), 5) for v in logits[:, 1]]}
    cache.mkdir(parents=True, exist_ok=True)
    header = json.dumps({"fingerprint": fingerprint, "judge": getattr(judge, "label", True),
                         "skip": list(skip_datasets)})
    write_atomic(path, header + "\n" + "".join(json.dumps(r, sort_keys=True) + "\n" for r in out.values()))
    return out


# ------------------------------------------------------------------------------------------------------ entry
def _require_ground_truth(shards, skip: Sequence[str]) -> None:
    """The first sample of every shard must carry ground truth for the simulated judge (binary-label datasets
    excepted: they are not judged); :func:`judge_candidates` checks every sample again."""
    for url in _urls(shards):
        for dec in iter_decoded([url], counter=SkipCounter("curation")):
            s = dec.sample
            if not is_binary_label(s.dataset, s.meta.get("analog"), tuple(skip)):
                SimulatedJudge.ground_truth(s)
            break


def curate(embedder: Any, judge: Judge | SimulatedJudge | None, shards, out_dir: str | os.PathLike, *, k: int = 20,
           max_negatives: int = 12, strategy: CurationStrategy = "judge", margin: float = DEFAULT_MARGIN,
           skip_datasets: Sequence[str] = BINARY_LABEL_DATASETS, instructions: dict[str, str] | None = None,
           batch_size: int = 8, embed_batch_size: int = 32, reuse_prefix: bool = True, seed: int = 0,
           cache_dir: str | os.PathLike | None = None, maxcount: int = 1000, world_size: int = 1, rank: int = 0,
           part_timeout_s: float = 3600.0, show_progress: bool | None = None) -> CurationSummary | None:
    """Retrieve top-``k`` per training query, judge the candidates, write stage-3 shards with ``max_negatives``.

    Args:
        embedder: The stage-2 :class:`~mmembed.embedder.Embedder` (retrieval).
        judge: The :class:`~mmembed.judge.Judge`, or the
            :class:`~mmembed.judge.simulated.SimulatedJudge` (synthetic world only: answers from the samples'
            ground truth, refuses data without it); may be None for ``strategy="rule"`` / ``"margin"`` (no logits
            recorded, so the summary has no judge figures).
        shards: Training shards (directory, glob, brace pattern or list).
        out_dir: Output folder (``shards/``, ``manifest.jsonl``, ``summary.json``).
        k: Retrieval depth (the paper's K = 20, ground truth included).
        max_negatives: Hard negatives per query, ``n`` (Table 14: 12; Table 8 sweeps 0-20).
        strategy: ``"judge"`` (judge-curated negatives + extra positives), ``"rule"`` (top-``n``) or ``"margin"``
            (the judge-free control: the top ``n`` of those scoring below the ground truth's score minus ``margin``).
        margin: The margin control's delta, in retrieval-score (cosine) units.
        skip_datasets: Binary-label datasets not judged (matched by name or by ``meta["analog"]``).
        instructions: Dataset -> judgment instruction overrides (default: Table 13 lookup).
        batch_size: Judge pairs per forward pass.
        embed_batch_size: Embedder batch size for retrieval.
        reuse_prefix: Share each query's KV-cache prefix across its candidates (InternVL-family judges).
        seed: Recorded in the summary; curation itself draws nothing at random.
        cache_dir: Where retrieval and judgments are cached (default ``out_dir/cache``); share it across the
            points of a sweep so the judge runs once.
        maxcount: Samples per output shard.
        world_size: Ranks sharing embedding and judging; rank: this process's rank.
        part_timeout_s: How long a rank waits for the others' parts.
        show_progress: Progress bars (default: when there are many batches).

    Returns:
        The summary on rank 0, None on other ranks.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "judge" and judge is None:
        raise ValueError("strategy='judge' needs a judge; pass Judge.from_pretrained(<folder>) or use strategy='rule'")
    if getattr(judge, "uses_ground_truth", False) and rank == 0:
        _require_ground_truth(shards, skip_datasets)  # refuse real data before the expensive retrieval
    cache = Path(cache_dir) if cache_dir is not None else Path(out_dir) / "cache"
    t0 = time.perf_counter()
    retrieval = retrieve_candidates(embedder, shards, cache, k=k, batch_size=embed_batch_size, world_size=world_size,
                                    rank=rank, part_timeout_s=part_timeout_s, show_progress=show_progress)
    t1 = time.perf_counter()
    judgments = judge_candidates(judge, shards, cache, skip_datasets=skip_datasets, instructions=instructions,
                                 batch_size=batch_size, reuse_prefix=reuse_prefix, world_size=world_size, rank=rank,
                                 part_timeout_s=part_timeout_s, show_progress=show_progress)
    t2 = time.perf_counter()
    if rank != 0 or retrieval is None or judgments is None:
        return None
    skipped = sorted({r["dataset"] for r in judgments.values() if not r["judged"]}) if judge is not None else []
    summary = write_curated(shards, retrieval, judgments, out_dir, n=max_negatives, strategy=strategy, seed=seed,
                            maxcount=maxcount, skipped_datasets=skipped, margin=margin,
                            judge_label=getattr(judge, "label", None), judge_settings=getattr(judge, "settings", None))
    summary.timing.update({"retrieve_s": round(t1 - t0, 3), "judge_s": round(t2 - t1, 3),
                           "total_s": round(time.perf_counter() - t0, 3)})
    write_atomic(Path(out_dir) / "summary.json", json.dumps(summary.to_json(), indent=2, sort_keys=True) + "\n")
    t = summary.totals
    log.info("curation (%s, n=%d, judge: %s): %d queries; judge yes %s / no %s; planted false negatives caught %s, "
             "left as negatives: judge %s vs rule %s vs margin %s (delta %g) -> %s", strategy, max_negatives,
             getattr(judge, "display_name", None), summary.queries, t["judged_yes"], t["judged_no"], t["fn_caught"],
             t["fn_negative_judge"], t["fn_negative_rule"], t["fn_negative_margin"], margin, out_dir)
    return summary
