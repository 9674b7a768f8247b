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

import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from mmembed.types import text_problem

TASKS = ("t2i", "i2t", "it2i", "it2t", "t2it", "it2it", "i2i", "t2t", "t2vd", "vd2t", "i2it")
META_TASKS = ("classification", "vqa", "retrieval", "grounding", "visdoc")
KINDS = ("natural", "document")

#: Image member names a side may give (the part of a tar member name after ``K.``).
IMAGE_MEMBER = re.compile(r"^(query|pos|neg\d+|xpos\d+)\.[a-z0-9]+$", re.IGNORECASE)


class SchemaError(ValueError):
    """A sample that does not fit the schema. ``reason`` is the skip reason a reader counts it under:
    ``bad_json`` (missing field, wrong type), ``bad_text`` (text that is not valid Unicode or holds an image token)
    or ``unsafe_member`` (an image member name with a path in it)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _check_str(value: Any, what: str, *, optional: bool = True, prompt: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise SchemaError("bad_json", f"{what} must be a string{' or null' if optional else ''}, "
                                      f"got {type(value).__name__}")
    if prompt:
        problem = text_problem(value)
    else:  # ids and names only need to be valid Unicode; an image token in them is harmless
        try:
            value.encode("utf-8")
            problem = None
        except UnicodeEncodeError as exn:
            problem = f"not valid Unicode text ({exn.reason})"
    if problem:
        raise SchemaError("bad_text", f"{what} {problem}")


def check_image_member(name: Any, what: str = "image") -> None:
    """Raise :class:`SchemaError` unless ``name`` is an image member name of the layout (``query.png``, ...)."""
    _check_str(name, what, optional=False)
    if "/" in name or "\\" in name or ".." in name or name.startswith("~"):
        raise SchemaError("unsafe_member", f"{what} {name[:80]!r} is a path; name a member like 'pos.png'")
    if not IMAGE_MEMBER.match(name):
        raise SchemaError("bad_json", f"{what} {name[:80]!r} must look like 'query.png', 'pos.jpg', 'neg0.png'")


@dataclass
class Side:
    """One side (query, positive or negative) of a sample; ``image`` is a tar-member extension or None."""

    text: str | None = None
    image: str | None = None
    instruction: str | None = None
    kind: str = "natural"
    id: str | None = None

    def __post_init__(self) -> None:
        _check_str(self.text, "side text", prompt=True)
        _check_str(self.instruction, "side instruction", prompt=True)
        _check_str(self.id, "side id")
        if self.image is not None:
            check_image_member(self.image, "side image")
        if self.kind not in KINDS:
            raise SchemaError("bad_json", f"side kind {self.kind!r} is not one of {KINDS}")

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
        for name in ("id", "dataset", "task", "meta_task"):
            _check_str(getattr(self, name), f"sample {name}", optional=False)
        if not self.id:
            raise SchemaError("bad_json", "sample id must not be empty")
        if not isinstance(self.meta, dict):
            raise SchemaError("bad_json", f"sample meta must be an object, got {type(self.meta).__name__}")
        for name in ("query", "positive"):
            if not isinstance(getattr(self, name), Side):
                raise SchemaError("bad_json", f"sample {name} must be a Side")
        for name in ("negatives", "extra_positives"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(v, Side) for v in value):
                raise SchemaError("bad_json", f"sample {name} must be a list of Sides")
        if self.task not in TASKS:
            raise SchemaError("bad_json", f"unknown task {self.task!r} for sample {self.id!r}; use one of {TASKS}")
        if self.meta_task not in META_TASKS:
            raise SchemaError("bad_json", f"unknown meta_task {self.meta_task!r} for sample {self.id!r}; "
                                          f"use one of {META_TASKS}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.extra_positives:  # keep shards without judge data byte-identical to the original layout
            d.pop("extra_positives")
        return d

    @classmethod
    def from_json(cls, d: Any) -> Sample:
        """Build a Sample from parsed JSON, checking every field's type (the one schema check of the kit).

        Raises:
            SchemaError: With the reason (``bad_json``, ``bad_text``, ``unsafe_member``) and what is wrong.
        """
        if not isinstance(d, dict):
            raise SchemaError("bad_json", f"a sample must be a JSON object, got {type(d).__name__}")
        missing = [k for k in ("id", "dataset", "task", "meta_task", "query", "positive") if k not in d]
        if missing:
            raise SchemaError("bad_json", f"sample misses field(s) {missing}")
        try:  # a lone surrogate anywhere (meta included) would fail later when the sample is written or tokenised
            json.dumps(d, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exn:
            raise SchemaError("bad_text", f"sample holds text that is not valid Unicode ({exn.reason})") from None
        return cls(
            id=d["id"],
            dataset=d["dataset"],
            task=d["task"],
            meta_task=d["meta_task"],
            query=_side(d["query"], "query"),
            positive=_side(d["positive"], "positive"),
            negatives=_sides(d.get("negatives", []), "negatives"),
            meta=d.get("meta", {}),
            extra_positives=_sides(d.get("extra_positives", []), "extra_positives"),
        )

    @property
    def sides(self) -> list[Side]:
        """Every side: query, positive, negatives, extra positives (the order images are checked in)."""
        return [self.query, self.positive, *self.negatives, *self.extra_positives]


_SIDE_FIELDS = frozenset(f.name for f in fields(Side))


def _side(d: Any, what: str) -> Side:
    if not isinstance(d, dict):
        raise SchemaError("bad_json", f"{what} must be an object, got {type(d).__name__}")
    unknown = sorted(set(d) - _SIDE_FIELDS)
    if unknown:
        raise SchemaError("bad_json", f"{what} has unknown field(s) {unknown[:5]}; a side has {sorted(_SIDE_FIELDS)}")
    return Side(**d)


def _sides(d: Any, what: str) -> list[Side]:
    if not isinstance(d, list):
        raise SchemaError("bad_json", f"{what} must be a list, got {type(d).__name__}")
    return [_side(x, f"{what}[{i}]") for i, x in enumerate(d)]
