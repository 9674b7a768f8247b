"""Mining embeds a query repeated in several samples once, and every sample still gets its query's embedding."""

from __future__ import annotations

import torch

from mmembed.data.schema import Sample, Side
from mmembed.data.shards import SkipCounter, expand_urls, side_to_item, write_shards
from mmembed.mining.corpus import collect_datasets as _collect
from mmembed.mining.embedding import assemble as _assemble
from mmembed.mining.embedding import embed_blocks as _embed_blocks
from mmembed.mining.embedding import work_blocks as _blocks
from mmembed.mining.mine import mine_hard_negatives


class CountingEncoder:
    """The tiny embedder, recording which query texts it was asked to embed."""

    def __init__(self, embedder) -> None:
        self.embedder, self.query_texts = embedder, []

    def encode(self, items, role="query", batch_size=16, show_progress=None):
        if role == "query":
            self.query_texts += [it.text for it in items]
        return self.embedder.encode(items, role=role, batch_size=batch_size, show_progress=False)


def _samples():
    for i in range(12):
        # Queries repeat every 4 samples (same instruction and text); sample 11 has another instruction.
        instruction = "Answer the other way." if i == 11 else "Answer the question."
        yield Sample(id=f"toy/{i:03d}", dataset="toy", task="t2t", meta_task="vqa",
                     query=Side(text=f"question {i % 4}" + " long" * (i % 4), instruction=instruction),
                     positive=Side(text=f"answer {i} " + "x" * (i % 5), id=f"toy/p{i}")), {}


def test_repeated_queries_are_embedded_once(tiny_embedder, tmp_path):
    shards = write_shards(_samples(), str(tmp_path / "toy-%06d.tar"), maxcount=100)
    enc = CountingEncoder(tiny_embedder)
    summary = mine_hard_negatives(enc, shards, tmp_path / "out", window=(1, 4), n=2, batch_size=4)
    stats = summary.datasets["toy"]
    assert stats.queries == 12 and stats.distinct_queries == 5 and len(enc.query_texts) == 5
    # Embedded in order of size (text length here), whatever the input order.
    assert [len(t) for t in enc.query_texts] == sorted(len(t) for t in enc.query_texts)


def test_order_of_size_gives_each_sample_its_own_query_embedding(tiny_embedder, tmp_path):
    shards = write_shards(_samples(), str(tmp_path / "toy-%06d.tar"), maxcount=100)
    datasets = _collect(expand_urls(shards), SkipCounter())
    blocks = _blocks(datasets, 4)
    embedded = _embed_blocks(tiny_embedder, datasets, blocks, list(range(len(blocks))), 2, False)
    emb = _assemble(datasets, blocks, embedded)
    ds = datasets["toy"]
    # Back in sample order: each row is that sample's query embedded on its own.
    direct = tiny_embedder.encode([side_to_item(d.sample.query, d.images) for d in ds.samples], batch_size=1)
    torch.testing.assert_close(emb["toy", "query"], direct, atol=1e-5, rtol=0)
    # Candidates back in corpus order (the corpus is sorted by size for embedding, then un-permuted).
    corpus = tiny_embedder.encode(ds.items("candidate"), role="candidate", batch_size=1)
    assert emb["toy", "candidate"].shape[0] == len(ds.corpus) == 12
    torch.testing.assert_close(emb["toy", "candidate"], corpus, atol=1e-5, rtol=0)
