"""Recall@10 of the approximate indexes (FAISS IVF, HNSW) against exact search, with build and query times.

The vectors are synthetic: ``--n`` unit vectors of dimension ``--dim`` (896 = InternVL3-1B's hidden size) drawn
around ``--clusters`` random centres, so the corpus has the clumpy structure embeddings have; the queries are
held-out points of the same clusters. Every query's exact top 10 (``Index.search(..., exact=True)``) is the
reference; recall@10 is the mean fraction of it each approximate index returns. One line per setting, then a
``RECALL`` line per kind at its default parameters (the ones ``mmembed-index build`` uses).

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_index_recall                        # 20k x 896, 500 queries
    .venv/bin/python -m benchmarks.bench_index_recall --n 3000 --dim 64      # smoke size
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, default=20_000, help="corpus vectors")
    p.add_argument("--dim", type=int, default=896, help="vector dimension")
    p.add_argument("--clusters", type=int, default=200, help="cluster centres the vectors are drawn around")
    p.add_argument("--spread", type=float, default=1.0, help="within-cluster noise scale (per dimension x sqrt(D))")
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="faiss OpenMP threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.n < 100 or args.queries < 1 or args.k < 1:
        raise SystemExit("--n must be >= 100, --queries and --k >= 1")
    return args


def clustered(rng: np.random.Generator, n: int, centres: np.ndarray, spread: float) -> np.ndarray:
    d = centres.shape[1]
    x = centres[rng.integers(0, len(centres), n)] + spread / np.sqrt(d) * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered_corpus(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(corpus, queries, ids)``: ``args.n`` corpus and ``args.queries`` query vectors drawn around ``args.clusters``
    random unit centres of dimension ``args.dim`` (seed ``args.seed``), the vectors both index benchmarks search."""
    rng = np.random.default_rng(args.seed)
    centres = rng.normal(size=(args.clusters, args.dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    corpus = clustered(rng, args.n, centres, args.spread)
    queries = clustered(rng, args.queries, centres, args.spread)
    return corpus, queries, [str(i) for i in range(args.n)]


def main(argv: list[str] | None = None) -> dict:
    """Build exact, IVF and HNSW indexes on the same vectors and print recall@k and timings."""
    from mmembed.index import Index
    from mmembed.index.core import import_faiss

    args = parse_args(argv)
    import_faiss().omp_set_num_threads(args.threads)
    corpus, queries, ids = clustered_corpus(args)
    print(f"corpus {args.n} x {args.dim} (synthetic, {args.clusters} clusters), {args.queries} queries, "
          f"faiss threads {args.threads}")

    t0 = time.perf_counter()
    flat = Index.build(corpus, ids)
    exact = flat.search(queries, args.k)
    t_exact = time.perf_counter() - t0
    print(f"exact (flat): {1000 * t_exact / args.queries:.3f} ms/query (incl. building)")

    out: dict = {}
    settings = {"ivf": ("nprobe", [1, 4, 16, 64]), "hnsw": ("ef_search", [16, 64, 128, 256])}
    for kind, (knob, values) in settings.items():
        t0 = time.perf_counter()
        index = Index.build(corpus, ids, kind=kind)
        t_build = time.perf_counter() - t0
        default = index.params["nprobe" if kind == "ivf" else "ef_search"]
        print(f"{kind}: built in {t_build:.1f} s, params {index.params}")
        for v in sorted({*values, default}):
            if kind == "ivf":
                if v > index.params["nlist"]:
                    continue
                index._faiss.nprobe = v
            else:
                index._faiss.hnsw.efSearch = v
            t0 = time.perf_counter()
            got = index.search(queries, args.k)
            t_q = time.perf_counter() - t0
            recall = float(np.mean([len(set(a) & set(e)) / args.k for a, e in zip(got.indices, exact.indices)]))
            out[kind, v] = recall
            mark = "  (default)" if v == default else ""
            print(f"  {knob}={v:<4d} recall@{args.k} {recall:.4f}  {1000 * t_q / args.queries:.3f} ms/query{mark}")
        print(f"RECALL {kind} recall@{args.k} vs exact = {out[kind, default]:.4f} ({knob}={default}, "
              f"build {t_build:.1f} s)")
    return out


if __name__ == "__main__":
    main()
