"""Choosing hard negatives from ranked retrieval lists (§3.3 Global Hard Negative Mining; Table 8 rule-based).

Both samplers first *filter* each query's ranked list: they drop the ground-truth positive(s), any corpus index
listed as a known duplicate of them, and -- when ``corpus_keys`` is given (e.g. a content hash per corpus item) --
every corpus item whose key equals a positive's key (exact duplicates stored under another index). Ranks below
are 0-based positions in this filtered list, which is the list the paper's "positions 50-100" refers to.

Window larger than the list (chosen behaviour: clamp, with a warning). Small sub-datasets have fewer than 100
candidates, so an error would make mining unusable there. The window is scaled to the list length ``L``: it becomes
``[floor(start * L / end), L)``, which keeps its position relative to the list (it still skips the top, where the
false negatives are), widened downwards if fewer than ``n`` items remain. A list shorter than ``n`` is an error.
The warning also covers the other cause -- a search depth ``k`` below ``end`` plus the number of removed items --
and says to search deeper.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import numpy as np
from torch import Tensor

ArrayLike = Tensor | np.ndarray | Sequence


def _as_2d_int(ranked: ArrayLike) -> np.ndarray:
    arr = ranked.detach().cpu().numpy() if isinstance(ranked, Tensor) else np.asarray(ranked)
    if arr.ndim != 2:
        raise ValueError(f"ranked must be (Nq, K) corpus indices; got shape {arr.shape}")
    return arr.astype(np.int64, copy=False)


def _per_query_sets(values: ArrayLike | None, nq: int, name: str) -> list[set[int]]:
    """Positives / exclusions as one set of corpus indices per query (scalars or iterables per query)."""
    if values is None:
        return [set() for _ in range(nq)]
    if isinstance(values, Tensor):
        values = values.detach().cpu().tolist()
    elif isinstance(values, np.ndarray):
        values = values.tolist()
    if len(values) != nq:
        raise ValueError(f"{name} has {len(values)} entries for {nq} queries")
    out = []
    for v in values:
        if isinstance(v, Iterable) and not isinstance(v, (str, bytes)):
            out.append({int(x) for x in v})
        else:
            out.append({int(v)})
    return out


def filter_ranked(
    ranked: ArrayLike,
    positives: ArrayLike,
    *,
    exclude: Sequence[Iterable[int]] | None = None,
    corpus_keys: ArrayLike | None = None,
) -> list[np.ndarray]:
    """Each query's ranked list without its positive(s) and their duplicates (and without -1 padding).

    Args:
        ranked: (Nq, K) corpus indices, best first (e.g. from :func:`~mmembed.mining.search.topk_search`); -1
            entries (faiss padding) are dropped.
        positives: One corpus index per query, or an iterable of indices per query.
        exclude: Per query, further corpus indices known to duplicate the positive.
        corpus_keys: (Nc,) hashable key per corpus item; items sharing a key with a positive are dropped.

    Returns:
        One 1-D int64 array per query: the filtered ranking, in order.
    """
    arr = _as_2d_int(ranked)
    nq = arr.shape[0]
    pos_sets = _per_query_sets(positives, nq, "positives")
    excl_sets = _per_query_sets(exclude, nq, "exclude")
    keys = None
    if corpus_keys is not None:
        keys = corpus_keys.detach().cpu().numpy() if isinstance(corpus_keys, Tensor) else np.asarray(corpus_keys)
    out = []
    for i in range(nq):
        row = arr[i][arr[i] >= 0]
        drop = pos_sets[i] | excl_sets[i]
        keep = ~np.isin(row, np.fromiter(drop, dtype=np.int64, count=len(drop)))
        if keys is not None and pos_sets[i]:
            pos_keys = keys[np.fromiter(pos_sets[i], dtype=np.int64, count=len(pos_sets[i]))]
            keep &= ~np.isin(keys[row], pos_keys)
        out.append(row[keep])
    return out


def sample_window_negatives(
    ranked: ArrayLike,
    positives: ArrayLike,
    *,
    exclude: Sequence[Iterable[int]] | None = None,
    corpus_keys: ArrayLike | None = None,
    window: tuple[int, int] = (50, 100),
    n: int = 2,
    seed: int = 0,
    query_offset: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``n`` hard negatives per query uniformly from ranks ``[start, end)`` of the filtered ranking.

    The paper samples 2 negatives from positions 50-100 after removing the ground truth. Each query draws from its
    own generator seeded with ``(seed, query_offset + i)``, so the result for a query does not depend on how the
    queries were batched or sharded across processes (pass the shard's first global query index as
    ``query_offset``).

    Args:
        ranked: (Nq, K) corpus indices, best first.
        positives: Ground-truth corpus index per query (or several per query).
        exclude: Per-query corpus indices that duplicate the positive.
        corpus_keys: (Nc,) key per corpus item; items with a positive's key are removed (exact duplicates).
        window: ``(start, end)`` 0-based half-open rank window in the filtered list; the default (50, 100) is
            1-based positions 51-100, the paper's "positions 50-100".
        n: Negatives per query.
        seed: Base seed.
        query_offset: Global index of the first query (for sharded mining).

    Returns:
        ``(indices, ranks)``: (Nq, n) corpus indices of the negatives and their 0-based ranks in the filtered
        list, both int64, sorted by rank.

    Raises:
        ValueError: Bad window, or a filtered list shorter than ``n``.
    """
    start, end = window
    if not 0 <= start < end:
        raise ValueError(f"window must satisfy 0 <= start < end, got {window}")
    if n < 1 or n > end - start:
        raise ValueError(f"n must be in [1, end - start = {end - start}], got {n}")
    lists = filter_ranked(ranked, positives, exclude=exclude, corpus_keys=corpus_keys)
    indices = np.empty((len(lists), n), dtype=np.int64)
    ranks = np.empty((len(lists), n), dtype=np.int64)
    clamped, shortest = 0, None
    for i, row in enumerate(lists):
        length = len(row)
        lo, hi = start, end
        if length < end:
            if length < n:
                raise ValueError(
                    f"query {query_offset + i}: only {length} candidates left after removing the positive and its "
                    f"duplicates, fewer than n={n}"
                )
            lo, hi = (start * length) // end, length
            lo = min(lo, length - n)
            clamped += 1
            shortest = length if shortest is None else min(shortest, length)
        rng = np.random.default_rng((seed, query_offset + i))
        picked = np.sort(rng.choice(np.arange(lo, hi), size=n, replace=False))
        ranks[i] = picked
        indices[i] = row[picked]
    if clamped:
        warnings.warn(
            f"{clamped} of {len(lists)} queries had fewer than {end} candidates after filtering (shortest: "
            f"{shortest}); their window {window} was scaled to [start*L/end, L). If the corpus is larger than "
            f"that, search deeper (k >= {end} + number of positives and duplicates).",
            stacklevel=2,
        )
    return indices, ranks


