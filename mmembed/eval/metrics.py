"""Retrieval metrics: MMEB Precision@1 over per-query candidates, VisDoc NDCG@k / Recall@k over a global corpus.

NDCG follows pytrec_eval / trec_eval as used by ViDoRe (through MTEB-style evaluators): **linear gain** (the
relevance grade itself, not 2^rel - 1), discount 1 / log2(rank + 1) with 1-based ranks, ideal DCG from *all*
judged relevant documents of the query, and queries without any relevant document left out of the mean
(pytrec_eval only reports queries that are in the qrels). Relevance <= 0 counts as non-relevant.

Why not ``torchmetrics.functional.retrieval.retrieval_normalized_dcg`` (1.9)? Its gain is linear too, and with
``ties="average"`` the numbers here are equal to it on every query that has a relevant document (the tests check
this). But it scores one query per call, gives 0 rather than "not counted" to queries without relevant documents,
and takes its ideal DCG from the candidates it is given, which is wrong for a run truncated to its top-k (see
:mod:`mmembed.eval.trec`). The vectorised version below keeps the (Nq, Nc) score matrix in one piece.

Ties. Exactly equal scores are rare with real embeddings but common with a collapsed or untrained model, and the
choice decides what such a model scores: ``ties="average"`` (default) is the expectation under a random order of
the tied items (sklearn / torchmetrics' tie-averaged DCG), so a constant scorer gets chance level; ``ties="index"``
orders tied items by column index, which for MMEB (ground truth at column 0) is VLM2Vec's ``argmax == 0`` rule and
gives a constant scorer a perfect score. trec_eval itself orders ties by document id, descending
(:func:`mmembed.eval.trec.evaluate_run` does the same).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

Ties = Literal["average", "index"]
Reduction = Literal["mean", "none"]


def _pad_ragged(scores: Tensor | Sequence[Tensor]) -> Tensor:
    """(Nq, Nc) matrix from per-query score vectors of different lengths, padded with -inf (never ties)."""
    if isinstance(scores, Tensor):
        if scores.ndim != 2:
            raise ValueError(f"scores must be (Nq, Nc); got {tuple(scores.shape)}")
        return scores.float()
    width = max(len(s) for s in scores)
    out = torch.full((len(scores), width), float("-inf"))
    for i, s in enumerate(scores):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.float32).cpu()
    return out


def precision_at_1(
    scores: Tensor | Sequence[Tensor],
    target: int | Tensor = 0,
    *,
    ties: Ties = "average",
    reduction: Reduction = "mean",
) -> Tensor:
    """MMEB's Precision@1 (= hit@1): is the ground-truth candidate ranked first among the query's own candidates?

    Args:
        scores: (Nq, Nc) scores, or one 1-D tensor per query when candidate counts differ.
        target: Index of the ground truth among each query's candidates (MMEB: 0, the first candidate); an int
            or an (Nq,) tensor.
        ties: ``"average"``: a ground truth tied with t - 1 others at the top counts 1/t. ``"index"``: ties go to
            the lower index (VLM2Vec's argmax).
        reduction: ``"mean"`` over queries or ``"none"`` for per-query values.

    Returns:
        Scalar (or (Nq,)) float tensor in [0, 1].
    """
    s = _pad_ragged(scores)
    nq, nc = s.shape
    tgt = torch.as_tensor(target, device=s.device).long().expand(nq)
    t = s.gather(1, tgt[:, None])
    above = (s > t).sum(dim=1)
    tied = s == t
    if ties == "average":
        hit = (above == 0).float() / tied.sum(dim=1).float()
    elif ties == "index":
        before = torch.arange(nc, device=s.device)[None, :] < tgt[:, None]
        hit = ((above == 0) & ~(tied & before).any(dim=1)).float()
    else:
        raise ValueError(f"ties must be 'average' or 'index', got {ties!r}")
    return hit.mean() if reduction == "mean" else hit


def _ranked_weighted_sum(scores: Tensor, values: Tensor, weights: Tensor, ties: Ties) -> Tensor:
    """sum_r weights[r] * value at rank r, per query; with ``"average"`` each tied group shares its mean value."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    ranked_values = values.gather(1, order)
    if ties == "index":
        return (ranked_values * weights).sum(dim=1)
    if ties != "average":
        raise ValueError(f"ties must be 'average' or 'index', got {ties!r}")
    nq, nc = scores.shape
    ranked_scores = scores.gather(1, order)
    starts = torch.ones_like(ranked_scores, dtype=torch.bool)
    starts[:, 1:] = ranked_scores[:, 1:] != ranked_scores[:, :-1]
    group = starts.long().cumsum(dim=1) - 1 + torch.arange(nq, device=scores.device)[:, None] * nc
    flat = group.reshape(-1)
    sums = torch.zeros(nq * nc, device=scores.device).index_add_(0, flat, ranked_values.reshape(-1))
    counts = torch.zeros(nq * nc, device=scores.device).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float))
    shared = (sums / counts.clamp(min=1))[flat].reshape(nq, nc)
    return (shared * weights).sum(dim=1)


