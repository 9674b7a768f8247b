"""Retrieve-and-judge curation for stage 3 (§3.3 "Stage 3", Table 8, Table 14 "MLLM-Judge-FT").

For every training query, within its own sub-dataset (the samples' ``dataset`` field):

1. **retrieve** the top ``k`` (20) candidates with the stage-2 embedder -- the mining code embeds each dataset's
   deduplicated positive corpus and its queries and ranks exactly (:mod:`mmembed.mining`); the ground truth and its
   exact duplicates are removed from the list;
2. **judge** every remaining candidate with an MLLM (:class:`~mmembed.judge.Judge`, the paper's template and
   Table 13 instruction): ``logit(yes) > logit(no)`` is relevant. Datasets with binary labels (Table 13 note;
   ``skip_datasets``) are not judged: every retrieved candidate is a true negative there;
3. **write** curated shards for a given ``n``: ``strategy="judge"`` keeps the top-ranked 'no' candidates as hard
   negatives (up to ``n``) and stores the 'yes' ones as ``extra_positives`` (kept for the reranker; the contrastive
   loss never uses them, the ground truth stays the only positive); ``strategy="rule"`` (Table 8's baseline) takes
   the top ``n`` retrieved candidates whatever the judge says.

Steps 1 and 2 are the expensive ones and are cached in ``cache_dir`` (``retrieval.json``, ``judgments.jsonl``, each
with the fingerprint of what produced it), so a Table 8 sweep over ``n`` and over judge/rule judges once and only
re-runs step 3.

Outputs under ``out_dir``: ``shards/{dataset}-{i:06d}.tar`` (schema samples, negatives replaced as in mining,
images ``neg{j}.png`` / ``xpos{j}.png``), ``manifest.jsonl`` (per query: candidate ids, 1-based retrieval ranks,
retrieval scores, yes/no logits, decision per candidate, chosen negatives) and ``summary.json`` (counts per dataset,
and the planted false negatives of the synthetic world -- ``meta["false_negative_ids"]`` -- caught as positives by
the judge, and left among the negatives by the judge and by the rule at the same ``n``).

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mmembed.data.decode import side_to_item
from mmembed.data.reading import expand_urls
from mmembed.data.schema import Sample, Side
from mmembed.data.skips import SkipCounter
from mmembed.data.writing import write_atomic, write_shards
from mmembed.index.search import topk_search
from mmembed.judge.judge import Judge, JudgePair
from mmembed.mining.corpus import DatasetCorpus, collect_datasets
from mmembed.mining.embedding import BLOCK_BATCHES, embed_datasets, split_fingerprint
from mmembed.mining.sampling import filter_ranked
from mmembed.prompts.judge import BINARY_LABEL_DATASETS, is_binary_label, judgment_instruction
from mmembed.rankparts import gather_parts, wait_for, write_part
from mmembed.types import Item

log = logging.getLogger(__name__)

CurationStrategy = Literal["judge", "rule"]
RETRIEVAL_FILE = "retrieval.json"
JUDGMENTS_FILE = "judgments.jsonl"
_UNSAFE_CHARS = str.maketrans({c: "_" for c in " /\\:*?\"<>|"})


# ------------------------------------------------------------------------------------------------------ results
@dataclass
class DatasetCurationStats:
    """What curation did on one sub-dataset (an entry of ``summary.json``'s ``datasets``).

    Attributes:
        queries: Queries curated.
        judged: Whether the judge scored this dataset (False for binary-label datasets).
        candidates: Retrieved candidates after removing the ground truth, summed over queries.
        judged_yes / judged_no: The judge's decisions over those candidates (0 when not judged).
        negatives: Negatives written (sum over queries); ``queries_short``: queries with fewer than ``n``.
        extra_positives: Judge positives written as ``extra_positives``.
        fn_planted: Planted false negatives (``meta["false_negative_ids"]``) summed over queries; None without
            that metadata. ``fn_retrieved``: those among the retrieved candidates.
        fn_caught: Retrieved planted false negatives the judge called 'yes' (they become extra positives).
        fn_negative_judge / fn_negative_rule: Planted false negatives among the first ``n`` negatives chosen by the
            judge strategy / by the rule (top ``n``), whichever strategy this run wrote.
        yes_precision / yes_recall: Of the judge's 'yes' on retrieved candidates, the share that are planted false
            negatives; of the retrieved planted false negatives, the share called 'yes'.
    """

    queries: int
    judged: bool
    candidates: int = 0
    judged_yes: int = 0
    judged_no: int = 0
    negatives: int = 0
    queries_short: int = 0
    extra_positives: int = 0
    fn_planted: int | None = None
    fn_retrieved: int | None = None
    fn_caught: int | None = None
    fn_negative_judge: int | None = None
    fn_negative_rule: int | None = None
    yes_precision: float | None = None
    yes_recall: float | None = None
    shards: list[str] = field(default_factory=list)


@dataclass
class CurationSummary:
    """The result of :func:`curate` / :func:`write_curated` (also written as ``summary.json``)."""

    out_dir: str
    strategy: str
    n: int
    k: int
    seed: int
    queries: int
    skipped_datasets: list[str]
    datasets: dict[str, DatasetCurationStats]
    totals: dict[str, float | int | None]
    timing: dict[str, float]
    manifest: str
    shards: list[str]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------------ step 1
def _urls(shards) -> list[str]:
    return expand_urls(shards) if isinstance(shards, str | os.PathLike) else expand_urls([str(s) for s in shards])


def retrieve_candidates(embedder: Any, shards, cache_dir: str | os.PathLike, *, k: int = 20, batch_size: int = 32,
                        world_size: int = 1, rank: int = 0, part_timeout_s: float = 3600.0,
                        show_progress: bool | None = None) -> dict[str, Any] | None:
    """Top-``k`` retrieval per training query within its dataset, ground truth removed; cached in ``cache_dir``.

    Returns:
        On rank 0, ``{"fingerprint", "k", "queries": {dataset: [{"id", "candidate_ids", "ranks", "scores"}]}}``
        (also ``cache_dir/retrieval.json``); None on other ranks.
    """
    if k < 2:
        raise ValueError(f"k must be >= 2 (the ground truth is removed from the top k), got {k}")
    cache = Path(cache_dir)
    counter = SkipCounter("curation")
    datasets = collect_datasets(_urls(shards), counter)
    block_size = batch_size * BLOCK_BATCHES
    fingerprint = split_fingerprint(embedder, datasets, block_size, world_size) + f"/k={k}"
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
        keys = np.asarray([c.key for c in ds.corpus])
        lists = filter_ranked(ranked, np.asarray(ds.positive_index), corpus_keys=keys)
        rows = []
        for i, (dec, kept) in enumerate(zip(ds.samples, lists)):
            where = {int(c): j for j, c in enumerate(ranked[i])}
            rows.append({"id": dec.sample.id, "candidate_ids": [ds.corpus[int(c)].cid for c in kept],
                         "ranks": [where[int(c)] + 1 for c in kept],
                         "scores": [round(float(scores[i, where[int(c)]]), 6) for c in kept]})
        out[name] = rows
    result = {"fingerprint": fingerprint, "k": k, "queries": out}
    cache.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(result, sort_keys=True) + "\n")
    return result


# ------------------------------------------------------------------------------------------------------ step 2
def _judge_fingerprint(judge: Judge | None, retrieval_fp: str, skip: Sequence[str], instructions: dict) -> str:
    h = hashlib.sha1(f"{retrieval_fp}|{sorted(skip)}|{sorted(instructions.items())}".encode())
    if judge is not None:
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


def judge_candidates(judge: Judge | None, shards, cache_dir: str | os.PathLike, *,
                     skip_datasets: Sequence[str] = BINARY_LABEL_DATASETS, instructions: dict[str, str] | None = None,
                     batch_size: int = 8, reuse_prefix: bool = True, world_size: int = 1, rank: int = 0,
                     part_timeout_s: float = 3600.0, show_progress: bool | None = None) -> dict[str, dict] | None:
    """Judge every retrieved candidate of ``cache_dir/retrieval.json``; cached as ``cache_dir/judgments.jsonl``.

    ``judge=None`` records no logits (enough for ``strategy="rule"``) and leaves the cache alone. Returns, on rank 0,
    query id ->
    ``{"dataset", "judged", "yes": [...] | None, "no": [...] | None}``; None on other ranks.
    """
    cache = Path(cache_dir)
    instructions = dict(instructions or {})
    wait_for([cache / RETRIEVAL_FILE], part_timeout_s, lambda p: f"retrieval results {p} (rank 0's)", poll_s=2.0)
    retrieval = json.loads((cache / RETRIEVAL_FILE).read_text())
    if judge is None:  # rule-based curation without a judge: nothing to compute, and a shared cache is left intact
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
        if judge is not None and not _skipped(ds, skip_datasets):
            work += [(name, i) for i in range(len(ds.samples))]
    g_of = {w: g for g, w in enumerate(work)}
    mine = [w for g, w in enumerate(work) if g % world_size == rank]
    pairs: list[JudgePair] = []
    spans: dict[int, tuple[int, int]] = {}
    corpus_index = {name: {c.cid: c for c in ds.corpus} for name, ds in datasets.items()}
    for name, i in mine:
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
        spans[g_of[name, i]] = (start, len(pairs))
    scores = judge.score(pairs, batch_size=batch_size, reuse_prefix=reuse_prefix, show_progress=show_progress) \
        if pairs else None
    own = {g: torch.stack([scores.yes[a:b], scores.no[a:b]], 1) for g, (a, b) in spans.items()} if scores else {}
    if world_size > 1:
        parts = cache / "judge_parts"
        if rank != 0:
            write_part(parts, rank, world_size, fingerprint, own)
            return None
        own = gather_parts(parts, world_size, fingerprint, own, part_timeout_s)
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
    header = json.dumps({"fingerprint": fingerprint, "judge": judge is not None, "skip": list(skip_datasets)})
    write_atomic(path, header + "\n" + "".join(json.dumps(r, sort_keys=True) + "\n" for r in out.values()))
    return out


# ------------------------------------------------------------------------------------------------------ step 3
def decide(yes: Sequence[float] | None, no: Sequence[float] | None, count: int) -> list[str]:
    """Per candidate: ``"yes"`` if logit(yes) > logit(no), ``"no"`` otherwise; ``"unjudged"`` without logits."""
    if yes is None or no is None:
        return ["unjudged"] * count
    return ["yes" if y > n else "no" for y, n in zip(yes, no)]


def choose(candidate_ids: Sequence[str], decisions: Sequence[str], n: int, strategy: CurationStrategy
           ) -> tuple[list[str], list[str]]:
    """``(negatives, extra_positives)`` of one query, candidates in retrieval order.

    ``judge``: the first ``n`` candidates not judged relevant ('no', or 'unjudged' for skipped datasets) and every
    'yes'. ``rule``: the first ``n`` candidates, no extra positives.
    """
    if strategy == "rule":
        return list(candidate_ids[:n]), []
    negatives = [c for c, d in zip(candidate_ids, decisions) if d != "yes"][:n]
    return negatives, [c for c, d in zip(candidate_ids, decisions) if d == "yes"]


def _sides(ids: list[str], prefix: str, index: dict, images: dict) -> list[Side]:
    """Corpus candidates as schema sides, their images added to ``images`` as ``{prefix}{j}.png``."""
    out = []
    for j, cid in enumerate(ids):
        c = index[cid]
        member = f"{prefix}{j}.png" if c.image is not None else None
        out.append(Side(text=c.side.text, image=member, instruction=c.side.instruction, kind=c.side.kind, id=c.cid))
        if member is not None:
            images[member] = c.image
    return out


def _curated_samples(ds: DatasetCorpus, rows: list[dict[str, Any]]):
    index = {c.cid: c for c in ds.corpus}
    for dec, row in zip(ds.samples, rows):
        s = dec.sample
        images = {side.image: dec.images[side.image] for side in (s.query, s.positive) if side.image is not None}
        negatives = _sides(row["negative_ids"], "neg", index, images)
        extra = _sides(row["extra_positive_ids"], "xpos", index, images)
        meta = {**s.meta, "judge": {k: row[k] for k in ("strategy", "n", "negative_ranks")}}
        yield Sample(id=s.id, dataset=s.dataset, task=s.task, meta_task=s.meta_task, query=s.query,
                     positive=s.positive, negatives=negatives, meta=meta, extra_positives=extra), images


def _ratio(a: int | None, b: int | None) -> float | None:
    return None if a is None or not b else round(a / b, 4)


def write_curated(shards, retrieval: dict[str, Any], judgments: dict[str, dict], out_dir: str | os.PathLike, *,
                  n: int = 12, strategy: CurationStrategy = "judge", seed: int = 0, maxcount: int = 1000,
                  skipped_datasets: Sequence[str] = ()) -> CurationSummary:
    """Write curated shards, ``manifest.jsonl`` and ``summary.json`` for one ``n`` and strategy (cheap)."""
    if strategy not in ("judge", "rule"):
        raise ValueError(f"strategy must be 'judge' or 'rule', got {strategy!r}")
    if n < 0:
        raise ValueError(f"n (hard negatives per query) must be >= 0, got {n}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    datasets = collect_datasets(_urls(shards), SkipCounter("curation"))
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    stats: dict[str, DatasetCurationStats] = {}
    manifest_rows: list[dict[str, Any]] = []
    all_shards: list[str] = []
    for name, ds in datasets.items():
        rows_in = retrieval["queries"].get(name)
        if rows_in is None or len(rows_in) != len(ds.samples):
            raise ValueError(f"retrieval results do not match the shards for dataset {name!r}; rerun retrieval "
                             "(delete the cache folder's retrieval.json)")
        fn_meta = any("false_negative_ids" in d.sample.meta for d in ds.samples)
        st = DatasetCurationStats(queries=len(ds.samples), judged=False)
        fn = {"planted": 0, "retrieved": 0, "caught": 0, "neg_judge": 0, "neg_rule": 0}
        rows = []
        for dec, r in zip(ds.samples, rows_in):
            j = judgments.get(dec.sample.id, {})
            cids = r["candidate_ids"]
            decisions = decide(j.get("yes"), j.get("no"), len(cids))
            negs, xpos = choose(cids, decisions, n, strategy)
            st.judged |= bool(j.get("judged"))
            st.candidates += len(cids)
            st.judged_yes += decisions.count("yes")
            st.judged_no += decisions.count("no")
            st.negatives += len(negs)
            st.queries_short += len(negs) < n
            st.extra_positives += len(xpos)
            planted = set(dec.sample.meta.get("false_negative_ids") or ())
            judge_negs, _ = choose(cids, decisions, n, "judge")
            fn["planted"] += len(planted)
            fn["retrieved"] += sum(c in planted for c in cids)
            fn["caught"] += sum(c in planted and d == "yes" for c, d in zip(cids, decisions))
            fn["neg_judge"] += sum(c in planted for c in judge_negs)
            fn["neg_rule"] += sum(c in planted for c in cids[:n])
            rank_of = dict(zip(cids, r["ranks"]))
            rows.append({"id": dec.sample.id, "dataset": name, "strategy": strategy, "n": n,
                         "candidate_ids": cids, "ranks": r["ranks"], "scores": r["scores"],
                         "yes": j.get("yes"), "no": j.get("no"), "decisions": decisions,
                         "negative_ids": negs, "negative_ranks": [rank_of[c] for c in negs],
                         "extra_positive_ids": xpos,
                         "false_negative_ids": sorted(planted & set(cids))})
        if fn_meta:
            st.fn_planted, st.fn_retrieved, st.fn_caught = fn["planted"], fn["retrieved"], fn["caught"]
            st.fn_negative_judge, st.fn_negative_rule = fn["neg_judge"], fn["neg_rule"]
            if st.judged:
                st.yes_precision = _ratio(fn["caught"], st.judged_yes)
                st.yes_recall = _ratio(fn["caught"], fn["retrieved"])
        safe = name.translate(_UNSAFE_CHARS)
        for stale in shard_dir.glob(f"{safe}-[0-9]*.tar"):
            stale.unlink()
        st.shards = write_shards(_curated_samples(ds, rows), str(shard_dir / f"{safe}-%06d.tar"), maxcount=maxcount)
        all_shards += st.shards
        stats[name] = st
        manifest_rows += rows
    manifest = out / "manifest.jsonl"
    write_atomic(manifest, "".join(json.dumps(r, sort_keys=True) + "\n" for r in manifest_rows))

    def total(key: str) -> int | None:
        vals = [getattr(s, key) for s in stats.values() if getattr(s, key) is not None]
        return sum(vals) if vals else None

    totals: dict[str, float | int | None] = {key: total(key) for key in (
        "queries", "candidates", "judged_yes", "judged_no", "negatives", "extra_positives", "fn_planted",
        "fn_retrieved", "fn_caught", "fn_negative_judge", "fn_negative_rule")}
    judged_stats = [s for s in stats.values() if s.judged and s.fn_retrieved is not None]
    caught = sum(s.fn_caught or 0 for s in judged_stats)
    totals["yes_precision"] = _ratio(caught, sum(s.judged_yes for s in judged_stats))
    totals["yes_recall"] = _ratio(caught, sum(s.fn_retrieved or 0 for s in judged_stats))
    summary = CurationSummary(
        out_dir=str(out), strategy=strategy, n=n, k=int(retrieval["k"]), seed=seed,
        queries=sum(s.queries for s in stats.values()), skipped_datasets=list(skipped_datasets), datasets=stats,
        totals=totals, timing={"write_s": round(time.perf_counter() - t0, 3)}, manifest=str(manifest),
        shards=all_shards)
    write_atomic(out / "summary.json", json.dumps(summary.to_json(), indent=2, sort_keys=True) + "\n")
    return summary


# ------------------------------------------------------------------------------------------------------ entry
def curate(embedder: Any, judge: Judge | None, shards, out_dir: str | os.PathLike, *, k: int = 20,
           max_negatives: int = 12, strategy: CurationStrategy = "judge",
           skip_datasets: Sequence[str] = BINARY_LABEL_DATASETS, instructions: dict[str, str] | None = None,
           batch_size: int = 8, embed_batch_size: int = 32, reuse_prefix: bool = True, seed: int = 0,
           cache_dir: str | os.PathLike | None = None, maxcount: int = 1000, world_size: int = 1, rank: int = 0,
           part_timeout_s: float = 3600.0, show_progress: bool | None = None) -> CurationSummary | None:
    """Retrieve top-``k`` per training query, judge the candidates, write stage-3 shards with ``max_negatives``.

    Args:
        embedder: The stage-2 :class:`~mmembed.embedder.Embedder` (retrieval).
        judge: The :class:`~mmembed.judge.Judge`; may be None for ``strategy="rule"`` (no logits recorded, so the
            summary has no judge figures).
        shards: Training shards (directory, glob, brace pattern or list).
        out_dir: Output folder (``shards/``, ``manifest.jsonl``, ``summary.json``).
        k: Retrieval depth (the paper's K = 20, ground truth included).
        max_negatives: Hard negatives per query, ``n`` (Table 14: 12; Table 8 sweeps 0-20).
        strategy: ``"judge"`` (MLLM-curated negatives + extra positives) or ``"rule"`` (top-``n``).
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
    if strategy == "judge" and judge is None:
        raise ValueError("strategy='judge' needs a judge; pass Judge.from_pretrained(<folder>) or use strategy='rule'")
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
                            maxcount=maxcount, skipped_datasets=skipped)
    summary.timing.update({"retrieve_s": round(t1 - t0, 3), "judge_s": round(t2 - t1, 3),
                           "total_s": round(time.perf_counter() - t0, 3)})
    write_atomic(Path(out_dir) / "summary.json", json.dumps(summary.to_json(), indent=2, sort_keys=True) + "\n")
    t = summary.totals
    log.info("curation (%s, n=%d): %d queries; judge yes %s / no %s; planted false negatives caught %s, left as "
             "negatives: judge %s vs rule %s -> %s", strategy, max_negatives, summary.queries, t["judged_yes"],
             t["judged_no"], t["fn_caught"], t["fn_negative_judge"], t["fn_negative_rule"], out_dir)
    return summary
