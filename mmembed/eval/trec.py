"""TREC run and qrels files: write, read, and score them the way trec_eval / pytrec_eval do.

Run file, one line per retrieved document::

    qid Q0 docid rank score tag

Qrels file, one line per judged document::

    qid 0 docid rel

Ids must not contain whitespace. Scores are written with 9 significant digits (float32 round-trips exactly).
When scoring, the rank column is ignored, as in trec_eval: documents are ordered by score, descending, and equal
scores by document id, descending (trec_eval's rule), so re-scoring a file gives the numbers of the scores it holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from mmembed.eval.metrics import ndcg_from_ranking

Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]


def _check_id(value: str, what: str) -> str:
    value = str(value)
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"{what} {value!r} is empty or contains whitespace, which the TREC format cannot hold")
    return value


def scores_to_run(scores: Tensor, query_ids: Sequence[str], doc_ids: Sequence[str], k: int = 100) -> Run:
    """Top-``k`` documents per query of a (Nq, Nc) score matrix as a run dict ``{qid: {docid: score}}``."""
    if scores.shape != (len(query_ids), len(doc_ids)):
        raise ValueError(f"scores {tuple(scores.shape)} do not match {len(query_ids)} queries x {len(doc_ids)} docs")
    top = scores.float().topk(min(k, scores.shape[1]), dim=1)
    run: Run = {}
    for qi, qid in enumerate(query_ids):
        vals, idx = top.values[qi].tolist(), top.indices[qi].tolist()
        run[str(qid)] = {str(doc_ids[j]): v for j, v in zip(idx, vals)}
    return run


def _ordered(docs: Mapping[str, float]) -> list[tuple[str, float]]:
    # trec_eval: score descending, then docid descending. Two stable sorts give that order.
    items = sorted(docs.items(), key=lambda kv: kv[0], reverse=True)
    return sorted(items, key=lambda kv: kv[1], reverse=True)


def write_run(path: str | Path, run: Mapping[str, Mapping[str, float]], tag: str = "mmembed") -> Path:
    """Write a run dict ``{qid: {docid: score}}`` as a TREC run file (ranks 1..n in score order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = _check_id(tag, "tag")
    with path.open("w", encoding="utf-8") as f:
        for qid, docs in run.items():
            qid = _check_id(qid, "query id")
            for rank, (docid, score) in enumerate(_ordered(docs), start=1):
                f.write(f"{qid} Q0 {_check_id(docid, 'doc id')} {rank} {float(score):.9g} {tag}\n")
    return path


def read_run(path: str | Path) -> Run:
    """Read a TREC run file into ``{qid: {docid: score}}`` (the rank and tag columns are not kept)."""
    run: Run = {}
    with Path(path).open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 6:
                raise ValueError(f"{path}:{line_no}: expected 'qid Q0 docid rank score tag', got {line.rstrip()!r}")
            run.setdefault(parts[0], {})[parts[2]] = float(parts[4])
    return run


def write_qrels(path: str | Path, qrels: Mapping[str, Mapping[str, int]]) -> Path:
    """Write ``{qid: {docid: relevance}}`` as a TREC qrels file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for qid, docs in qrels.items():
            qid = _check_id(qid, "query id")
            for docid, rel in docs.items():
                f.write(f"{qid} 0 {_check_id(docid, 'doc id')} {int(rel)}\n")
    return path


def read_qrels(path: str | Path) -> Qrels:
    """Read a TREC qrels file into ``{qid: {docid: relevance}}``."""
    qrels: Qrels = {}
    with Path(path).open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 4:
                raise ValueError(f"{path}:{line_no}: expected 'qid 0 docid rel', got {line.rstrip()!r}")
            qrels.setdefault(parts[0], {})[parts[2]] = int(parts[3])
    return qrels


def evaluate_run(
    run: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Mean NDCG@k (linear gain) and Recall@k of a run, over the qrels queries that have a relevant document.

    A query judged in the qrels but absent from the run scores 0 (trec_eval ``-c``); the ideal DCG comes from the
    qrels, so a run truncated to its top-k is scored correctly.

    Args:
        run: ``{qid: {docid: score}}``.
        qrels: ``{qid: {docid: relevance}}``.
        ks: Cut-offs.

    Returns:
        ``{"ndcg@5": ..., "recall@5": ..., ...}`` for every k in ``ks``; NaN when no query has a relevant document.
    """
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("ndcg", "recall")}
    counted = 0
    for qid, judged in qrels.items():
        relevant = {d for d, r in judged.items() if r > 0}
        if not relevant:
            continue
        counted += 1
        ranked = [d for d, _ in _ordered(run.get(qid, {}))]
        rels = [judged.get(d, 0) for d in ranked]
        for k in ks:
            value = ndcg_from_ranking(rels, list(judged.values()), k)
            sums[f"ndcg@{k}"] += 0.0 if math.isnan(value) else value
            sums[f"recall@{k}"] += len(relevant.intersection(ranked[:k])) / len(relevant)
    if counted == 0:
        return {key: float("nan") for key in sums}
    return {key: total / counted for key, total in sums.items()}


def dense_qrels(
    qrels: Mapping[str, Mapping[str, int]],
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    *,
    strict: bool = True,
) -> Tensor:
    """(Nq, Nc) relevance matrix for :func:`mmembed.eval.metrics.ndcg_at_k` from a qrels dict.

    Args:
        qrels: ``{qid: {docid: relevance}}``.
        query_ids: Row order.
        doc_ids: Column order (the corpus).
        strict: Raise when a judged relevant document is not in ``doc_ids`` (dropping it would raise NDCG,
            because the ideal DCG would no longer count it).
    """
    col = {str(d): j for j, d in enumerate(doc_ids)}
    out = torch.zeros((len(query_ids), len(doc_ids)))
    missing = []
    for i, qid in enumerate(query_ids):
        for docid, rel in qrels.get(str(qid), {}).items():
            if docid in col:
                out[i, col[docid]] = float(rel)
            elif rel > 0:
                missing.append((qid, docid))
    if strict and missing:
        raise ValueError(f"{len(missing)} relevant (query, doc) pairs name docs outside the corpus, e.g. {missing[:3]}")
    return out
