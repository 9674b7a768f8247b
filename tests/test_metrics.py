"""Retrieval metrics on hand-computed examples, cross-checked with torchmetrics, and TREC file round trips."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.functional.retrieval import retrieval_normalized_dcg

from mmembed.eval.metrics import ndcg_at_k, ndcg_from_ranking, precision_at_1, recall_at_k
from mmembed.eval.trec import (
    dense_qrels,
    evaluate_run,
    read_qrels,
    read_run,
    scores_to_run,
    write_qrels,
    write_run,
)


def test_precision_at_1_by_hand():
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.5],  # ground truth (column 0) on top: 1
            [0.2, 0.8, 0.1],  # beaten: 0
            [0.5, 0.5, 0.1],  # tied with one other: 1/2 on average, 1 by index
            [0.3, 0.3, 0.3],  # constant scorer: 1/3 on average, 1 by index (VLM2Vec's argmax)
        ]
    )
    assert precision_at_1(scores).item() == pytest.approx((1 + 0 + 0.5 + 1 / 3) / 4)
    assert precision_at_1(scores, ties="index").item() == pytest.approx(0.75)
    assert precision_at_1(scores, reduction="none").tolist() == pytest.approx([1, 0, 0.5, 1 / 3])
    # ragged candidate lists and a per-query target
    ragged = [torch.tensor([0.1, 0.9]), torch.tensor([0.7, 0.2, 0.3])]
    assert precision_at_1(ragged, target=torch.tensor([1, 0])).item() == 1.0
    assert precision_at_1(ragged).item() == 0.5


# One query, six documents already in score order; graded qrels 2 at rank 2, 1 at ranks 4 and 6.
SCORES = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
QRELS = torch.tensor([[0, 2, 0, 1, 0, 1]])


def test_ndcg_at_5_linear_gain_by_hand():
    # DCG@5  = 2/log2(3) + 1/log2(5)                = 1.2618595 + 0.4306766 = 1.6925361
    # IDCG@5 = 2/log2(2) + 1/log2(3) + 1/log2(4)    = 2 + 0.6309298 + 0.5    = 3.1309298
    # NDCG@5 = 0.5405850   (exponential gain 2^rel - 1 would give 0.5625...)
    got = ndcg_at_k(SCORES, QRELS, k=5).item()
    assert got == pytest.approx(0.5405850, abs=1e-6)
    assert got != pytest.approx((3 / math.log2(3) + 1 / math.log2(5)) / (3 + 1 / math.log2(3) + 0.5), abs=1e-3)
    # NDCG@1: top document not relevant
    assert ndcg_at_k(SCORES, QRELS, k=1).item() == 0.0


def test_recall_at_k_by_hand():
    assert recall_at_k(SCORES, QRELS, k=2).item() == pytest.approx(1 / 3)  # one of three relevant in top 2
    assert recall_at_k(SCORES, QRELS, k=5).item() == pytest.approx(2 / 3)
    assert recall_at_k(SCORES, QRELS, k=6).item() == pytest.approx(1.0)


def test_queries_without_relevant_documents_are_not_counted():
    scores = torch.cat([SCORES, SCORES])
    qrels = torch.cat([QRELS, torch.zeros_like(QRELS)])
    assert ndcg_at_k(scores, qrels).item() == pytest.approx(0.5405850, abs=1e-6)
    per_query = ndcg_at_k(scores, qrels, reduction="none")
    assert per_query[0].item() == pytest.approx(0.5405850, abs=1e-6) and math.isnan(per_query[1].item())


def test_ties_average_or_by_index():
    scores = torch.zeros(1, 4)  # a constant scorer
    qrels = torch.tensor([[0, 0, 1, 0]])
    # average: every rank holds relevance 1/4 -> (1 + 1/log2 3 + 1/2 + 1/log2 5) / 4 = 0.6404016
    assert ndcg_at_k(scores, qrels).item() == pytest.approx(0.6404016, abs=1e-6)
    # by index: relevant document at rank 3 -> 1/log2(4) = 0.5
    assert ndcg_at_k(scores, qrels, ties="index").item() == pytest.approx(0.5)
    assert recall_at_k(scores, qrels, k=2).item() == pytest.approx(0.5)
    assert recall_at_k(scores, qrels, k=2, ties="index").item() == 0.0


@pytest.mark.parametrize("tied", [False, True])
def test_ndcg_equals_torchmetrics_per_query(tied):
    g = torch.Generator().manual_seed(0)
    nq, nc = 12, 30
    scores = torch.randint(0, 4, (nq, nc), generator=g).float() if tied else torch.randn(nq, nc, generator=g)
    qrels = torch.randint(0, 3, (nq, nc), generator=g) * (torch.rand(nq, nc, generator=g) < 0.2)
    qrels[:, 0] = 1  # every query has a relevant document
    ours = ndcg_at_k(scores, qrels, k=5, reduction="none")
    theirs = torch.stack([retrieval_normalized_dcg(scores[i], qrels[i], top_k=5) for i in range(nq)])
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_ndcg_from_ranking_by_hand():
    assert ndcg_from_ranking([0, 2, 0, 1, 0], [2, 1, 1], k=5) == pytest.approx(0.5405850, abs=1e-6)
    assert math.isnan(ndcg_from_ranking([0, 0], [0], k=5))


def test_trec_files_round_trip_and_rescore(tmp_path):
    g = torch.Generator().manual_seed(1)
    nq, nc = 9, 150
    scores = torch.randn(nq, nc, generator=g)
    qids, dids = [f"q{i}" for i in range(nq)], [f"doc-{j}" for j in range(nc)]
    qrels = {
        qid: {dids[j]: int(r) for j, r in enumerate(row) if r > 0}
        for qid, row in zip(qids, torch.randint(0, 3, (nq, nc), generator=g) * (torch.rand(nq, nc, generator=g) < 0.05))
    }
    qrels["q0"] = {"doc-3": 1}
    # the run keeps only the top 100: relevant documents below it must still count in the ideal DCG
    run = scores_to_run(scores, qids, dids, k=100)
    run_path = write_run(tmp_path / "run.trec", run, tag="test")
    qrels_path = write_qrels(tmp_path / "qrels.trec", qrels)

    first = run_path.read_text().splitlines()[0].split()
    assert first[1] == "Q0" and first[3] == "1" and first[5] == "test"
    assert read_qrels(qrels_path) == {q: d for q, d in qrels.items() if d}
    back = read_run(run_path)
    assert back.keys() == run.keys() and all(back[q][d] == pytest.approx(s) for q in run for d, s in run[q].items())

    rescored = evaluate_run(back, read_qrels(qrels_path), ks=(1, 5, 10))
    dense = dense_qrels(qrels, qids, dids)
    for k in (1, 5, 10):
        assert rescored[f"ndcg@{k}"] == pytest.approx(ndcg_at_k(scores, dense, k=k).item(), abs=1e-6)
        assert rescored[f"recall@{k}"] == pytest.approx(recall_at_k(scores, dense, k=k).item(), abs=1e-6)


def test_trec_scoring_ignores_rank_column_and_breaks_ties_by_docid(tmp_path):
    path = tmp_path / "run.trec"
    # rank column deliberately wrong; scoring must re-sort by score
    path.write_text("q1 Q0 a 1 0.1 x\nq1 Q0 b 2 0.9 x\nq2 Q0 a 1 1.0 x\nq2 Q0 b 2 1.0 x\n")
    qrels = {"q1": {"b": 1}, "q2": {"a": 1}}
    result = evaluate_run(read_run(path), qrels, ks=(1,))
    # q1: b (0.9) first -> 1. q2: tie, trec_eval puts docid "b" before "a" -> 0.
    assert result["ndcg@1"] == pytest.approx(0.5)
    # a judged query missing from the run scores 0
    assert evaluate_run({}, qrels, ks=(1,))["recall@1"] == 0.0


def test_dense_qrels_refuses_relevant_docs_outside_corpus():
    with pytest.raises(ValueError, match="outside the corpus"):
        dense_qrels({"q": {"missing": 1}}, ["q"], ["d0"])
