"""Saved vector indexes: build from a corpus (resumable, multi-rank), load, search (exact or FAISS IVF/HNSW)."""

from mmembed.index.build import build_index, encode_corpus
from mmembed.index.core import Index, SearchResults
from mmembed.index.corpus import Corpus, load_corpus

__all__ = ["Corpus", "Index", "SearchResults", "build_index", "encode_corpus", "load_corpus"]
