"""Planted false negatives (the world's ``false_negative_rate``): how each training set gets a second right answer.

A paraphrased label or answer (classification, VQA: :data:`PARAPHRASES`), or a *sibling* example about the same
thing as an earlier one -- another rendering of its scene, a second caption, another crop of the object, a second
print of the page -- whose positive also answers the earlier query (and the other way round). The generators in
:mod:`mmembed.data.synth.tasks` attach these as ``Example.variant`` / ``Example.sibling`` without drawing from their
own random stream; :func:`plant_false_negatives` draws from the planting's own stream, so a rate of 0 leaves the
world unchanged.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace

from mmembed.data.synth import documents as docs
from mmembed.data.synth import scenes as sc
from mmembed.data.synth.examples import Cand, Example, _pair_key, _scene_provides, _sig, _t, _uid, crop_candidates

# Paraphrases of a label or short answer: another text that answers the same query (a false negative for every other
# query with that label once it is in the corpus). Each template gives one distinct candidate per label.
PARAPHRASES: dict[str, tuple[str, ...]] = {
    "shape": ("a {} shape", "the {}"),
    "background": ("a {} scene", "{} background"),
    "color": ("the colour {}", "{} coloured"),
    "texture": ("a {} pattern", "{} texture"),
    "count": ("there are {}", "{} in total"),
    "answer": ("it is {}", "the answer is {}"),
}


def _paraphrase(label: str, kind: str) -> Callable[[random.Random], Cand]:
    def variant(rng: random.Random) -> Cand:
        return _t(rng.choice(PARAPHRASES[kind]).format(label), label)

    return variant


def _caption(scene: sc.Scene, rng: random.Random) -> tuple[str, tuple]:
    """A random caption of ``scene`` and the key it provides (short caption of one object, or the long one)."""
    if rng.random() < 0.5:
        obj = rng.choice(scene.objects)
        return sc.short_caption(scene, obj), ("s", scene.background, *obj.look)
    return sc.long_caption(scene), ("l", scene.signature)


def _t2i_sibling(scene: sc.Scene, side: int) -> Callable[[random.Random, int], Example]:
    """Another caption of the same scene, whose positive is another rendering of it (a second photo)."""
    def sibling(rng: random.Random, i: int) -> Example:
        text, key = _caption(scene, rng)
        pos = Cand(None, sc.render(sc.rejitter(scene, rng), side), _scene_provides(scene), _uid(i, "p"))
        return Example(text, None, pos, frozenset([key]), meta=scene.to_meta(), q_uid=_uid(i, "q"))

    return sibling


def _i2t_sibling(scene: sc.Scene, taken: str, side: int) -> Callable[[random.Random, int], Example]:
    """Another rendering of the same scene, whose positive is a second caption of it."""
    def sibling(rng: random.Random, i: int) -> Example:
        for _ in range(8):  # another text than the original positive (the same text would be the same candidate)
            text, key = _caption(scene, rng)
            if text != taken:
                break
        image = sc.render(sc.rejitter(scene, rng), side)
        return Example(None, image, _t(text, key), _scene_provides(scene), meta=scene.to_meta(), q_uid=_uid(i, "q"))

    return sibling


def _it2i_sibling(ex: Example, ref: sc.Scene, target: sc.Scene, side: int) -> Callable[[random.Random, int], Example]:
    """The same edit asked of another rendering of the reference; the positive is another rendering of the target."""
    def sibling(rng: random.Random, i: int) -> Example:
        pos = Cand(None, sc.render(sc.rejitter(target, rng), side), _sig(target), _uid(i, "p"))
        return Example(ex.q_text, sc.render(sc.rejitter(ref, rng), side), pos, ex.accepts,
                       negatives=list(ex.negatives), hard=list(ex.hard), meta=dict(ex.meta), q_uid=_uid(i, "q"))

    return sibling


def _i2i_sibling(scene: sc.Scene, neg: Cand, side: int) -> Callable[[random.Random, int], Example]:
    """Two more renderings of the same scene: query and positive."""
    def sibling(rng: random.Random, i: int) -> Example:
        pos = Cand(None, sc.render(sc.rejitter(scene, rng, 1.5), side), _sig(scene), _uid(i, "p"))
        return Example(None, sc.render(sc.rejitter(scene, rng), side), pos, _sig(scene), negatives=[neg],
                       hard=[neg], meta=scene.to_meta(), q_uid=_uid(i, "q"))

    return sibling


def _swap_sibling(scene: sc.Scene, oa: sc.Obj, ob: sc.Obj, negs: list[Cand], side: int
                  ) -> Callable[[random.Random, int], Example]:
    """Another rendering of the scene; the positive names the same pair in the other order (same meaning)."""
    def sibling(rng: random.Random, i: int) -> Example:
        first, second = sc.pair_caption(oa, ob).split(" and ", 1)
        pos = _t(f"{second} and {first}", ("p", _pair_key(oa, ob)))
        accepts = frozenset(("p", k) for k in scene.pair_keys())
        return Example(None, sc.render(sc.rejitter(scene, rng), side), pos, accepts, negatives=list(negs),
                       hard=list(negs), meta=scene.to_meta(), q_uid=_uid(i, "q"))

    return sibling


def _grounding_sibling(scene: sc.Scene, k: int, text: str, provides: frozenset, side: int
                       ) -> Callable[[random.Random, int], Example]:
    """The same question on another rendering of the scene; the positive is the object's crop from that rendering."""
    def sibling(rng: random.Random, i: int) -> Example:
        jittered = sc.rejitter(scene, rng)
        image = sc.render(jittered, side)
        crops = crop_candidates(jittered, image, i)
        others = [c for j, c in enumerate(crops) if j != k]
        return Example(text, image, crops[k], provides, negatives=[rng.choice(others)], hard=others,
                       meta={**scene.to_meta(), "target": k}, q_uid=_uid(i, "q"))

    return sibling