def _check_pair(scores: Tensor, qrels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    if scores.ndim != 2 or qrels.shape != scores.shape:
        raise ValueError(f"scores and qrels must both be (Nq, Nc); got {tuple(scores.shape)} and {tuple(qrels.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return scores.float(), qrels.to(scores.device).float().clamp(min=0)


def _reduce_valid(values: Tensor, valid: Tensor, reduction: Reduction) -> Tensor:
    values = torch.where(valid, values, torch.full_like(values, float("nan")))
    if reduction == "none":
        return values
    return values[valid].mean() if valid.any() else values.new_tensor(float("nan"))


def dcg_discount(n: int, k: int, device: torch.device | str | None = None) -> Tensor:
    """(n,) weights 1 / log2(rank + 1) for 1-based ranks <= k, 0 beyond."""
    discount = 1.0 / torch.log2(torch.arange(n, device=device, dtype=torch.float32) + 2.0)
    discount[k:] = 0.0
    return discount


def ndcg_at_k(
    scores: Tensor,
    qrels: Tensor,
    k: int = 5,
    *,
    ties: Ties = "average",
    reduction: Reduction = "mean",
) -> Tensor:
    """NDCG@k with linear gain over a shared corpus (ViDoRe / VisRAG: NDCG@5).

    Args:
        scores: (Nq, Nc) query-corpus scores.
        qrels: (Nq, Nc) graded relevance (0 = not relevant).
        k: Cut-off.
        ties: See the module docstring.
        reduction: ``"mean"`` over queries with a relevant document, or ``"none"`` (NaN for the others).

    Returns:
        Scalar (or (Nq,)) float tensor.
    """
    scores, rel = _check_pair(scores, qrels, k)
    discount = dcg_discount(scores.shape[1], k, scores.device)
    dcg = _ranked_weighted_sum(scores, rel, discount, ties)
    ideal = (rel.sort(dim=1, descending=True).values * discount).sum(dim=1)
    valid = ideal > 0
    return _reduce_valid(dcg / ideal.clamp(min=1e-12), valid, reduction)


def recall_at_k(
    scores: Tensor,
    qrels: Tensor,
    k: int = 5,
    *,
    ties: Ties = "average",
    reduction: Reduction = "mean",
) -> Tensor:
    """Recall@k: fraction of a query's relevant documents ranked in its top k (trec_eval ``recall_k``).

    Args:
        scores: (Nq, Nc) query-corpus scores.
        qrels: (Nq, Nc) relevance; > 0 is relevant.
        k: Cut-off.
        ties: See the module docstring.
        reduction: ``"mean"`` over queries with a relevant document, or ``"none"`` (NaN for the others).

    Returns:
        Scalar (or (Nq,)) float tensor.
    """
    scores, rel = _check_pair(scores, qrels, k)
    relevant = (rel > 0).float()
    weights = torch.zeros(scores.shape[1], device=scores.device)
    weights[:k] = 1.0
    found = _ranked_weighted_sum(scores, relevant, weights, ties)
    total = relevant.sum(dim=1)
    return _reduce_valid(found / total.clamp(min=1), total > 0, reduction)


def ndcg_from_ranking(ranked_rels: Sequence[float], judged_rels: Sequence[float], k: int) -> float:
    """NDCG@k of one ranked list: gains of the retrieved documents in rank order, ideal from all judgments.

    Args:
        ranked_rels: Relevance of the retrieved documents, best first (0 for unjudged).
        judged_rels: Relevance of every judged document of the query (the ideal ranking is built from these).
        k: Cut-off.

    Returns:
        NDCG@k, or NaN when the query has no relevant document.
    """
    gains = torch.tensor([max(float(r), 0.0) for r in ranked_rels][:k], dtype=torch.float32)
    ideal_gains = torch.tensor(sorted((max(float(r), 0.0) for r in judged_rels), reverse=True)[:k])
    ideal = float((ideal_gains * dcg_discount(len(ideal_gains), k)).sum()) if len(ideal_gains) else 0.0
    if ideal <= 0:
        return float("nan")
    return float((gains * dcg_discount(len(gains), k)).sum()) / ideal


def hit_at_k(scores: Tensor, qrels: Tensor, k: int = 1, *, reduction: Reduction = "mean") -> Tensor:
    """Hit@k (the "Recall@k" of image-text retrieval, Table 5's R@1): is *any* relevant item in the top k?

    Differs from :func:`recall_at_k` when a query has several relevant items (image -> its 5 captions). Ties are
    counted in expectation over a random order of the tied items: with ``a`` non-relevant items strictly above the
    best relevant one and ``g`` non-relevant / ``r`` relevant items tied with it, the first relevant lands in the top
    k with probability ``1 - prod_{i<k-a} (g - i) / (g + r - i)``.

    Args:
        scores: (Nq, Nc) query-candidate scores.
        qrels: (Nq, Nc) relevance; > 0 is relevant.
        k: Cut-off.
        reduction: ``"mean"`` over queries with a relevant item, or ``"none"`` (NaN for the others).
    """
    scores, rel = _check_pair(scores, qrels, k)
    relevant = rel > 0
    best = scores.masked_fill(~relevant, float("-inf")).max(dim=1).values
    above = ((scores > best[:, None]) & ~relevant).sum(dim=1)
    g = ((scores == best[:, None]) & ~relevant).sum(dim=1)
    r = ((scores == best[:, None]) & relevant).sum(dim=1)
    hits = torch.zeros(scores.shape[0], device=scores.device)
    for q in range(scores.shape[0]):
        slots = k - int(above[q])
        if slots <= 0 or int(r[q]) == 0:
            continue
        miss = 1.0  # probability that the first `slots` tied items are all non-relevant
        for i in range(min(slots, int(g[q]) + 1)):  # past g non-relevant items the product is already 0
            miss *= (int(g[q]) - i) / (int(g[q]) + int(r[q]) - i)
        hits[q] = 1.0 - miss
    return _reduce_valid(hits, relevant.any(dim=1), reduction)
