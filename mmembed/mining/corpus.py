"""A training collection read for mining and curation: samples grouped by sub-dataset, each with its de-duplicated
corpus of positives (by ``Side.id``, else by content)."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from mmembed.data.decode import DecodedSample, side_to_item
from mmembed.data.identity import content_key, corpus_id  # noqa: F401  (content_key: re-exported for callers)
from mmembed.data.reading import iter_decoded
from mmembed.data.schema import Side
from mmembed.data.skips import SkipCounter
from mmembed.types import Item


@dataclass
class Candidate:
    cid: str  # corpus id: the positive's Side.id, else a content-derived id
    key: str  # content hash: equal keys = exact duplicates
    side: Side
    image: Image.Image | None


@dataclass
class DatasetCorpus:
    name: str
    samples: list[DecodedSample] = field(default_factory=list)
    corpus: list[Candidate] = field(default_factory=list)
    positive_index: list[int] = field(default_factory=list)  # corpus index of each sample's positive
    merged: int = 0
    unique_queries: list[int] = field(default_factory=list)  # sample index of each distinct query's first holder
    query_index: list[int] = field(default_factory=list)  # index into unique_queries of each sample's query

    def items(self, role: str) -> list[Item]:
        """The items embedded for a role: the unique positives, or the distinct queries (each once)."""
        if role == "candidate":
            return [side_to_item(c.side, {c.side.image: c.image} if c.image is not None else {}) for c in self.corpus]
        return [side_to_item(self.samples[i].sample.query, self.samples[i].images) for i in self.unique_queries]


def collect_datasets(urls: list[str], counter: SkipCounter) -> dict[str, DatasetCorpus]:
    """Read all samples, group them by dataset and build each dataset's deduplicated positive corpus."""
    datasets: dict[str, DatasetCorpus] = {}
    for dec in iter_decoded(urls, counter=counter):
        ds = datasets.setdefault(dec.sample.dataset, DatasetCorpus(dec.sample.dataset))
        ds.samples.append(dec)
    for ds in datasets.values():
        by_dedupe: dict[str, int] = {}
        for dec in ds.samples:
            pos = dec.sample.positive
            image = dec.images.get(pos.image) if pos.image is not None else None
            key = content_key(pos, image)
            # The id is the identity when there is one (the synthetic world and converters set it); content otherwise.
            dedupe = f"id:{pos.id}" if pos.id else f"content:{key}"
            j = by_dedupe.get(dedupe)
            if j is None:
                j = by_dedupe[dedupe] = len(ds.corpus)
                cid = corpus_id(ds.name, pos, image, key)
                ds.corpus.append(Candidate(cid=cid, key=key, side=pos, image=image))
            else:
                ds.merged += 1
            ds.positive_index.append(j)
        # The same query (instruction, text, pixels) in several samples is embedded once.
        by_query: dict[str, int] = {}
        for i, dec in enumerate(ds.samples):
            q = dec.sample.query
            key = f"{q.instruction}\0{content_key(q, dec.images.get(q.image) if q.image is not None else None)}"
            if key not in by_query:
                by_query[key] = len(ds.unique_queries)
                ds.unique_queries.append(i)
            ds.query_index.append(by_query[key])
    return dict(sorted(datasets.items()))
