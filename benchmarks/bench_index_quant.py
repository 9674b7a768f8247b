"""Matryoshka truncation x int8 / binary codes: quality, bytes per vector and search time of ``mmembed.index``.

Every cell is a real :class:`mmembed.index.Index` (``truncate_dim``, ``precision``, ``rescore``) searched the way
``mmembed-index search`` does. Two parts, one table each:

1. **Clustered vectors** (``--n`` unit vectors of ``--dim`` around ``--clusters`` centres, as in
   ``bench_index_recall``; held-out queries of the same clusters). Quality = recall@10 against exact float search at
   the full dimension (what a user loses overall) and against exact float search at the same dimension (what the
   codes alone lose). These vectors have no Matryoshka structure: truncating them shows the index at work, not a
   model's quality.
2. **A trained model on the synthetic world** (``--model NAME=FOLDER``, repeatable, ``--mmeb`` the world's
   ``eval/mmeb`` folder): (a) the kit's MMEB score (``evaluate_mmeb``: Precision@1 over each query's own
   candidates, mean over the subsets) with embeddings truncated to each dimension; (b) the retrieval subsets'
   candidates pooled into one corpus (de-duplicated), indexed at each dimension x precision, and recall@10 of each
   query's ground-truth candidate. Models are encoded once at full dimension; truncation is applied afterwards
   (the same numbers as ``Embedder.encode(truncate_dim=...)``, tested).

Times are milliseconds per query: the median of 3 batched ``Index.search`` calls over all queries (after a warm-up
search) with ``--threads`` faiss threads.
Bytes per vector count the searched code (``Index.bytes_per_vector``); re-scoring reads only the candidates' rows of
the memory-mapped float ``vectors.npy``.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_index_quant                                 # 20k x 896 clustered vectors
    .venv/bin/python -m benchmarks.bench_index_quant --n 2000 --dim 64 --dims 16,32   # smoke size
    .venv/bin/python -m benchmarks.bench_index_quant --skip-vectors --dims 16,32 \\
        --model matryoshka=RUN_A/embedder --model plain=RUN_B/embedder --mmeb ROOT/data/synth_small_s0/eval/mmeb
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

PRECISIONS = ("float32", "int8", "binary")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, default=20_000, help="clustered corpus vectors")
    p.add_argument("--dim", type=int, default=896, help="their dimension (InternVL3-1B's hidden size)")
    p.add_argument("--clusters", type=int, default=200)
    p.add_argument("--spread", type=float, default=1.0, help="within-cluster noise scale")
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--dims", default="64,128,256", help="truncated dimensions (the full one is always added)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--rescore", type=int, default=4, help="int8 / binary: re-score rescore*k candidates")
    p.add_argument("--threads", type=int, default=1, help="faiss OpenMP threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-vectors", action="store_true", help="only the model part")
    p.add_argument("--model", action="append", default=[], metavar="NAME=FOLDER", help="trained model(s)")
    p.add_argument("--mmeb", default=None, help="MMEB-format folder (the synthetic world's eval/mmeb)")
    args = p.parse_args(argv)
    try:
        args.dims = sorted({int(d) for d in args.dims.split(",") if d.strip()})
    except ValueError:
        raise SystemExit(f"--dims must be comma-separated integers, got {args.dims!r}") from None
    if args.model and not args.mmeb:
        raise SystemExit("--model needs --mmeb (the synthetic world's eval/mmeb folder)")
    for m in args.model:
        if "=" not in m:
            raise SystemExit(f"--model takes NAME=FOLDER, got {m!r}")
    return args


def _settings(dims: list[int], full: int, rescore: int) -> list[tuple[int, str, int]]:
    """(dim, precision, rescore) cells: every dim x precision, plus binary without re-scoring for contrast."""
    cells = []
    for d in [*[d for d in dims if d < full], full]:
        for prec in PRECISIONS:
            if prec == "binary" and d % 8:
                continue
            cells.append((d, prec, 0 if prec == "float32" else rescore))
            if prec == "binary" and rescore:
                cells.append((d, prec, 0))
    return cells


def _index(vectors: np.ndarray, ids: list[str], dim: int, precision: str, rescore: int):
    from mmembed.index import Index

    full = vectors.shape[1]
    return Index.build(vectors, ids, truncate_dim=dim if dim < full else None, precision=precision, rescore=rescore)


def _timed_search(index, queries: np.ndarray, k: int, repeats: int = 3) -> tuple[np.ndarray, float]:
    """Indices of one batched search, and its median time per query over ``repeats`` (after a warm-up search,
    which builds the lazy exact faiss structure of a float index)."""
    index.search(queries[:1], k)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = index.search(queries, k)  # full-dimension queries: the index cuts them like its vectors
        times.append(time.perf_counter() - t0)
    return res.indices, 1000 * float(np.median(times)) / len(queries)


def _recall(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean([len(set(a[a >= 0]) & set(b[b >= 0])) / max(1, int((b >= 0).sum()))
                          for a, b in zip(got, ref)]))


def vectors_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    from benchmarks.bench_index_recall import clustered_corpus
    from mmembed.matryoshka import truncate_embeddings

    corpus, queries, ids = clustered_corpus(args)
    print(f"\n== clustered vectors: {args.n} x {args.dim}, {args.clusters} clusters, {args.queries} queries, "
          f"k={args.k}, faiss threads {args.threads}")
    ref_full, _ = _timed_search(_index(corpus, ids, args.dim, "float32", 0), queries, args.k)
    refs: dict[int, np.ndarray] = {args.dim: ref_full}
    rows = []
    print(f"{'dim':>5} {'precision':>9} {'rescore':>7} {'bytes/vec':>9} {'recall@k vs full':>16} "
          f"{'vs same dim':>11} {'ms/query':>8}")
    for dim, prec, rescore in _settings(args.dims, args.dim, args.rescore):
        if dim not in refs:
            cut = truncate_embeddings(corpus, dim)
            refs[dim], _ = _timed_search(_index(cut, ids, dim, "float32", 0), truncate_embeddings(queries, dim), args.k)
        index = _index(corpus, ids, dim, prec, rescore)
        got, ms = _timed_search(index, queries, args.k)
        row = {"dim": dim, "precision": prec, "rescore": rescore, "bytes": index.bytes_per_vector,
               "recall_full": _recall(got, ref_full), "recall_same_dim": _recall(got, refs[dim]), "ms": ms}
        rows.append(row)
        print(f"{dim:>5} {prec:>9} {rescore:>7} {row['bytes']:>9} {row['recall_full']:>16.4f} "
              f"{row['recall_same_dim']:>11.4f} {ms:>8.3f}")
    return rows


class _Truncated:
    """An ``Encoder`` for the eval runners: the cached full-dimension embeddings, truncated and re-normalised."""

    def __init__(self, cached: Any, dim: int | None) -> None:
        self.cached, self.dim = cached, dim

    def encode(self, items, role="query", batch_size=16, show_progress=None):
        from mmembed.matryoshka import truncate_embeddings

        return truncate_embeddings(self.cached.encode(items, role=role, batch_size=batch_size,
                                                      show_progress=show_progress), self.dim)


def _pooled_retrieval(cached: Any, mmeb: Path) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """The retrieval subsets' candidates as one de-duplicated corpus; each row's query and ground-truth row."""
    from mmembed.data.evalsets import load_mmeb_suite

    pool: dict[tuple, int] = {}
    corpus, queries, gts = [], [], []
    for subset in load_mmeb_suite(mmeb).values():
        if subset.meta_task != "retrieval":
            continue
        local = []
        for item in subset.candidates:
            key = cached.key(item, "candidate")
            if key not in pool:
                pool[key] = len(corpus)
                corpus.append(item)
            local.append(pool[key])
        for row in subset.rows:
            queries.append(subset.queries[row.query])
            gts.append(local[row.candidates[0]])
    c = cached.encode(corpus, role="candidate").numpy()
    q = cached.encode(queries, role="query").numpy()
    return c, [str(i) for i in range(len(corpus))], q, np.asarray(gts)


def model_part(args: argparse.Namespace, name: str, folder: str) -> list[dict[str, Any]]:
    from mmembed.embedder import Embedder
    from mmembed.eval.mmeb import evaluate_mmeb
    from mmembed.eval.results import CachedEncoder

    embedder = Embedder.from_pretrained(folder, device="cpu")
    full = embedder.embed_dim
    cached = CachedEncoder(embedder)
    mmeb = Path(args.mmeb)
    scores = {d: evaluate_mmeb(_Truncated(cached, d if d < full else None), mmeb).overall
              for d in [*[d for d in args.dims if d < full], full]}
    corpus, ids, queries, gts = _pooled_retrieval(cached, mmeb)
    print(f"\n== model {name} ({folder}, {full}-d): MMEB overall P@1 per dimension, and the {len(ids)} pooled "
          f"retrieval candidates indexed ({len(queries)} queries, recall@{args.k} of the ground truth)")
    print(f"{'dim':>5} {'precision':>9} {'rescore':>7} {'bytes/vec':>9} {'MMEB P@1':>8} {'recall@k':>8} "
          f"{'ms/query':>8}")
    rows = []
    for dim, prec, rescore in _settings(args.dims, full, args.rescore):
        got, ms = _timed_search(_index(corpus, ids, dim, prec, rescore), queries, args.k)
        recall = float(np.mean([gt in row for gt, row in zip(gts, got)]))
        bytes_ = {"float32": 4 * dim, "int8": dim, "binary": dim // 8}[prec]
        row = {"model": name, "dim": dim, "precision": prec, "rescore": rescore, "bytes": bytes_,
               "mmeb": scores[dim], "recall": recall, "ms": ms}
        rows.append(row)
        mm = f"{scores[dim]:8.2f}" if prec == "float32" else f"{'':>8}"  # MMEB scoring is float, per dimension
        print(f"{dim:>5} {prec:>9} {rescore:>7} {bytes_:>9} {mm} {100 * recall:>8.2f} {ms:>8.3f}")
    return rows


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Print the tables; return their rows (``vectors`` and one list per model)."""
    import torch

    from mmembed.index.core import import_faiss

    args = parse_args(argv)
    import_faiss().omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    out: dict[str, list[dict[str, Any]]] = {}
    if not args.skip_vectors:
        out["vectors"] = vectors_part(args)
    for spec in args.model:
        name, folder = spec.split("=", 1)
        out[name] = model_part(args, name, folder)
    return out


if __name__ == "__main__":
    main()
