"""Saved indexes: exact/approximate search, save/load, merge, resumable multi-rank encoding, the mining hook, CLI."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from mmembed.data.shards import write_shards
from mmembed.index import Index, build_index, encode_corpus, load_corpus
from mmembed.index import core as index_core
from mmembed.mining.mine import mine_hard_negatives

from .fixtures_data import IMAGE_STRUCT, png_bytes, text_sample, write_beir, write_parquet


def _unit(rng: np.random.Generator, n: int, d: int, clusters: int = 0) -> np.ndarray:
    if clusters:
        centres = rng.normal(size=(clusters, d))
        x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, d))
    else:
        x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    corpus = _unit(rng, 3000, 32, clusters=40)
    queries = _unit(rng, 50, 32) * 0.3 + corpus[rng.integers(0, 3000, 50)]
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return corpus, queries.astype(np.float32), [f"doc{i}" for i in range(3000)]


def test_flat_search_is_exact_and_round_trips(data, tmp_path):
    corpus, queries, ids = data
    meta = [{"text": f"text {i}"} for i in range(len(ids))]
    index = Index.build(corpus, ids, meta, info={"model": "tiny"})
    res = index.search(queries, k=5)
    ref = np.argsort(-(queries @ corpus.T), axis=1)[:, :5]
    np.testing.assert_array_equal(res.indices, ref)
    np.testing.assert_allclose(res.scores, np.take_along_axis(queries @ corpus.T, ref, 1), atol=1e-5)
    assert res.ids[0] == [ids[j] for j in ref[0]]
    assert res.hits(0)[0] == {"rank": 1, "id": ids[ref[0, 0]], "score": pytest.approx(float(res.scores[0, 0])),
                              "text": f"text {ref[0, 0]}"}
    index.save(tmp_path / "idx")
    back = Index.load(tmp_path / "idx")
    assert back.kind == "flat" and back.info["model"] == "tiny" and back.ids == ids and back.metadata == meta
    np.testing.assert_array_equal(back.search(queries, k=5).indices, ref)
    np.testing.assert_array_equal(back.vectors_for(["doc7", "doc2"]), corpus[[7, 2]])
    # Single 1-D query; k larger than the corpus pads with -1 / -inf.
    small = Index.build(corpus[:3], ids[:3])
    r = small.search(torch.from_numpy(queries[0]), k=5)
    assert r.indices.shape == (1, 5) and list(r.indices[0, 3:]) == [-1, -1] and np.isneginf(r.scores[0, 3:]).all()
    assert len(r.ids[0]) == 3


def test_exact_search_without_faiss_gives_the_same_ranking(data, monkeypatch):
    corpus, queries, ids = data
    with_faiss = Index.build(corpus, ids).search(queries, k=10)

    def no_faiss():
        raise ImportError("no faiss here")

    monkeypatch.setattr(index_core, "import_faiss", no_faiss)
    without = Index.build(corpus, ids).search(queries, k=10)
    np.testing.assert_array_equal(without.indices, with_faiss.indices)
    with pytest.raises(ImportError, match="no faiss"):
        Index.build(corpus, ids, kind="hnsw")


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_recall_and_persist(data, tmp_path, kind):
    corpus, queries, ids = data
    index = Index.build(corpus, ids, kind=kind)
    recall = index.recall_vs_exact(queries, k=10)
    print(f"\n{kind} recall@10 vs exact on 3000 clustered 32-d vectors: {recall:.3f} ({index.params})")
    assert 0.8 <= recall <= 1.0
    index.save(tmp_path / kind)
    back = Index.load(tmp_path / kind)
    assert back.kind == kind and back.params == index.params
    np.testing.assert_array_equal(back.search(queries, k=10).indices, index.search(queries, k=10).indices)
    exact = Index.build(corpus, ids).search(queries, k=10).indices
    np.testing.assert_array_equal(back.search(queries, k=10, exact=True).indices, exact)


def test_merge_equals_building_on_the_concatenation(data):
    corpus, queries, ids = data
    parts = [Index.build(corpus[:1000], ids[:1000]), Index.build(corpus[1000:], ids[1000:])]
    merged = Index.merge(parts)
    np.testing.assert_array_equal(merged.search(queries, k=10).indices,
                                  Index.build(corpus, ids).search(queries, k=10).indices)
    with pytest.raises(ValueError, match="ids must be unique; 'doc0'"):
        Index.merge([parts[0], parts[0]])


def test_bad_inputs_give_one_line_errors(data, tmp_path):
    corpus, queries, ids = data
    with pytest.raises(ValueError, match="as many ids"):
        Index.build(corpus, ids[:-1])
    with pytest.raises(ValueError, match="dimension 8 but the index holds 32-d"):
        Index.build(corpus, ids).search(np.ones((1, 8), np.float32))
    with pytest.raises(FileNotFoundError, match="not an index folder"):
        Index.load(tmp_path)
    with pytest.raises(ValueError, match="kind must be one of"):
        Index.build(corpus, ids, kind="lsh")
    with pytest.raises(KeyError, match="'nope' is not in this index"):
        Index.build(corpus, ids).vectors_for(["nope"])


def _tampered(src, dst, how: str, other=None):
    """A copy of the index folder ``src`` in ``dst`` with one kind of damage."""
    import shutil

    shutil.copytree(src, dst)
    if how == "reordered meta":
        lines = (dst / "meta.jsonl").read_text().splitlines(keepends=True)
        (dst / "meta.jsonl").write_text("".join([lines[1], lines[0], *lines[2:]]))
    elif how == "swapped faiss":
        shutil.copy(other / "index.faiss", dst / "index.faiss")
    elif how == "flipped vector bytes":
        raw = bytearray((dst / "vectors.npy").read_bytes())
        raw[-7] ^= 0x40
        (dst / "vectors.npy").write_bytes(bytes(raw))
    elif how == "nan vectors":
        v = np.load(dst / "vectors.npy")
        v[5] = np.nan
        np.save(dst / "vectors.npy", v)
    elif how == "bad npy header":
        raw = bytearray((dst / "vectors.npy").read_bytes())
        raw[10:40] = b"{'descr': '<f4', 'fortran_ord"[:30]
        (dst / "vectors.npy").write_bytes(bytes(raw))
    elif how == "truncated faiss":
        raw = (dst / "index.faiss").read_bytes()
        (dst / "index.faiss").write_bytes(raw[: len(raw) // 2])
    elif how == "flipped faiss":
        raw = bytearray((dst / "index.faiss").read_bytes())
        for i in range(8, 64):
            raw[i] ^= 0xFF
        (dst / "index.faiss").write_bytes(bytes(raw))
    return dst


TAMPER_CASES = ["reordered meta", "swapped faiss", "flipped vector bytes", "nan vectors", "bad npy header",
                "truncated faiss", "flipped faiss"]


@pytest.mark.parametrize("how", TAMPER_CASES)
def test_a_tampered_index_is_refused_at_load_with_one_line(data, tmp_path, how):
    pytest.importorskip("faiss")
    corpus, _, ids = data
    good = Index.build(corpus[:400], ids[:400], [{"n": i} for i in range(400)], kind="ivf", nlist=4).save(
        tmp_path / "good")
    other = Index.build(corpus[400:800], ids[400:800], kind="ivf", nlist=4).save(tmp_path / "other")
    Index.load(good)  # the untouched folder loads
    bad = _tampered(good, tmp_path / "bad", how, other)
    with pytest.raises(ValueError) as info:
        Index.load(bad)
    assert "\n" not in str(info.value) and "rebuild" in str(info.value)
    # without the recorded checksums (an index saved before they existed) the parse / count / NaN checks still
    # give one line for the damage they can see
    header = json.loads((bad / "index.json").read_text())
    header.pop("checksums")
    (bad / "index.json").write_text(json.dumps(header))
    if how in ("nan vectors", "bad npy header", "truncated faiss", "flipped faiss"):
        with pytest.raises(ValueError, match="rebuild"):
            Index.load(bad)


def test_build_refuses_nan_vectors_and_search_refuses_nan_queries(data):
    corpus, queries, ids = data
    bad = corpus[:10].copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match=r"1 vector\(s\) hold NaN or inf \(rows \[3\]"):
        Index.build(bad, ids[:10])
    q = queries[:2].copy()
    q[1, 4] = np.inf
    with pytest.raises(ValueError, match="queries hold NaN or inf"):
        Index.build(corpus[:10], ids[:10]).search(q)


def test_search_refuses_queries_from_another_model(tiny_embedder, tmp_path):
    from mmembed import Embedder
    from mmembed.index.integrity import check_model
    from mmembed.mining.embedding import model_fingerprint

    index = Index.build(np.eye(4, tiny_embedder.embed_dim, dtype=np.float32), list("abcd"),
                        info={"model": "tiny", "model_fingerprint": model_fingerprint(tiny_embedder)})
    check_model(index, tiny_embedder)  # the model that built it passes
    other = Embedder.from_pretrained("tiny", vtc_factor=2, device="cpu", seed=1)
    with pytest.raises(ValueError, match="built by another model"):
        check_model(index, other)


# ------------------------------------------------------------------------------------------- from a corpus
@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("index_shards")
    samples = [text_sample(i) for i in range(14)]
    dup, images = text_sample(3)
    dup.id = "toy_t2i/dup3"
    samples.append((dup, images))  # a repeated positive id: indexed once
    write_shards(iter(samples), str(root / "toy_t2i-%06d.tar"), maxcount=8)
    return root


class _Counting:
    """Wraps an Embedder and counts the items it encodes."""

    def __init__(self, emb):
        self.emb, self.module, self.embed_dim, self.calls = emb, emb.module, emb.embed_dim, 0

    def encode(self, items, **kw):
        self.calls += len(items)
        return self.emb.encode(items, **kw)


def test_build_index_from_shards_resumes_and_splits_across_ranks(tiny_embedder, shard_dir, tmp_path):
    corpus = load_corpus(shard_dir)
    assert len(corpus) == 14 and corpus.ids[0] == "toy_t2i/p0" and corpus.metadata[0]["dataset"] == "toy_t2i"
    ref = tiny_embedder.encode(corpus.items, role="candidate", convert_to_numpy=True)

    single = build_index(tiny_embedder, corpus, tmp_path / "one", chunk_size=4, model="tiny", show_progress=False)
    assert not (tmp_path / "one" / "chunks").exists()
    np.testing.assert_allclose(single.vectors, ref, atol=1e-5)

    # Rank 1 of 2 first (chunks 1 and 3), then rank 0 encodes only its own chunks and merges.
    counting = _Counting(tiny_embedder)
    assert encode_corpus(counting, corpus, tmp_path / "two", chunk_size=4, rank=1, world_size=2,
                         show_progress=False) is None
    assert counting.calls == 4 + 2
    split = build_index(counting, corpus, tmp_path / "two", chunk_size=4, rank=0, world_size=2, show_progress=False)
    assert counting.calls == 14
    np.testing.assert_array_equal(split.vectors, single.vectors)

    # An interrupted run resumes: chunks on disk (here chunks 1 and 3) are not encoded again.
    counting = _Counting(tiny_embedder)
    encode_corpus(counting, corpus, tmp_path / "resume", chunk_size=4, rank=1, world_size=2, show_progress=False)
    counting.calls = 0
    resumed = encode_corpus(counting, corpus, tmp_path / "resume", chunk_size=4, show_progress=False)
    assert counting.calls == 8 and np.array_equal(resumed, single.vectors)
    with pytest.raises(ValueError, match="chunks of another run .*chunk_size"):
        encode_corpus(counting, corpus, tmp_path / "resume", chunk_size=5, show_progress=False)


def test_mining_reuses_a_saved_index(tiny_embedder, shard_dir, tmp_path):
    build_index(tiny_embedder, load_corpus(shard_dir), tmp_path / "idx", model="tiny", show_progress=False)
    kw = {"strategy": "rule", "k": 3, "batch_size": 8, "show_progress": False}
    plain = mine_hard_negatives(tiny_embedder, str(shard_dir), tmp_path / "m1", **kw)
    counting = _Counting(tiny_embedder)
    reused = mine_hard_negatives(counting, str(shard_dir), tmp_path / "m2", corpus_index=tmp_path / "idx", **kw)
    # Only the (distinct) queries were embedded, none of the corpus.
    assert counting.calls == sum(d.distinct_queries for d in reused.datasets.values()) <= reused.queries
    m1 = [json.loads(x) for x in (tmp_path / "m1" / "manifest.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "m2" / "manifest.jsonl").read_text().splitlines()]
    assert [r["negative_ids"] for r in m1] == [r["negative_ids"] for r in m2] and reused.queries == plain.queries
    other = Index.build(np.eye(14, tiny_embedder.embed_dim, dtype=np.float32), [f"x{i}" for i in range(14)])
    with pytest.raises(ValueError, match="'toy_t2i/p0' is not in this index"):
        mine_hard_negatives(tiny_embedder, str(shard_dir), tmp_path / "m3", corpus_index=other, **kw)


def test_beir_and_parquet_corpora(tmp_path):
    beir = load_corpus(write_beir(tmp_path / "beir"))
    assert beir.ids == ["p1", "p2", "p3"] and all(it.kind == "document" for it in beir.items)
    (tmp_path / "pq").mkdir()
    (tmp_path / "pq" / "a.png").write_bytes(png_bytes())
    path = write_parquet(tmp_path / "pq" / "corpus.parquet", {
        "id": ["t1", "i1", "b1"], "text": ["a caption", None, "with bytes"],
        "image": [None, {"bytes": None, "path": "a.png"}, {"bytes": png_bytes((0, 0, 255)), "path": None}]},
        pa.schema([("id", pa.string()), ("text", pa.string()), ("image", IMAGE_STRUCT)]))
    c = load_corpus(path)
    assert c.ids == ["t1", "i1", "b1"] and c.items[0].text == "a caption"
    assert str(c.items[1].image).endswith("a.png") and c.items[2].image.size == (24, 24)
    write_parquet(tmp_path / "bad.parquet", {"caption": ["x"]})
    with pytest.raises(ValueError, match="needs a 'text' and/or 'image' column"):
        load_corpus(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="cannot tell what corpus"):
        load_corpus(tmp_path / "nothing.txt")


def test_cli_build_and_search(shard_dir, tmp_path, capsys):
    from mmembed.index.cli import main

    assert main(["build", "--model", "tiny", "--corpus", str(shard_dir), "--out", str(tmp_path / "idx"),
                 "--kind", "hnsw", "--device", "cpu"]) == 0
    info = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert info["kind"] == "hnsw" and info["count"] == 14 and info["model"] == "tiny"
    capsys.readouterr()
    img = tmp_path / "q.png"
    img.write_bytes(png_bytes((0, 40, 90), (16, 16)))  # the pixels of sample 0's positive
    assert main(["search", "--index", str(tmp_path / "idx"), "--image", str(img), "-k", "3", "--json",
                 "--device", "cpu", "--instruction", "Represent the given image."]) == 0
    hits = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    with pytest.raises(SystemExit, match="give --text and/or --image"):
        main(["search", "--index", str(tmp_path / "idx")])