def rule_based_negatives(
    ranked: ArrayLike,
    positives: ArrayLike,
    k: int,
    *,
    exclude: Sequence[Iterable[int]] | None = None,
    corpus_keys: ArrayLike | None = None,
) -> np.ndarray:
    """Table 8's rule-based baseline: the top-``k`` of the ranking once the ground truth is removed.

    Only the ground truth is removed by default -- the baseline keeps the false negatives that the MLLM judge
    would filter; ``exclude`` / ``corpus_keys`` remove known duplicates as in :func:`filter_ranked`.

    Args:
        ranked: (Nq, K) corpus indices, best first.
        positives: Ground-truth corpus index (or indices) per query.
        k: Negatives per query.
        exclude: Per-query corpus indices to drop as well.
        corpus_keys: (Nc,) key per corpus item; items with a positive's key are dropped.

    Returns:
        (Nq, k) int64 corpus indices, best first.

    Raises:
        ValueError: A query has fewer than ``k`` candidates left (search with a larger k).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    lists = filter_ranked(ranked, positives, exclude=exclude, corpus_keys=corpus_keys)
    out = np.empty((len(lists), k), dtype=np.int64)
    for i, row in enumerate(lists):
        if len(row) < k:
            raise ValueError(f"query {i}: {len(row)} candidates left after removing the positive; need k={k}")
        out[i] = row[:k]
    return out
