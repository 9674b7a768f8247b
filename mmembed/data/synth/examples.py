"""The synthetic world's building blocks: a candidate (:class:`Cand`), an example (:class:`Example`) and the semantic
keys that decide which candidate answers which query (shared by the generators and the false-negative planting)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

from mmembed.data.synth import scenes as sc


@dataclass
class Cand:
    """A candidate (positive, negative or distractor): text and/or image, the keys it provides, a content id."""

    text: str | None
    image: Image.Image | None
    provides: frozenset
    uid: str = ""

    def __post_init__(self) -> None:
        if not self.uid and self.image is None:
            self.uid = "t" + hashlib.sha1((self.text or "").encode()).hexdigest()[:12]


@dataclass
class Example:
    """One query with its positive, training negatives, extra eval distractors and metadata."""

    q_text: str | None
    q_image: Image.Image | None
    pos: Cand
    accepts: frozenset
    negatives: list[Cand] = field(default_factory=list)
    hard: list[Cand] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    q_uid: str = ""
    # How to plant a false negative from this example (see plant_false_negatives); never drawn unless planting.
    variant: Callable[[random.Random], Cand] | None = field(default=None, repr=False, compare=False)
    sibling: Callable[[random.Random, int], Example] | None = field(default=None, repr=False, compare=False)

    def answered_by(self, cand: Cand) -> bool:
        return bool(self.accepts & cand.provides)


Generator = Callable[[random.Random, int, int], list[Example]]


def _uid(i: int, tag: str) -> str:
    return f"{i:06d}{tag}"


def _t(text: str, *keys) -> Cand:
    return Cand(text, None, frozenset(keys or [text]))


def _scene_provides(scene: sc.Scene) -> frozenset:
    return frozenset({("s", *k) for k in scene.short_keys()} | {("l", scene.signature)})


def _sig(scene: sc.Scene) -> frozenset:
    return frozenset([("sig", scene.signature)])


def _pair_key(a: sc.Obj, b: sc.Obj) -> tuple:
    return ((a.color, a.shape, a.position), (b.color, b.shape, b.position))


def crop_candidates(scene: sc.Scene, image: Image.Image, i: int) -> list[Cand]:
    """Each object's crop from ``image`` (a rendering of ``scene``), the grounding candidates of example ``i``.

    A crop shows the object and a rim of background: crops agreeing on the background, size and look answer the
    same query.
    """
    return [Cand(None, sc.crop_object(image, o), frozenset([("crop", scene.background, o.size, *o.look)]),
                 _uid(i, f"c{j}")) for j, o in enumerate(scene.objects)]
