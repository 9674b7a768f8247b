"""A saved vector index: embeddings, ids and metadata in one folder, searched by inner product.

Folder layout (``Index.save`` / ``Index.load``)::

    DIR/index.json     kind, dimension, count, search parameters, the model and role that made the vectors,
                       and a SHA-256 of every other file (checked at load: see :mod:`mmembed.index.integrity`)
    DIR/vectors.npy    (N, D) float32 L2-normalised embeddings -- the source of truth (memory-mapped on load)
    DIR/meta.jsonl     one JSON object per vector, in vector order: {"id": ..., **metadata}
    DIR/index.faiss    the trained approximate index (kinds "ivf" and "hnsw") or the int8 / binary codes

``kind="flat"`` is exact inner-product search (cosine, the vectors being normalised): FAISS ``IndexFlatIP`` when
faiss is installed, else the torch top-k of :func:`mmembed.mining.search.topk_search`, which gives the same ranking.
``"ivf"`` (inverted lists, ``nlist`` clusters, ``nprobe`` visited) and ``"hnsw"`` (graph, ``M`` links, ``efSearch``)
are approximate and need faiss (the optional extra ``mmembed[index]``); :meth:`Index.recall_vs_exact` measures
how many of the exact top-k they return.

Smaller indexes (see :mod:`mmembed.matryoshka` and docs/serving.md for measured quality / size / speed):

* ``truncate_dim=d`` keeps the first ``d`` coordinates of every vector, re-normalised (Matryoshka); queries of the
  model's full dimension are truncated the same way at search time.
* ``precision="int8"`` (FAISS ``IndexScalarQuantizer``, 8 bits per coordinate with per-dimension ranges learnt from
  the vectors: 1 byte per dimension) or ``"binary"`` (the sign of each coordinate, FAISS ``IndexBinaryFlat``
  searched by Hamming distance: 1 bit per dimension) search the codes exhaustively, then re-score the best
  ``rescore * k`` candidates with the float vectors (read from the memory-mapped ``vectors.npy``, so only those rows
  are touched) and return the top ``k`` by exact inner product. ``rescore=0`` returns the codes' own scores
  (binary: ``1 - 2 * hamming / d``, an estimate of the cosine).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mmembed.index import integrity
from mmembed.matryoshka import truncate_embeddings

IndexKind = Literal["flat", "ivf", "hnsw"]
KINDS = ("flat", "ivf", "hnsw")
IndexPrecision = Literal["float32", "int8", "binary"]
PRECISIONS = ("float32", "int8", "binary")
FORMAT_VERSION = 1


def import_faiss():
    """Import faiss or fail with the install line."""
    try:
        import faiss  # optional dependency: imported only when needed
    except ImportError as err:
        raise ImportError("this needs faiss: pip install 'mmembed[index]' (faiss-cpu) or faiss-gpu; "
                          "kind='flat' works without it") from err
    return faiss


def _as_matrix(x: Any, what: str) -> np.ndarray:
    arr = x.detach().to("cpu", torch.float32).numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{what} must be (N, D) or (D,), got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


@dataclass
class SearchResults:
    """Results of :meth:`Index.search` for ``Nq`` queries, best first.

    Attributes:
        scores: (Nq, k) inner products (cosine similarities); ``-inf`` where fewer than k results exist.
        indices: (Nq, k) row numbers in the index; ``-1`` where fewer than k results exist.
        ids: Per query, the ids of the hits (missing ones dropped).
    """

    scores: np.ndarray
    indices: np.ndarray
    ids: list[list[str]]
    metadata: list[list[dict[str, Any]]] = field(default_factory=list)

    def hits(self, q: int = 0) -> list[dict[str, Any]]:
        """Query ``q``'s hits as ``{"rank", "id", "score", **metadata}`` dicts."""
        return [{"rank": r + 1, "id": i, "score": float(self.scores[q, r]), **m}
                for r, (i, m) in enumerate(zip(self.ids[q], self.metadata[q]))]


