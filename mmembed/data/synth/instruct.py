"""Stage-1 instruction data: captioning, VQA, grounding, classification and document QA conversations.

Written in the LLaVA layout (``[{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}]``) with
InternVL-style grounding answers (``<ref>phrase</ref><box>[[x0, y0, x1, y1]]</box>``, coordinates in 0..1000).
"""

from __future__ import annotations

import random
from typing import Any

from PIL import Image

from mmembed.data.synth import documents as docs
from mmembed.data.synth import scenes as sc

KINDS = ("caption", "vqa", "grounding", "classification", "document")
_WEIGHTS = (0.25, 0.3, 0.25, 0.1, 0.1)


def _turn(human: str, gpt: str, first: bool) -> list[dict[str, str]]:
    return [{"from": "human", "value": ("<image>\n" if first else "") + human}, {"from": "gpt", "value": gpt}]


def _box(obj: sc.Obj, side: int) -> str:
    x0, y0, x1, y1 = obj.bbox(side)
    return "[[" + ", ".join(str(round(v * 1000 / side)) for v in (x0, y0, x1, y1)) + "]]"


def make_conversation(rng: random.Random, kind: str, side: int = 256) -> tuple[Image.Image, list[dict[str, str]]]:
    """One image and its conversation of the given kind (one of :data:`KINDS`)."""
    if kind == "document":
        company = docs.make_company(rng, set())
        qs = rng.sample(docs.questions(company), 2)
        page_type = qs[0].page_type
        qs = [q for q in qs if q.page_type == page_type]
        conv: list[dict[str, str]] = []
        for j, q in enumerate(qs):
            conv += _turn(f"{q.text} Answer with a word or a number.", q.answer, j == 0)
        return docs.render_page(company, page_type), conv
    scene = sc.random_scene(rng, (1, 1) if kind == "classification" else (1, 4))
    image = sc.render(scene, side)
    if kind == "caption":
        if len(scene.objects) == 1 and rng.random() < 0.5:
            return image, _turn("Describe the image briefly.", sc.short_caption(scene, scene.objects[0]), True)
        return image, _turn("Describe the image in detail.", sc.long_caption(scene), True)
    if kind == "classification":
        obj = scene.objects[0]
        return image, _turn("What shape is shown in the image? Answer with one word.", obj.shape, True)
    if kind == "grounding":
        obj = rng.choice(scene.objects)
        ref = sc.referring_phrase(scene, obj)
        ask = f"Please provide the bounding box coordinate of the region this sentence describes: <ref>{ref}</ref>"
        return image, _turn(ask, f"<ref>{ref}</ref><box>{_box(obj, side)}</box>", True)
    if kind == "vqa":
        obj = rng.choice(scene.objects)
        qa = [
            (f"How many {sc.PLURALS[obj.shape]} are there?", sc.COUNT_WORDS[scene.count(obj.shape)]),
            (f"Where is the {obj.color} {obj.texture} {obj.shape}?", sc.POSITION_PHRASES[obj.position]),
            ("What is the background color of the image?", scene.background),
        ]
        rng.shuffle(qa)
        conv = []
        for j, (q, a) in enumerate(qa[: rng.randint(1, 3)]):
            conv += _turn(q, a, j == 0)
        return image, conv
    raise ValueError(f"unknown conversation kind {kind!r}; use one of {KINDS}")


def make_instruct(rng: random.Random, n: int, side: int = 256) -> list[tuple[str, Image.Image, dict[str, Any]]]:
    """``n`` records as (kind, image, LLaVA record without the image path)."""
    out = []
    for i in range(n):
        kind = rng.choices(KINDS, weights=_WEIGHTS)[0]
        image, conv = make_conversation(rng, kind, side)
        out.append((kind, image, {"id": f"synth_{kind}_{i:06d}", "conversations": conv}))
    return out
