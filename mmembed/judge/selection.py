"""Step 3 of stage-3 curation: choosing each query's negatives and writing the curated shards, manifest and summary.

Cheap and deterministic: it reads the cached retrieval (candidate ids, scores, the ground truth's score) and judgments
(yes/no logits) of :mod:`mmembed.judge.curate` and writes one ``n`` and one strategy -- ``judge`` (the judge's 'no'
candidates, 'yes' ones as extra positives), ``rule`` (the top ``n``, Table 8's baseline) or ``margin`` (the judge-free
control: candidates scoring within ``margin`` of the ground truth are dropped, the next ones kept). Whatever it writes,
the summary counts the planted false negatives (``meta["false_negative_ids"]``) each of the three would leave among
its ``n`` negatives.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from mmembed.data.reading import expand_urls
from mmembed.data.schema import Sample, Side
from mmembed.data.skips import SkipCounter
from mmembed.data.writing import write_atomic, write_shards
from mmembed.mining.corpus import DatasetCorpus, collect_datasets

CurationStrategy = Literal["judge", "rule", "margin"]
STRATEGIES = ("judge", "rule", "margin")
#: Default ``margin`` (delta) of ``strategy="margin"``, in retrieval-score units (cosine similarity).
DEFAULT_MARGIN = 0.01
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
        fn_negative_judge / fn_negative_rule / fn_negative_margin: Planted false negatives among the ``n`` negatives
            the judge strategy / the rule (top ``n``) / the margin control would choose, whichever strategy this run
            wrote (margin: None without the ground truth's score in the retrieval results).
        margin_dropped: Candidates within ``margin`` of (or above) the ground truth's score, summed over queries:
            what the margin control drops (compare ``judged_yes``, what the judge drops).
        yes_precision / yes_recall: Of the judge's 'yes' on retrieved candidates, the share that are planted false
            negatives; of the retrieved planted false negatives, the share called 'yes'. (``totals`` adds
            ``false_yes_rate``: 'yes' among the judged candidates that are not planted false negatives.)
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
    fn_negative_margin: int | None = None
    margin_dropped: int | None = None
    yes_precision: float | None = None
    yes_recall: float | None = None
    shards: list[str] = field(default_factory=list)


@dataclass
class CurationSummary:
    """The result of :func:`curate` / :func:`write_curated` (also written as ``summary.json``).

    ``judge`` names the judge whose answers are recorded ("simulated expert judge", "MLLM judge", None without one),
    ``judge_settings`` its settings; ``margin`` is the delta of the margin control (``fn_negative_margin``).
    """

    out_dir: str
    strategy: str
    n: int
    k: int
    seed: int
    judge: str | None
    judge_settings: dict[str, Any] | None
    margin: float
    queries: int
    skipped_datasets: list[str]
    datasets: dict[str, DatasetCurationStats]
    totals: dict[str, float | int | None]
    timing: dict[str, float]
    manifest: str
    shards: list[str]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _urls(shards) -> list[str]:
    return expand_urls(shards) if isinstance(shards, str | os.PathLike) else expand_urls([str(s) for s in shards])




# ------------------------------------------------------------------------------------------------------ step 3
def decide(yes: Sequence[float] | None, no: Sequence[float] | None, count: int) -> list[str]:
    """Per candidate: ``"yes"`` if logit(yes) > logit(no), ``"no"`` otherwise; ``"unjudged"`` without logits."""
    if yes is None or no is None:
        return ["unjudged"] * count
    return ["yes" if y > n else "no" for y, n in zip(yes, no)]


def within_margin(scores: Sequence[float], positive_score: float, margin: float) -> list[bool]:
    """Per candidate: is its retrieval score within ``margin`` of the ground truth's, or above it
    (``score >= positive_score - margin``)? Those are the likely false negatives the margin control drops."""
    return [s >= positive_score - margin for s in scores]


def choose(candidate_ids: Sequence[str], decisions: Sequence[str], n: int, strategy: CurationStrategy, *,
           scores: Sequence[float] | None = None, positive_score: float | None = None,
           margin: float = DEFAULT_MARGIN) -> tuple[list[str], list[str]]:
    """``(negatives, extra_positives)`` of one query, candidates in retrieval order.

    ``judge``: the first ``n`` candidates not judged relevant ('no', or 'unjudged' for skipped datasets) and every
    'yes'. ``rule``: the first ``n`` candidates, no extra positives. ``margin`` (the judge-free control): the first
    ``n`` candidates scoring below ``positive_score - margin`` (needs ``scores`` and ``positive_score``), no extra
    positives.
    """
    if strategy == "rule":
        return list(candidate_ids[:n]), []
    if strategy == "margin":
        if scores is None or positive_score is None:
            raise ValueError("strategy='margin' needs the candidates' scores and the ground truth's score; rerun "
                             "retrieval (delete the cache folder's retrieval.json)")
        near = within_margin(scores, positive_score, margin)
        return [c for c, drop in zip(candidate_ids, near) if not drop][:n], []
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
                  skipped_datasets: Sequence[str] = (), margin: float = DEFAULT_MARGIN, judge_label: str | None = None,
                  judge_settings: dict[str, Any] | None = None) -> CurationSummary:
    """Write curated shards, ``manifest.jsonl`` and ``summary.json`` for one ``n`` and strategy (cheap).

    ``judge_label`` / ``judge_settings`` name the judge that produced ``judgments`` (recorded in the summary and
    in every manifest row); ``margin`` is the delta of ``strategy="margin"`` (and of ``fn_negative_margin``).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if n < 0:
        raise ValueError(f"n (hard negatives per query) must be >= 0, got {n}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
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
        has_pos = all("positive_score" in r for r in rows_in)
        if strategy == "margin" and not has_pos:
            raise ValueError(f"retrieval results for dataset {name!r} have no positive_score (an older cache); rerun "
                             "retrieval (delete the cache folder's retrieval.json)")
        st = DatasetCurationStats(queries=len(ds.samples), judged=False, margin_dropped=0 if has_pos else None)
        fn = {"planted": 0, "retrieved": 0, "caught": 0, "neg_judge": 0, "neg_rule": 0, "neg_margin": 0}
        rows = []
        for dec, r in zip(ds.samples, rows_in):
            j = judgments.get(dec.sample.id, {})
            cids = r["candidate_ids"]
            decisions = decide(j.get("yes"), j.get("no"), len(cids))
            pos_score = r.get("positive_score")
            by_margin = dict(scores=r["scores"], positive_score=pos_score, margin=margin)
            negs, xpos = choose(cids, decisions, n, strategy, **by_margin)
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
            if has_pos:
                margin_negs, _ = choose(cids, decisions, n, "margin", **by_margin)
                fn["neg_margin"] += sum(c in planted for c in margin_negs)
                st.margin_dropped += sum(within_margin(r["scores"], pos_score, margin))
            rank_of = dict(zip(cids, r["ranks"]))
            rows.append({"id": dec.sample.id, "dataset": name, "strategy": strategy, "n": n, "judge": judge_label,
                         "candidate_ids": cids, "ranks": r["ranks"], "scores": r["scores"],
                         "positive_score": pos_score,
                         "yes": j.get("yes"), "no": j.get("no"), "decisions": decisions,
                         "negative_ids": negs, "negative_ranks": [rank_of[c] for c in negs],
                         "extra_positive_ids": xpos,
                         "false_negative_ids": sorted(planted & set(cids))})
        if fn_meta:
            st.fn_planted, st.fn_retrieved, st.fn_caught = fn["planted"], fn["retrieved"], fn["caught"]
            st.fn_negative_judge, st.fn_negative_rule = fn["neg_judge"], fn["neg_rule"]
            st.fn_negative_margin = fn["neg_margin"] if has_pos else None
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
        "fn_retrieved", "fn_caught", "fn_negative_judge", "fn_negative_rule", "fn_negative_margin",
        "margin_dropped")}
    judged_stats = [s for s in stats.values() if s.judged and s.fn_retrieved is not None]
    caught = sum(s.fn_caught or 0 for s in judged_stats)
    totals["yes_precision"] = _ratio(caught, sum(s.judged_yes for s in judged_stats))
    totals["yes_recall"] = _ratio(caught, sum(s.fn_retrieved or 0 for s in judged_stats))
    # 'yes' on the judged candidates that are not planted false negatives (what a simulated judge's false_yes_rate sets)
    totals["false_yes_rate"] = _ratio(sum(s.judged_yes for s in judged_stats) - caught,
                                      sum(s.judged_yes + s.judged_no - (s.fn_retrieved or 0) for s in judged_stats))
    summary = CurationSummary(
        out_dir=str(out), strategy=strategy, n=n, k=int(retrieval["k"]), seed=seed, judge=judge_label,
        judge_settings=judge_settings, margin=margin,
        queries=sum(s.queries for s in stats.values()), skipped_datasets=list(skipped_datasets), datasets=stats,
        totals=totals, timing={"write_s": round(time.perf_counter() - t0, 3)}, manifest=str(manifest),
        shards=all_shards)
    write_atomic(out / "summary.json", json.dumps(summary.to_json(), indent=2, sort_keys=True) + "\n")
    return summary
