"""Top-k inner-product search over a corpus of embeddings (the "retrieve a ranked list" step of §3.3).

Embeddings are L2-normalised, so inner product is cosine similarity. The exact backend is a chunked matmul with a
running top-k merge: memory is O(query_chunk x (k + corpus_chunk)) whatever the corpus size, and on a GPU it is
fast enough for the per-sub-dataset corpora of the paper. ``backend="faiss"`` uses an exact ``IndexFlatIP`` when
faiss is installed (imported only then).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor


def topk_search(
    queries: Tensor,
    corpus: Tensor,
    k: int,
    *,
    chunk_size: int = 1024,
    corpus_chunk_size: int | None = None,
    backend: Literal["exact", "faiss"] = "exact",
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Scores and indices of the ``k`` corpus items with the largest inner product, per query, best first.

    Args:
        queries: (Nq, D) query embeddings.
        corpus: (Nc, D) corpus embeddings (may live on the CPU; chunks are moved to ``device``).
        k: Number of results; clamped to Nc (a corpus smaller than k returns the whole ranked corpus).
        chunk_size: Queries per matmul.
        corpus_chunk_size: Corpus rows per matmul; ``None`` scores the whole corpus at once.
        backend: ``"exact"`` (torch) or ``"faiss"`` (exact flat index; requires the faiss package).
        device: Where to compute; default the queries' device.

    Returns:
        ``(scores, indices)``, both (Nq, min(k, Nc)), float32 and int64, on the compute device (faiss: CPU).
        Exactly equal scores are ordered arbitrarily.
    """
    if queries.ndim != 2 or corpus.ndim != 2 or queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"queries (Nq, D) and corpus (Nc, D) must share D; got {queries.shape} and {corpus.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if chunk_size < 1 or (corpus_chunk_size is not None and corpus_chunk_size < 1):
        raise ValueError("chunk sizes must be >= 1")
    k = min(k, corpus.shape[0])
    if backend == "faiss":
        return _faiss_search(queries, corpus, k)
    if backend != "exact":
        raise ValueError(f"backend must be 'exact' or 'faiss', got {backend!r}")

    device = torch.device(device) if device is not None else queries.device
    c_step = corpus_chunk_size or corpus.shape[0]
    # Whole corpus on the device once when it fits in a single chunk; otherwise move chunk by chunk.
    corpus_chunks = [corpus[i : i + c_step].to(device, torch.float32) for i in range(0, corpus.shape[0], c_step)]
    all_scores, all_indices = [], []
    for q0 in range(0, queries.shape[0], chunk_size):
        q = queries[q0 : q0 + chunk_size].to(device, torch.float32)
        best_s = torch.empty((q.shape[0], 0), device=device)
        best_i = torch.empty((q.shape[0], 0), dtype=torch.long, device=device)
        offset = 0
        for c in corpus_chunks:
            s = q @ c.T
            top_s, top_i = s.topk(min(k, s.shape[1]), dim=1)
            merged_s = torch.cat([best_s, top_s], dim=1)
            merged_i = torch.cat([best_i, top_i + offset], dim=1)
            best_s, order = merged_s.topk(min(k, merged_s.shape[1]), dim=1)
            best_i = merged_i.gather(1, order)
            offset += c.shape[0]
        all_scores.append(best_s)
        all_indices.append(best_i)
    return torch.cat(all_scores), torch.cat(all_indices)


def _faiss_search(queries: Tensor, corpus: Tensor, k: int) -> tuple[Tensor, Tensor]:
    try:
        import faiss  # optional dependency: imported only when this backend is asked for
    except ImportError as err:
        raise ImportError(
            "backend='faiss' needs the faiss package (pip install faiss-cpu, or faiss-gpu); "
            "or use backend='exact', which gives the same results"
        ) from err
    c = np.ascontiguousarray(corpus.detach().to("cpu", torch.float32).numpy())
    q = np.ascontiguousarray(queries.detach().to("cpu", torch.float32).numpy())
    index = faiss.IndexFlatIP(c.shape[1])
    index.add(c)
    scores, indices = index.search(q, k)
    return torch.from_numpy(scores), torch.from_numpy(indices.astype(np.int64))
