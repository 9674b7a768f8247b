"""The synthetic datasets: one generator per dataset, each imitating a real training/eval set.

A generator returns :class:`Example` s. Besides the query and positive, every example says which semantic keys
its query *accepts* and which keys each candidate *provides*; a candidate answers a query iff the sets intersect.
That one rule picks clean eval distractors (never a second right answer) and lists the training samples whose
positives also answer a query (``meta["false_negative_ids"]``), so rule-based and judge-based mining can be
compared against the truth.

Planted false negatives (:func:`plant_false_negatives`, the world's ``false_negative_rate``): every training dataset
can give a candidate that also answers other queries -- a paraphrased label or answer (classification, VQA) or a
second view of the same thing (another rendering of a scene, a second caption of it, another crop of the object,
another print of the page) in place of a fresh example. Such a candidate is a valid positive that a rule-based miner
takes for a negative. The generators describe how (``Example.variant`` / ``Example.sibling``) without drawing from
their own random stream, so a rate of 0 leaves the world byte-identical to one generated without the option.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from mmembed.data.synth import documents as docs
from mmembed.data.synth import scenes as sc
from mmembed.data.synth.examples import (
    Cand,
    Example,
    Generator,
    _pair_key,
    _scene_provides,
    _sig,
    _t,
    _uid,
    crop_candidates,
)
from mmembed.data.synth.planting import (
    PARAPHRASES,
    _doc_vqa_sibling,
    _grounding_sibling,
    _i2i_sibling,
    _i2t_sibling,
    _it2i_sibling,
    _page_sibling,
    _paraphrase,
    _swap_sibling,
    _t2i_sibling,
    plant_false_negatives,
)
from mmembed.prompts.embedding import instructions_for


@dataclass(frozen=True)
class SynthDataset:
    """A synthetic dataset: its labels, the paper-style instructions and its generator.

    Attributes:
        ood: Eval-only (no training shards), like MMEB's out-of-distribution subsets.
        vocabulary: Fixed candidate texts (classification / VQA answer sets); else distractors are other
            examples' positives.
        negatives: Number of hard negatives every training sample of this dataset carries.
        analog: The real dataset it imitates.
    """

    name: str
    task: str
    meta_task: str
    query_instruction: str
    target_instruction: str
    generate: Generator
    ood: bool = False
    vocabulary: tuple[str, ...] | None = None
    negatives: int = 0
    query_kind: str = "natural"
    candidate_kind: str = "natural"
    analog: str = ""


# ------------------------------------------------------------------------------------------------- classification
def _gen_label(attr: str, n_objects: tuple[int, int]) -> Generator:
    def gen(rng: random.Random, n: int, side: int) -> list[Example]:
        out = []
        for i in range(n):
            scene = sc.random_scene(rng, n_objects)
            if len(scene.objects) == 1:  # a lone object is shown big and centred, like a classification photo
                obj = replace(scene.objects[0], position="center", scale=rng.uniform(1.6, 2.1))
                scene = sc.Scene(scene.background, (obj,), scene.tint)
            label = scene.background if attr == "background" else getattr(scene.objects[0], attr)
            out.append(Example(None, sc.render(scene, side), _t(label), frozenset([label]), meta=scene.to_meta(),
                               q_uid=_uid(i, "q"), variant=_paraphrase(label, attr)))
        return out

    return gen


# ------------------------------------------------------------------------------------------------------------ VQA
def _gen_vqa_count(rng: random.Random, n: int, side: int) -> list[Example]:
    out = []
    for i in range(n):
        shape = rng.choice(sc.SHAPES)
        k = rng.choice((1, 1, 2, 2, 3, 3, 4, 5))
        bg = rng.choice(list(sc.BACKGROUNDS))
        slots = rng.sample(list(sc.POSITIONS), rng.randint(k, 5))
        others = [s for s in sc.SHAPES if s != shape]
        objs = [sc.random_object(rng, p, bg, shape=shape if j < k else rng.choice(others)) for j, p in enumerate(slots)]
        scene = sc.Scene(bg, tuple(objs), rng.randint(-8, 8))
        answer = sc.COUNT_WORDS[k]
        out.append(Example(f"How many {sc.PLURALS[shape]} are there?", sc.render(scene, side), _t(answer),
                           frozenset([answer]), meta=scene.to_meta(), q_uid=_uid(i, "q"),
                           variant=_paraphrase(answer, "count")))
    return out


def _gen_vqa_color(rng: random.Random, n: int, side: int) -> list[Example]:
    out = []
    for i in range(n):
        scene = sc.random_scene(rng, (2, 4))
        shapes = [o.shape for o in scene.objects]
        target = rng.choice([o for o in scene.objects if shapes.count(o.shape) == 1] or list(scene.objects))
        ref = sc.referring_phrase(scene, target) if shapes.count(target.shape) > 1 else f"the {target.shape}"
        if target.color in ref.split():  # "the red circle on the left" would give the answer away
            ref = f"the {target.texture} {target.shape} {sc.POSITION_PHRASES[target.position]}"
        out.append(Example(f"What color is {ref}?", sc.render(scene, side), _t(target.color),
                           frozenset([target.color]), meta=scene.to_meta(), q_uid=_uid(i, "q"),
                           variant=_paraphrase(target.color, "color")))
    return out


def _gen_vqa_position(rng: random.Random, n: int, side: int) -> list[Example]:
    out = []
    for i in range(n):
        scene = sc.random_scene(rng, (2, 4))
        target = rng.choice(scene.objects)
        ref = sc.referring_phrase(scene, target)
        if target.position in ref:  # unique looks make a position-free phrase always possible
            ref = f"the {target.color} {target.texture} {target.shape}"
        out.append(Example(f"Where is {ref}?", sc.render(scene, side), _t(target.position),
                           frozenset([target.position]), meta=scene.to_meta(), q_uid=_uid(i, "q")))
    return out


def _alternatives(q: docs.Question, rng: random.Random) -> list[str]:
    if q.kind == "city":
        pool = [c for c in docs.CITIES if c != q.answer]
    elif q.kind == "ceo":
        pool = [p for p in docs.PEOPLE if p != q.answer]
    elif q.kind == "top_product":
        pool = [p for p in docs.PRODUCTS if p != q.answer]
    else:
        v = int(q.answer)
        pool = [str(v + d) for d in (-20, -10, 10, 20, 30) if v + d > 0]
    return rng.sample(pool, min(2, len(pool)))


def _companies(rng: random.Random, n: int) -> list[docs.Company]:
    taken: set[str] = set()
    return [docs.make_company(rng, taken) for _ in range(n)]


def _gen_vqa_doc(rng: random.Random, n: int, side: int) -> list[Example]:
    out = []
    for i, company in enumerate(_companies(rng, n)):
        q = rng.choice(docs.questions(company))
        page = docs.render_page(company, q.page_type)
        hard = [_t(a) for a in _alternatives(q, rng)]
        out.append(Example(q.text, page, _t(q.answer), frozenset([q.answer]), hard=hard,
                           meta={"company": company.name, "page_type": q.page_type, "fact": q.kind},
                           q_uid=_uid(i, "q"), sibling=_doc_vqa_sibling(company, q, hard)))
    return out


# ------------------------------------------------------------------------------------------------------ retrieval
def _twin(rng: random.Random, prev: list[tuple[sc.Scene, sc.Obj]], p: float) -> tuple[str, sc.Obj] | None:
    """Planted false negatives: with probability ``p`` the next scene reuses an earlier (background, look)."""
    if prev and rng.random() < p:
        scene, obj = rng.choice(prev[-50:])
        return scene.background, obj
    return None


def _scene_with(rng: random.Random, n_objects: tuple[int, int], twin: tuple[str, sc.Obj] | None) -> sc.Scene:
    if twin is None:
        return sc.random_scene(rng, n_objects)
    bg, obj = twin
    scene = sc.random_scene(rng, n_objects, background=bg)
    objs = list(scene.objects)
    k = rng.randrange(len(objs))
    objs[k] = sc.random_object(rng, objs[k].position, bg, color=obj.color, texture=obj.texture, shape=obj.shape)
    objs = [o for j, o in enumerate(objs) if j == k or o.look != obj.look]
    return sc.Scene(bg, tuple(objs), scene.tint)


def _gen_t2i(rng: random.Random, n: int, side: int) -> list[Example]:
    out, prev = [], []
    for i in range(n):
        scene = _scene_with(rng, (1, 4), _twin(rng, prev, 0.2))
        obj = rng.choice(scene.objects)
        prev.append((scene, obj))
        if rng.random() < 0.6:
            text, accepts = sc.short_caption(scene, obj), frozenset([("s", scene.background, *obj.look)])
        else:
            text, accepts = sc.long_caption(scene), frozenset([("l", scene.signature)])
        pos = Cand(None, sc.render(scene, side), _scene_provides(scene), _uid(i, "p"))
        out.append(Example(text, None, pos, accepts, meta=scene.to_meta(), q_uid=_uid(i, "q"),
                           sibling=_t2i_sibling(scene, side)))
    return out


def _gen_i2t(rng: random.Random, n: int, side: int) -> list[Example]:
    out, prev = [], []
    for i in range(n):
        scene = _scene_with(rng, (1, 4), _twin(rng, prev, 0.2))
        obj = rng.choice(scene.objects)
        prev.append((scene, obj))
        if rng.random() < 0.5:
            pos = _t(sc.short_caption(scene, obj), ("s", scene.background, *obj.look))
        else:
            pos = _t(sc.long_caption(scene), ("l", scene.signature))
        out.append(Example(None, sc.render(scene, side), pos, _scene_provides(scene), meta=scene.to_meta(),
                           q_uid=_uid(i, "q"), sibling=_i2t_sibling(scene, pos.text or "", side)))
    return out


def _gen_it2i(rng: random.Random, n: int, side: int) -> list[Example]:
    out = []
    for i in range(n):
        ref = sc.random_scene(rng, (2, 4))
        target, text = sc.edit_scene(ref, rng)
        pos = Cand(None, sc.render(sc.rejitter(target, rng), side), _sig(target), _uid(i, "p"))
        unchanged = Cand(None, sc.render(sc.rejitter(ref, rng), side), _sig(ref), _uid(i, "n0"))
        hard = [unchanged]
        for h in range(2):
            other, _ = sc.edit_scene(ref, rng)
            hard.append(Cand(None, sc.render(sc.rejitter(other, rng), side), _sig(other), _uid(i, f"h{h}")))
        ex = Example(text, sc.render(ref, side), pos, _sig(target), negatives=[unchanged], hard=hard,
                     meta={"reference": ref.to_meta(), "target": target.to_meta(), "edit": text}, q_uid=_uid(i, "q"))
        ex.hard = [c for c in ex.hard if not ex.answered_by(c)]
        assert not ex.answered_by(unchanged), "every edit changes the scene"
        ex.sibling = _it2i_sibling(ex, ref, target, side)
        out.append(ex)
    return out


def _gen_i2i(rng: random.Random, n: int, side: int) -> list[Example]:
    out = []
    for i in range(n):
        scene = sc.random_scene(rng, (1, 4))
        pos = Cand(None, sc.render(sc.rejitter(scene, rng, 1.5), side), _sig(scene), _uid(i, "p"))
        changed, _ = sc.edit_scene(scene, rng, kind=rng.choice(["color", "shape"]))
        neg = Cand(None, sc.render(sc.rejitter(changed, rng), side), _sig(changed), _uid(i, "n0"))
        out.append(Example(None, sc.render(scene, side), pos, _sig(scene), negatives=[neg], hard=[neg],
                           meta=scene.to_meta(), q_uid=_uid(i, "q"), sibling=_i2i_sibling(scene, neg, side)))
    return out


def _gen_swap(rng: random.Random, n: int, side: int) -> list[Example]:
    out = []
    for i in range(n):
        while True:
            scene = sc.random_scene(rng, (2, 3))
            if len({o.color for o in scene.objects}) == len(scene.objects) and len(
                {o.shape for o in scene.objects}
            ) == len(scene.objects):
                break
        a, b = sorted(rng.sample(range(len(scene.objects)), 2))
        oa, ob = scene.objects[a], scene.objects[b]
        swapped = (replace(oa, color=ob.color), replace(ob, color=oa.color))
        shape = rng.choice([s for s in sc.SHAPES if s not in {o.shape for o in scene.objects}])
        replaced = (replace(oa, shape=shape), ob) if rng.random() < 0.5 else (oa, replace(ob, shape=shape))
        accepts = frozenset(("p", k) for k in scene.pair_keys())
        pos = _t(sc.pair_caption(oa, ob), ("p", _pair_key(oa, ob)))
        negs = [_t(sc.pair_caption(*x), ("p", _pair_key(*x))) for x in (swapped, replaced)]
        out.append(Example(None, sc.render(scene, side), pos, accepts, negatives=negs, hard=list(negs),
                           meta=scene.to_meta(), q_uid=_uid(i, "q"), sibling=_swap_sibling(scene, oa, ob, negs, side)))
    return out


POSTER_NAMES = ("Aurora", "Beacon", "Cascade", "Drift", "Ember", "Fable", "Glimmer", "Harbor", "Ivy", "Juniper")


def _gen_t2it(rng: random.Random, n: int, side: int) -> list[Example]:
    out = []
    for i in range(n):
        scene = sc.random_scene(rng, (1, 3))
        name = rng.choice(POSTER_NAMES)
        obj = rng.choice(scene.objects)
        pos = Cand(f'Poster "{name}"', sc.render(scene, side), frozenset((name, *o.look) for o in scene.objects),
                   _uid(i, "p"))
        text = f'the poster "{name}" showing {sc.an(obj.color)} {obj.texture} {obj.shape}'
        out.append(Example(text, None, pos, frozenset([(name, *obj.look)]), meta={**scene.to_meta(), "title": name},
                           q_uid=_uid(i, "q")))
    return out


# ------------------------------------------------------------------------------------------------------ grounding
def _gen_grounding(point: bool) -> Generator:
    def gen(rng: random.Random, n: int, side: int) -> list[Example]:
        out = []
        for i in range(n):
            scene = sc.random_scene(rng, (2, 4))
            image = sc.render(scene, side)
            k = rng.randrange(len(scene.objects))
            target = scene.objects[k]
            text = (f"Which object is {sc.POSITION_PHRASES[target.position]}?" if point
                    else sc.referring_phrase(scene, target))
            crops = crop_candidates(scene, image, i)
            others = [c for j, c in enumerate(crops) if j != k]
            out.append(Example(text, image, crops[k], crops[k].provides, negatives=[rng.choice(others)],
                               hard=others, meta={**scene.to_meta(), "target": k}, q_uid=_uid(i, "q"),
                               sibling=_grounding_sibling(scene, k, text, crops[k].provides, side)))
        return out

    return gen


# ---------------------------------------------------------------------------------------------- visual documents
def _gen_t2vd(rng: random.Random, n: int, side: int) -> list[Example]:
    """Text -> document page; about one question per page, so a few pages answer two samples' questions."""
    out: list[Example] = []
    pages: dict[tuple[str, str], Cand] = {}
    companies = _companies(rng, max(1, (n + 2) // 3))
    for i in range(n):
        company = companies[i % len(companies)]
        q = rng.choice(docs.questions(company))
        key = (company.name, q.page_type)
        if key not in pages:
            image = docs.render_page(company, q.page_type)
            pages[key] = Cand(None, image, frozenset([("page", *key)]), f"page_{company.name}_{q.page_type}")
        out.append(Example(q.text, None, pages[key], frozenset([("page", *key)]),
                           meta={"company": company.name, "page_type": q.page_type, "answer": q.answer},
                           q_uid=_uid(i, "q"), sibling=_page_sibling(company, q.page_type)))
    return out


def _paper(dataset: str) -> tuple[str, str]:
    """The (query, target) instructions of the public dataset a synthetic one stands in for (Tables 11-12)."""
    return instructions_for(dataset)


_CLS_T = _paper("VOC2007")[1]  # "Represent the given text."

# Instructions come from the paper's tables via each dataset's public analog; the few synthetic-only ones (colour and
# texture classification, posters) are written in the same style and say so.
DATASETS: tuple[SynthDataset, ...] = (
    SynthDataset("synth_cls_shape", "i2t", "classification", *_paper("VOC2007"),
                 _gen_label("shape", (1, 1)), vocabulary=sc.SHAPES, analog="VOC2007"),
    SynthDataset("synth_cls_scene", "i2t", "classification", *_paper("SUN397"),
                 _gen_label("background", (1, 4)), vocabulary=tuple(sc.BACKGROUNDS), analog="SUN397"),
    SynthDataset("synth_cls_color", "i2t", "classification", "Represent the given image for color classification.",
                 _CLS_T, _gen_label("color", (1, 1)), vocabulary=tuple(sc.COLORS), analog="ImageNet-1K"),
    SynthDataset("synth_cls_texture", "i2t", "classification",
                 "Represent the given image for texture classification.", _CLS_T, _gen_label("texture", (1, 1)),
                 ood=True, vocabulary=sc.TEXTURES, analog="ImageNet-R"),
    SynthDataset("synth_vqa_count", "it2t", "vqa", *_paper("Visual7W"), _gen_vqa_count,
                 vocabulary=sc.COUNT_WORDS[1:], analog="Visual7W"),
    SynthDataset("synth_vqa_color", "it2t", "vqa", *_paper("OK-VQA"), _gen_vqa_color, vocabulary=tuple(sc.COLORS),
                 analog="OK-VQA"),
    SynthDataset("synth_vqa_doc", "it2t", "vqa", *_paper("DocVQA"), _gen_vqa_doc, query_kind="document",
                 analog="DocVQA"),
    SynthDataset("synth_vqa_position", "it2t", "vqa", *_paper("GQA"), _gen_vqa_position, ood=True,
                 vocabulary=tuple(sc.POSITIONS), analog="GQA"),
    SynthDataset("synth_ret_t2i", "t2i", "retrieval", *_paper("MSCOCO_t2i"), _gen_t2i, analog="MSCOCO_t2i"),
    SynthDataset("synth_ret_i2t", "i2t", "retrieval", *_paper("MSCOCO_i2t"), _gen_i2t, analog="MSCOCO_i2t"),
    SynthDataset("synth_ret_it2i", "it2i", "retrieval", *_paper("CIRR"), _gen_it2i, negatives=1, analog="CIRR"),
    SynthDataset("synth_ret_i2i", "i2i", "retrieval", *_paper("NIGHTS"), _gen_i2i, negatives=1, analog="NIGHTS"),
    SynthDataset("synth_ret_swap", "i2t", "retrieval", *_paper("SugarCrepe"), _gen_swap, negatives=2,
                 analog="SugarCrepe"),
    SynthDataset("synth_ret_t2it", "t2it", "retrieval",
                 "Find a related image and text content from a poster that matches the provided query.",
                 _paper("EDIS")[1], _gen_t2it, ood=True, analog="EDIS"),
    SynthDataset("synth_ground_ref", "it2i", "grounding", *_paper("RefCOCO"), _gen_grounding(point=False),
                 negatives=1, analog="RefCOCO"),
    SynthDataset("synth_ground_point", "it2i", "grounding", *_paper("Visual7W-Pointing"),
                 _gen_grounding(point=True), ood=True, analog="Visual7W-Pointing"),
    SynthDataset("synth_vd", "t2vd", "visdoc", *_paper("ColPali"), _gen_t2vd, candidate_kind="document",
                 analog="ColPali"),
)

BY_NAME = {d.name: d for d in DATASETS}

__all__ = ["BY_NAME", "DATASETS", "PARAPHRASES", "Cand", "Example", "Generator", "SynthDataset",
           "plant_false_negatives"]
