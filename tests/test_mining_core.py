"""Top-k search and negative sampling checked against an independent numpy brute force."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmembed.mining import filter_ranked, rule_based_negatives, sample_window_negatives, topk_search

NQ, NC, D = 23, 400, 16


@pytest.fixture(scope="module")
def world():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(NQ, D, generator=g), dim=-1)
    c = F.normalize(torch.randn(NC, D, generator=g), dim=-1)
    positives = torch.randint(0, NC, (NQ,), generator=g).numpy()
    # brute force: full ranking by numpy, independent of torch.topk
    full_rank = np.argsort(-(q.double().numpy() @ c.double().numpy().T), axis=1, kind="stable")
    return q, c, positives, full_rank


@pytest.mark.parametrize("corpus_chunk_size", [None, 64, 7])
def test_topk_matches_numpy_argsort(world, corpus_chunk_size):
    q, c, _, full_rank = world
    scores, idx = topk_search(q, c, 20, chunk_size=8, corpus_chunk_size=corpus_chunk_size)
    assert idx.shape == (NQ, 20) and idx.dtype == torch.long
    assert np.array_equal(idx.numpy(), full_rank[:, :20])
    assert torch.allclose(scores, (q @ c.T).gather(1, idx), atol=1e-6)
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())


def test_topk_clamps_k_to_corpus(world):
    q, c, _, full_rank = world
    _, idx = topk_search(q, c[:30], 100)
    assert idx.shape == (NQ, 30)
    with pytest.raises(ValueError, match="backend"):
        topk_search(q, c, 5, backend="annoy")


def test_faiss_backend_is_optional(world):
    q, c, _, full_rank = world
    if importlib.util.find_spec("faiss") is None:
        with pytest.raises(ImportError, match="faiss"):
            topk_search(q, c, 5, backend="faiss")
    else:
        _, idx = topk_search(q, c, 5, backend="faiss")
        assert np.array_equal(idx.numpy(), full_rank[:, :5])


def _brute_filtered(full_rank, positives, keys=None, exclude=None):
    out = []
    for i, row in enumerate(full_rank):
        drop = {int(positives[i])} | set(exclude[i] if exclude else ())
        kept = []
        for j in row:
            if int(j) in drop or (keys is not None and keys[j] == keys[positives[i]]):
                continue
            kept.append(int(j))
        out.append(kept)
    return out


def test_window_negatives_against_brute_force(world):
    q, c, positives, full_rank = world
    keys = np.arange(NC)
    # plant exact duplicates of each positive at the brute-force ranks 3 and 60 (same key as the positive)
    for i in range(NQ):
        for r in (3, 60):
            keys[full_rank[i, r]] = keys[positives[i]]
    _, ranked = topk_search(q, c, 150)
    neg, ranks = sample_window_negatives(ranked, positives, corpus_keys=keys, window=(50, 100), n=2, seed=11)
    assert neg.shape == ranks.shape == (NQ, 2)
    brute = _brute_filtered(full_rank, positives, keys=keys)
    for i in range(NQ):
        assert ranks[i, 0] < ranks[i, 1] and 50 <= ranks[i, 0] and ranks[i, 1] < 100
        assert [brute[i][r] for r in ranks[i]] == neg[i].tolist()
        assert positives[i] not in neg[i] and all(keys[j] != keys[positives[i]] for j in neg[i])


def test_window_sampling_is_seeded_and_shard_independent(world):
    q, c, positives, _ = world
    _, ranked = topk_search(q, c, 150)
    a = sample_window_negatives(ranked, positives, seed=3)
    b = sample_window_negatives(ranked, positives, seed=3)
    other = sample_window_negatives(ranked, positives, seed=4)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], other[1])
    shard = sample_window_negatives(ranked[10:], positives[10:], seed=3, query_offset=10)
    assert np.array_equal(shard[0], a[0][10:])


def test_small_corpus_window_is_scaled_with_warning(world):
    q, c, positives, _ = world
    small = c[:30]
    pos = np.minimum(positives, 29)
    _, ranked = topk_search(q, small, 100)
    with pytest.warns(UserWarning, match="scaled"):
        neg, ranks = sample_window_negatives(ranked, pos, window=(50, 100), n=2)
    # L = 29 after removing the positive: window [floor(50 * 29 / 100), 29) = [14, 29)
    assert ranks.min() >= 14 and ranks.max() < 29
    assert not (neg == pos[:, None]).any()
    with pytest.raises(ValueError, match="fewer than n"):
        sample_window_negatives(np.array([[5, 6]]), [5], n=2)  # one candidate left after removing the positive


def test_rule_based_is_top_k_minus_ground_truth(world):
    q, c, positives, full_rank = world
    _, ranked = topk_search(q, c, 40)
    # make the positive the top hit of half the queries so that removal matters
    pos = positives.copy()
    pos[::2] = full_rank[::2, 0]
    got = rule_based_negatives(ranked, pos, 12)
    brute = _brute_filtered(full_rank, pos)
    assert got.tolist() == [row[:12] for row in brute]
    with pytest.raises(ValueError, match="need k"):
        rule_based_negatives(ranked[:, :5], pos, 12)


def test_filter_ranked_exclude_and_multiple_positives():
    ranked = np.array([[4, 1, 7, 2, -1]])
    assert filter_ranked(ranked, [[4, 7]], exclude=[{2}])[0].tolist() == [1]