def _doc_vqa_sibling(company: docs.Company, q: docs.Question, hard: list[Cand]
                     ) -> Callable[[random.Random, int], Example]:
    """The same question on a second print of the page; the positive is the answer in other words."""
    def sibling(rng: random.Random, i: int) -> Example:
        page = docs.render_page(company, q.page_type, size=rng.choice(REPRINT_SIZES))
        return Example(q.text, page, _paraphrase(q.answer, "answer")(rng), frozenset([q.answer]), hard=list(hard),
                       meta={"company": company.name, "page_type": q.page_type, "fact": q.kind}, q_uid=_uid(i, "q"))

    return sibling


# Sizes of a second print of a page (another scan of the same document): same facts, other pixels and tiling.
REPRINT_SIZES = ((608, 784), (736, 944))


def _page_sibling(company: docs.Company, page_type: str) -> Callable[[random.Random, int], Example]:
    """Another question on the same page; the positive is a second print of that page."""
    def sibling(rng: random.Random, i: int) -> Example:
        q = rng.choice([x for x in docs.questions(company) if x.page_type == page_type])
        size = rng.choice(REPRINT_SIZES)
        key = ("page", company.name, page_type)
        pos = Cand(None, docs.render_page(company, page_type, size=size), frozenset([key]),
                   f"page_{company.name}_{page_type}_{size[0]}")
        return Example(q.text, None, pos, frozenset([key]),
                       meta={"company": company.name, "page_type": page_type, "answer": q.answer},
                       q_uid=_uid(i, "q"))

    return sibling


def plant_false_negatives(examples: list[Example], rng: random.Random, rate: float) -> tuple[list[Example], int]:
    """Give a share ``rate`` of the examples a candidate that is also a valid positive of other queries.

    A paraphrased label or answer replaces the positive of an example that has a ``variant`` (it then answers every
    query with that label); an example that has a ``sibling`` is replaced by a new example about the same thing as
    an earlier one (another rendering, caption, crop or print), so each of the two positives answers both queries.
    ``rng`` is the planting's own stream, so the examples' content is unchanged where nothing is planted.

    Args:
        examples: A dataset's training examples, in order (not modified).
        rng: The planting's random stream.
        rate: Probability, per example, of planting.

    Returns:
        The new list of examples and how many were planted.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"false_negative_rate must be in [0, 1], got {rate}")
    out, planted = list(examples), 0
    if rate == 0.0:
        return out, 0
    for i, ex in enumerate(examples):
        if rng.random() >= rate:
            continue
        if ex.variant is not None:
            out[i] = replace(ex, pos=ex.variant(rng), meta={**ex.meta, "planted": "paraphrase"})
            planted += 1
        elif i > 0:
            j = rng.randrange(max(0, i - 50), i)  # a recent example, like _twin: near in the shard order
            if out[j].sibling is None:
                continue
            new = out[j].sibling(rng, i)
            new.meta = {**new.meta, "planted": "sibling", "planted_from": out[j].q_uid}
            new.sibling = out[j].sibling  # a later example may plant from this one too
            out[i] = new
            planted += 1
    return out, planted

