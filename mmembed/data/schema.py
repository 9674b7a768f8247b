"""The one training-sample schema every shard, converter and DataModule speaks.

A sample is a query, one positive and optional negatives. In a WebDataset tar a sample with key ``K`` is stored as

* ``K.json``      -- the metadata below (UTF-8 JSON),
* ``K.query.png`` -- the query image, if any (any PIL-readable encoding; the extension says which),
* ``K.pos.png``   -- the positive's image, if any,
* ``K.neg{i}.png`` -- the i-th negative's image, if any,
* ``K.xpos{i}.png`` -- the i-th extra positive's image, if any (judge-identified positives, paper §3.3-3.4).

JSON layout::

    {"id": "synth_cls/000012", "dataset": "synth_cls", "task": "i2t", "meta_task": "classification",
     "query":    {"instruction": "...", "text": "...", "image": "query.png" | null, "kind": "natural", "id": "..."},
     "positive": {"instruction": "...", "text": "...", "image": "pos.png"   | null, "kind": "natural", "id": "..."},
     "negatives": [{... "image": "neg0.png" | null ...}, ...],
     "extra_positives": [{... "image": "xpos0.png" | null ...}, ...],
     "meta": {...free-form, e.g. synthetic attributes or planted false-negative ids...}}

``image`` in the JSON names the tar member's extension (the part after ``K.``); images are never base64 in JSON.

``extra_positives`` holds candidates an MLLM judge found relevant although they are not the ground truth (stage-3
curation). The contrastive loss never uses them (the ground truth stays the only positive); the reranker samples
its positives from ``{positive} + extra_positives`` (the paper's augmented positive set).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

TASKS = ("t2i", "i2t", "it2i", "it2t", "t2it", "it2it", "i2i", "t2t", "t2vd", "vd2t", "i2it")
META_TASKS = ("classification", "vqa", "retrieval", "grounding", "visdoc")


@dataclass
class Side:
    """One side (query, positive or negative) of a sample; ``image`` is a tar-member extension or None."""

    text: str | None = None
    image: str | None = None
    instruction: str | None = None
    kind: str = "natural"
    id: str | None = None

    @property
    def is_empty(self) -> bool:
        return (self.text is None or not str(self.text).strip()) and self.image is None


@dataclass
class Sample:
    """A training sample: query, positive, negatives, plus dataset/task labels and free-form metadata."""

    id: str
    dataset: str
    task: str
    meta_task: str
    query: Side
    positive: Side
    negatives: list[Side] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    extra_positives: list[Side] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r} for sample {self.id!r}; use one of {TASKS}")
        if self.meta_task not in META_TASKS:
            raise ValueError(f"unknown meta_task {self.meta_task!r} for sample {self.id!r}; use one of {META_TASKS}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.extra_positives:  # keep shards without judge data byte-identical to the original layout
            d.pop("extra_positives")
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Sample:
        return cls(
            id=d["id"],
            dataset=d["dataset"],
            task=d["task"],
            meta_task=d["meta_task"],
            query=Side(**d["query"]),
            positive=Side(**d["positive"]),
            negatives=[Side(**n) for n in d.get("negatives", [])],
            meta=d.get("meta", {}),
            extra_positives=[Side(**n) for n in d.get("extra_positives", [])],
        )

    @property
    def sides(self) -> list[Side]:
        """Every side: query, positive, negatives, extra positives (the order images are checked in)."""
        return [self.query, self.positive, *self.negatives, *self.extra_positives]