class Index:
    """Embeddings with their ids and metadata; exact or approximate top-k inner-product search.

    Build with :meth:`build` (from vectors), :meth:`merge` (several indexes) or :func:`mmembed.index.build_index`
    (from an embedder and a corpus); reopen with :meth:`load`.
    """

    def __init__(self, vectors: np.ndarray, ids: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None,
                 *, kind: IndexKind = "flat", params: Mapping[str, Any] | None = None,
                 info: Mapping[str, Any] | None = None, faiss_index: Any = None) -> None:
        self.vectors = vectors
        self.ids = [str(i) for i in ids]
        self.metadata = [dict(m) for m in metadata] if metadata is not None else [{} for _ in self.ids]
        self.kind = kind
        self.params = dict(params or {})
        self.info = dict(info or {})
        self._faiss = faiss_index
        self._exact_faiss: Any = None
        self._row: dict[str, int] | None = None
        if len(self.ids) != len(vectors) or len(self.metadata) != len(vectors):
            raise ValueError(f"{len(vectors)} vectors need as many ids ({len(self.ids)}) and metadata entries "
                             f"({len(self.metadata)})")

    # ------------------------------------------------------------------------------------------------ building
    @classmethod
    def build(cls, vectors: Any, ids: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None, *,
              kind: IndexKind = "flat", nlist: int | None = None, nprobe: int = 16, hnsw_m: int = 32,
              ef_construction: int = 200, ef_search: int = 128, info: Mapping[str, Any] | None = None,
              seed: int = 0, truncate_dim: int | None = None, precision: IndexPrecision = "float32",
              rescore: int = 4) -> Index:
        """Index (N, D) embeddings (rows should be L2-normalised) under unique string ids.

        Args:
            vectors: (N, D) array or tensor.
            ids: One unique id per row.
            metadata: One JSON-serialisable dict per row (text, source, ...), returned with the hits.
            kind: ``"flat"`` (exact, default), ``"ivf"`` or ``"hnsw"`` (approximate; need faiss).
            nlist: IVF clusters; default ``4 * sqrt(N)``, at most ``N // 39`` (FAISS wants ~39 points per centroid).
            nprobe: IVF clusters visited per query (more = better recall, slower).
            hnsw_m / ef_construction / ef_search: HNSW links per node, build and search beam widths.
            info: Provenance stored in ``index.json`` (model, role, fingerprint, ...).
            seed: k-means seed for IVF training.
            truncate_dim: Keep the first ``truncate_dim`` coordinates, re-normalised (Matryoshka); full-dimension
                queries are cut the same way at search time.
            precision: ``"float32"`` (default), ``"int8"`` or ``"binary"`` codes (``kind="flat"`` only; need faiss).
            rescore: With int8 / binary codes, re-score ``rescore * k`` candidates with the float vectors (0 = off).
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision != "float32" and kind != "flat":
            raise ValueError(f"precision={precision!r} is an exhaustive index over compact codes; use kind='flat' "
                             "(ivf / hnsw store float32 vectors)")
        if rescore < 0:
            raise ValueError(f"rescore must be >= 0 (0 = no float re-scoring), got {rescore}")
        vectors = _as_matrix(vectors, "vectors")
        source_dim = vectors.shape[1]
        if truncate_dim is not None:
            vectors = truncate_embeddings(vectors, truncate_dim)
        if precision == "binary" and vectors.shape[1] % 8:
            raise ValueError(f"binary codes need a dimension divisible by 8, got {vectors.shape[1]}; pick another "
                             "truncate_dim")
        integrity.check_finite(vectors, "Index.build")
        ids = [str(i) for i in ids]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"ids must be unique; {dup!r} appears more than once")
        params: dict[str, Any] = {}
        if kind == "ivf":
            n = len(vectors)
            nlist = nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
            if nlist > n:
                raise ValueError(f"nlist={nlist} exceeds the {n} vectors; use fewer clusters or kind='flat'")
            params = {"nlist": int(nlist), "nprobe": int(min(nprobe, nlist)), "seed": seed}
        elif kind == "hnsw":
            params = {"M": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search}
        if truncate_dim is not None:  # recorded only when used, so plain indexes keep their old index.json
            params.update(truncate_dim=int(truncate_dim), source_dim=int(source_dim))
        if precision != "float32":
            params.update(precision=precision, rescore=int(rescore))
        index = cls(vectors, ids, metadata, kind=kind, params=params, info=info)
        index._faiss = index._make_faiss() if index._uses_faiss else None
        return index

    @property
    def precision(self) -> str:
        """``"float32"``, ``"int8"`` or ``"binary"``: how the searched vectors are stored."""
        return self.params.get("precision", "float32")

    @property
    def bytes_per_vector(self) -> int:
        """Bytes of the searched code per vector (float32: 4 per dimension; int8: 1; binary: 1/8).

        The float ``vectors.npy`` stays on disk for re-scoring (memory-mapped: only candidate rows are read).
        """
        return {"float32": 4 * self.dim, "int8": self.dim, "binary": self.dim // 8}[self.precision]

    @property
    def _uses_faiss(self) -> bool:
        return self.kind != "flat" or self.precision != "float32"

    def _make_faiss(self):
        faiss = import_faiss()
        d = self.dim
        vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        if self.precision == "int8":
            index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)  # per-dimension ranges
            index.add(vectors)
            return index
        if self.precision == "binary":
            index = faiss.IndexBinaryFlat(d)
            index.add(_binary_codes(vectors))
            return index
        if self.kind == "ivf":
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, self.params["nlist"], faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = self.params["seed"]
            index.train(self.vectors)
            index.add(self.vectors)
            index.nprobe = self.params["nprobe"]
            return index
        index = faiss.IndexHNSWFlat(d, self.params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.params["ef_construction"]
        index.add(self.vectors)
        index.hnsw.efSearch = self.params["ef_search"]
        return index

    @classmethod
    def merge(cls, parts: Sequence[Index], *, kind: IndexKind | None = None, **build_kwargs: Any) -> Index:
        """One index over the rows of several (e.g. built per rank or per corpus), in order; ids must stay unique.

        The approximate structure is rebuilt on the merged vectors (IVF centroids trained on a part do not fit the
        whole). ``kind`` defaults to the first part's, with its parameters unless overridden.
        """
        if not parts:
            raise ValueError("merge needs at least one index")
        dims = {p.dim for p in parts}
        if len(dims) > 1:
            raise ValueError(f"cannot merge indexes of different dimensions {sorted(dims)}")
        kind = kind or parts[0].kind
        if kind == parts[0].kind:
            p = parts[0].params
            defaults = {"ivf": {"nprobe": p.get("nprobe")}, "hnsw": {"hnsw_m": p.get("M"),
                        "ef_construction": p.get("ef_construction"), "ef_search": p.get("ef_search")}}.get(kind, {})
            build_kwargs = {**{k: v for k, v in defaults.items() if v is not None}, **build_kwargs}
        if "precision" in parts[0].params and kind == "flat":  # int8 / binary codes are re-trained on the union
            build_kwargs = {"precision": parts[0].precision, "rescore": parts[0].params["rescore"], **build_kwargs}
        merged = cls.build(np.concatenate([np.asarray(p.vectors) for p in parts]),
                           [i for p in parts for i in p.ids], [m for p in parts for m in p.metadata], kind=kind,
                           info=build_kwargs.pop("info", parts[0].info), **build_kwargs)
        sources = {p.params.get("source_dim") for p in parts}
        if len(sources) == 1 and None not in sources:  # parts already truncated alike: keep cutting full queries
            merged.params.update(truncate_dim=merged.dim, source_dim=sources.pop())
        return merged

    # --------------------------------------------------------------------------------------------------- search
    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.ids)

    def _flat_faiss(self):
        if self._exact_faiss is None:
            faiss = import_faiss()
            self._exact_faiss = faiss.IndexFlatIP(self.dim)
            self._exact_faiss.add(np.ascontiguousarray(self.vectors, dtype=np.float32))
        return self._exact_faiss

    def search(self, queries: Any, k: int = 10, *, exact: bool = False) -> SearchResults:
        """Top-``k`` rows by inner product for each query embedding.

        Args:
            queries: (Nq, D) or (D,) query embeddings (L2-normalised, role ``"query"``).
            k: Hits per query (fewer when the index is smaller).
            exact: Search exhaustively even if the index is approximate (the reference for recall).
        """
        q = _as_matrix(queries, "queries")
        if "truncate_dim" in self.params and q.shape[1] == self.params["source_dim"] != self.dim:
            q = truncate_embeddings(q, self.dim)  # full-dimension queries, cut like the indexed vectors
        if not np.isfinite(q).all():
            raise ValueError("queries hold NaN or inf; the query encoder produced invalid embeddings")
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]} but the index holds {self.dim}-d vectors; "
                             "encode them with the model that built the index")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if len(self) == 0:
            scores, idx = np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        elif self.kind == "flat" and self.precision == "float32" or exact:
            scores, idx = self._exact(q, k)
        elif self.precision != "float32":
            scores, idx = self._quantized(q, k)
        else:
            scores, idx = self._faiss.search(q, k)
            idx = idx.astype(np.int64)
            scores = np.where(idx < 0, -np.inf, scores).astype(np.float32)
        ids = [[self.ids[j] for j in row if j >= 0] for row in idx]
        meta = [[self.metadata[j] for j in row if j >= 0] for row in idx]
        return SearchResults(scores, idx, ids, meta)

    def _quantized(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Search the int8 / binary codes, then re-score ``rescore * k`` candidates with the float vectors."""
        rescore = int(self.params.get("rescore", 0))
        cand = min(len(self), k * rescore if rescore else k)
        if self.precision == "binary":
            dist, idx = self._faiss.search(_binary_codes(q), cand)
            scores = 1.0 - 2.0 * dist.astype(np.float32) / self.dim  # sign agreement: a cosine estimate
        else:
            scores, idx = self._faiss.search(q, cand)
        idx = idx.astype(np.int64)
        if rescore:
            rows = np.asarray(self.vectors[idx.clip(min=0).reshape(-1)], dtype=np.float32)
            scores = np.einsum("qcd,qd->qc", rows.reshape(len(q), cand, -1), q)
            scores = np.where(idx < 0, -np.inf, scores)
            order = np.argsort(-scores, axis=1, kind="stable")[:, : min(k, cand)]
            scores, idx = np.take_along_axis(scores, order, 1), np.take_along_axis(idx, order, 1)
        else:
            scores, idx = scores[:, :k], idx[:, :k]
        pad = k - idx.shape[1]
        if pad:
            scores = np.concatenate([scores, np.full((len(q), pad), -np.inf, np.float32)], axis=1)
            idx = np.concatenate([idx, np.full((len(q), pad), -1, np.int64)], axis=1)
        return np.where(idx < 0, -np.inf, scores).astype(np.float32), idx

    def _exact(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        kk = min(k, len(self))
        try:
            scores, idx = self._flat_faiss().search(q, kk)
        except ImportError:  # faiss is optional: the torch top-k ranks the same way
            from mmembed.index.search import topk_search

            s, i = topk_search(torch.from_numpy(q), torch.from_numpy(np.array(self.vectors)), kk,
                               corpus_chunk_size=65536)
            scores, idx = s.cpu().numpy(), i.cpu().numpy()
        pad = k - kk
        if pad:
            scores = np.concatenate([scores, np.full((len(q), pad), -np.inf, np.float32)], axis=1)
            idx = np.concatenate([idx, np.full((len(q), pad), -1, np.int64)], axis=1)
        return scores.astype(np.float32), idx.astype(np.int64)

    def recall_vs_exact(self, queries: Any, k: int = 10) -> float:
        """Mean fraction of the exact top-``k`` that this index's search returns (1.0 for ``kind="flat"``)."""
        approx = self.search(queries, k).indices
        exact = self.search(queries, k, exact=True).indices
        hits = [len(set(a[a >= 0]) & set(e[e >= 0])) / max(1, int((e >= 0).sum())) for a, e in zip(approx, exact)]
        return float(np.mean(hits))

    # ------------------------------------------------------------------------------------------------- lookups
    def row(self, id_: str) -> int:
        """Row number of an id (KeyError naming the id if absent)."""
        if self._row is None:
            self._row = {i: r for r, i in enumerate(self.ids)}
        try:
            return self._row[id_]
        except KeyError:
            raise KeyError(f"id {id_!r} is not in this index of {len(self)} vectors") from None

    def vectors_for(self, ids: Sequence[str]) -> np.ndarray:
        """The stored vectors of these ids, in that order (a KeyError names the first missing id)."""
        rows = [self.row(i) for i in ids]
        return np.asarray(self.vectors[rows], dtype=np.float32)

    # ----------------------------------------------------------------------------------------------------- disk
    def save(self, path: str | os.PathLike) -> Path:
        """Write the folder (see module docstring); files are replaced atomically one by one."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        _atomic(out / "vectors.npy", lambda f: np.save(f, np.asarray(self.vectors, dtype=np.float32)))
        _atomic(out / "meta.jsonl", lambda f: f.write("".join(
            json.dumps({"id": i, **m}, ensure_ascii=False) + "\n" for i, m in zip(self.ids, self.metadata)
        ).encode()))
        if self._uses_faiss:
            faiss = import_faiss()
            serialize = faiss.serialize_index_binary if self.precision == "binary" else faiss.serialize_index
            _atomic(out / "index.faiss", lambda f: f.write(serialize(self._faiss).tobytes()))
        else:
            (out / "index.faiss").unlink(missing_ok=True)
        files = ["vectors.npy", "meta.jsonl"] + (["index.faiss"] if self._uses_faiss else [])
        header = {"format": "mmembed-index", "version": FORMAT_VERSION, "kind": self.kind, "dim": self.dim,
                  "count": len(self), "metric": "inner_product", "params": self.params, **self.info,
                  "checksums": integrity.checksums(out, files)}
        _atomic(out / "index.json", lambda f: f.write(json.dumps(header, indent=2, sort_keys=True).encode()))
        return out

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = True, verify: bool = True) -> Index:
        """Open a saved index folder (vectors memory-mapped unless ``mmap=False``).

        Args:
            verify: Check every file against the checksum ``index.json`` recorded at build (reads each file once)
                and every vector for NaN / inf. A damaged or mixed-up folder is a one-line ``ValueError``.
        """
        path = Path(path)
        head = path / "index.json"
        if not head.is_file():
            raise FileNotFoundError(f"{path} is not an index folder (no index.json); build one with "
                                    "`mmembed-index build --model M --corpus C --out DIR`")
        info = integrity.parsed(head, lambda: json.loads(head.read_text()), "index header")
        if (not isinstance(info, dict) or info.get("format") != "mmembed-index"
                or info.get("version") != FORMAT_VERSION):
            raise ValueError(f"{head}: not an mmembed index of format version {FORMAT_VERSION}; rebuild it")
        recorded = info.pop("checksums", None)
        if verify:
            integrity.verify_checksums(path, recorded)
        vectors = integrity.parsed(path / "vectors.npy",
                                   lambda: np.load(path / "vectors.npy", mmap_mode="r" if mmap else None,
                                                   allow_pickle=False), "vectors file (.npy)")
        if vectors.ndim != 2 or vectors.dtype != np.float32:
            raise ValueError(f"{path / 'vectors.npy'} holds {vectors.dtype} {vectors.shape}, not (N, D) float32; "
                             "rebuild the index")
        if verify:
            integrity.check_finite(vectors, str(path / "vectors.npy"))
        ids, metadata = integrity.parsed(path / "meta.jsonl", lambda: _read_meta(path / "meta.jsonl"), "meta.jsonl")
        if len(ids) != len(vectors) or len(ids) != info["count"] or vectors.shape[1] != info.get("dim"):
            raise ValueError(f"{path}: index.json says {info['count']} vectors of dimension {info.get('dim')}, "
                             f"vectors.npy has {vectors.shape} and meta.jsonl {len(ids)} lines; the folder is "
                             "incomplete or mixed, rebuild it")
        kind, params = info.pop("kind"), info.pop("params")
        for key in ("format", "version", "dim", "count", "metric"):
            info.pop(key, None)
        faiss_index = None
        if kind != "flat" or params.get("precision", "float32") != "float32":
            faiss = import_faiss()
            binary = params.get("precision") == "binary"
            deserialize = faiss.deserialize_index_binary if binary else faiss.deserialize_index
            faiss_index = integrity.parsed(
                path / "index.faiss", lambda: deserialize(np.fromfile(path / "index.faiss", dtype=np.uint8)),
                "faiss index")
            if faiss_index.ntotal != len(ids) or faiss_index.d != vectors.shape[1]:
                raise ValueError(f"{path / 'index.faiss'} holds {faiss_index.ntotal} vectors of dimension "
                                 f"{faiss_index.d}, the folder {len(ids)} of {vectors.shape[1]}: it belongs to "
                                 "another index; rebuild it")
            if kind == "ivf":
                faiss_index.nprobe = params["nprobe"]
            elif kind == "hnsw":
                faiss_index.hnsw.efSearch = params["ef_search"]
        return cls(vectors, ids, metadata, kind=kind, params=params, info=info, faiss_index=faiss_index)

    def __repr__(self) -> str:
        return f"Index(kind={self.kind!r}, count={len(self)}, dim={self.dim}, params={self.params})"


def _binary_codes(x: np.ndarray) -> np.ndarray:
    """(N, D) floats -> (N, D / 8) uint8: one bit per coordinate, set where it is positive."""
    return np.packbits(np.asarray(x) > 0, axis=1)
def _read_meta(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    ids, metadata = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            ids.append(str(rec.pop("id")))
            metadata.append(rec)
    return ids, metadata


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)
