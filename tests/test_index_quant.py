"""Smaller indexes: Matryoshka truncation and int8 / binary codes with float re-scoring (mmembed.index.core)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmembed.data.shards import write_shards
from mmembed.index import Index
from mmembed.matryoshka import truncate_embeddings

from .fixtures_data import text_sample

pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(30, 32))
    corpus = centres[rng.integers(0, 30, 2000)] + 0.4 * rng.normal(size=(2000, 32))
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = corpus[rng.integers(0, 2000, 40)] + 0.2 * rng.normal(size=(40, 32))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return corpus.astype(np.float32), queries.astype(np.float32), [f"d{i}" for i in range(2000)]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_shards")
    write_shards(iter([text_sample(i) for i in range(12)]), str(root / "toy_t2i-%06d.tar"), maxcount=8)
    return root


def _recall(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(got, ref)]))


def test_int8_and_binary_codes_rescored_with_float_vectors(data, tmp_path):
    corpus, queries, ids = data
    exact = Index.build(corpus, ids).search(queries, 10)
    recalls = {}
    for precision, size in (("int8", 32), ("binary", 4)):
        for rescore in (0, 4):
            index = Index.build(corpus, ids, precision=precision, rescore=rescore)
            assert index.bytes_per_vector == size and index.precision == precision
            res = index.search(queries, 10)
            recalls[precision, rescore] = _recall(res.indices, exact.indices)
            if rescore:  # re-scored hits carry their exact float inner products, best first
                assert np.allclose(res.scores, np.einsum("qkd,qd->qk", corpus[res.indices], queries), atol=1e-5)
                assert (np.diff(res.scores, axis=1) <= 1e-7).all()
    # binary without re-scoring: 1 - 2 * Hamming / d over the sign bits, computed here by hand
    res = Index.build(corpus, ids, precision="binary", rescore=0).search(queries[:3], 5)
    ham = ((corpus[res.indices] > 0) != (queries[:3, None, :] > 0)).sum(-1)
    assert np.allclose(res.scores, 1 - 2 * ham / 32)
    assert recalls["int8", 4] >= 0.97 and recalls["int8", 4] >= recalls["int8", 0]
    assert recalls["binary", 4] > recalls["binary", 0] + 0.1, recalls  # re-scoring is what makes 1 bit usable

    index = Index.build(corpus, ids, precision="binary", rescore=4)
    index.save(tmp_path / "bin")
    head = json.loads((tmp_path / "bin" / "index.json").read_text())
    assert head["params"] == {"precision": "binary", "rescore": 4}
    again = Index.load(tmp_path / "bin")
    assert np.array_equal(again.search(queries, 10).indices, index.search(queries, 10).indices)
    assert again.search(queries, 10, exact=True).ids == exact.ids  # the float vectors stay the reference


def test_truncated_index_cuts_vectors_and_full_queries_alike(data, tmp_path):
    corpus, queries, ids = data
    index = Index.build(corpus, ids, truncate_dim=16, precision="int8", rescore=8)
    assert index.dim == 16 and index.bytes_per_vector == 16
    assert np.allclose(index.vectors, truncate_embeddings(corpus, 16), atol=1e-6)
    full_q = index.search(queries, 10)
    cut_q = index.search(truncate_embeddings(queries, 16), 10)
    assert np.array_equal(full_q.indices, cut_q.indices)
    ref = Index.build(truncate_embeddings(corpus, 16), ids).search(truncate_embeddings(queries, 16), 10)
    assert _recall(full_q.indices, ref.indices) >= 0.95
    index.save(tmp_path / "t")
    loaded = Index.load(tmp_path / "t")
    assert loaded.params["truncate_dim"] == 16 and loaded.params["source_dim"] == 32
    assert np.array_equal(loaded.search(queries, 10).indices, full_q.indices)
    merged = Index.merge([Index.build(corpus[:1000], ids[:1000], truncate_dim=16),
                          Index.build(corpus[1000:], ids[1000:], truncate_dim=16)])
    assert merged.dim == 16 and merged.search(queries, 10).ids == ref.ids
    with pytest.raises(ValueError, match="queries have dimension 24"):
        index.search(queries[:, :24], 10)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"precision": "int4"}, "precision must be one of"),
    ({"precision": "int8", "kind": "hnsw"}, "use kind='flat'"),
    ({"precision": "binary", "truncate_dim": 12}, "divisible by 8"),
    ({"truncate_dim": 33}, r"outside \[1, 32\]"),
    ({"precision": "int8", "rescore": -1}, "rescore must be >= 0"),
])
def test_bad_settings_are_one_line_errors(data, kwargs, message):
    corpus, _, ids = data
    with pytest.raises(ValueError, match=message):
        Index.build(corpus, ids, **kwargs)


def test_cli_builds_a_truncated_binary_index_and_searches_it(shard_dir, tmp_path, capsys):
    from mmembed.index.cli import main

    out = tmp_path / "idx"
    assert main(["build", "--model", "tiny", "--corpus", str(shard_dir), "--out", str(out), "--truncate-dim", "32",
                 "--precision", "binary", "--rescore", "2", "--device", "cpu"]) == 0
    head = json.loads((out / "index.json").read_text())
    assert head["dim"] == 32 and head["params"] == {"precision": "binary", "rescore": 2, "source_dim": 64,
                                                    "truncate_dim": 32}
    capsys.readouterr()
    assert main(["search", "--index", str(out), "--text", "a red circle", "-k", "3", "--json",
                 "--device", "cpu"]) == 0
    hits = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(hits) == 3 and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    with pytest.raises(SystemExit, match="--precision binary needs a dimension divisible by 8"):
        main(["build", "--model", "tiny", "--corpus", str(shard_dir), "--out", str(tmp_path / "x"),
              "--truncate-dim", "12", "--precision", "binary", "--device", "cpu"])
    with pytest.raises(SystemExit, match="use --kind flat"):
        main(["build", "--model", "tiny", "--corpus", str(shard_dir), "--out", str(tmp_path / "y"),
              "--precision", "int8", "--kind", "ivf"])


def test_benchmark_table_smoke(capsys):
    from benchmarks import bench_index_quant

    rows = bench_index_quant.main(["--n", "600", "--dim", "32", "--clusters", "20", "--queries", "20",
                                   "--dims", "8,16"])["vectors"]
    cells = {(r["dim"], r["precision"], r["rescore"]): r for r in rows}
    assert set(cells) == {(d, p, r) for d in (8, 16, 32) for p, r in
                          (("float32", 0), ("int8", 4), ("binary", 4), ("binary", 0))}
    assert cells[32, "float32", 0]["recall_full"] == 1.0 and cells[16, "float32", 0]["recall_same_dim"] == 1.0
    assert [cells[d, p, r]["bytes"] for d, p, r in ((32, "float32", 0), (32, "int8", 4), (16, "binary", 0))] == \
        [128, 32, 2]
    assert "recall@k vs full" in capsys.readouterr().out
