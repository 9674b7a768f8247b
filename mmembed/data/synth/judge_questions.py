"""Stage-1 relevance questions in the style of the judge (§3.3 template, Table 13), from the world's ground truth.

The paper's judge is an expert MLLM; the kit's judge is its own stage-1 model, so the stage-1 data teaches it the
judgment: each record is the judge prompt for one (query, target) pair of a synthetic training dataset -- Table 13
instruction, ``Query:``, ``Target:``, the closing request -- answered ``yes`` or ``no`` from the accepts/provides
rule of :mod:`mmembed.data.synth.tasks`:

* ``positive``: the target is the query's ground truth -> yes;
* ``false_negative``: another example's positive that also answers the query -- the kind of candidate mining
  meets as a planted false negative (``meta["false_negative_ids"]``) -> yes;
* ``negative``: another example's positive, or a hard negative / distractor, that does not answer it -> no.

Files written by :func:`write_judge_questions` (a unit of :func:`mmembed.data.synth.world.generate`)::

    instruct/judge.json           training records (LLaVA layout, one or two images each)
    instruct/judge_heldout.json   held-out records from another random stream, for measuring the judge
    instruct/judge_images/        their images

Each record also carries ``"judge"``: the structured pair (instruction, query/target text and image path, answer,
relation, dataset), which :func:`mmembed.judge.evaluate.evaluate_judge` scores.

Answers are written as ``" yes"`` / ``" no"`` (leading space): the kit's offline vocabulary holds these words only
with a leading space, and the judge reads the single-token spelling (``mmembed.judge.answer_token_ids``), so the
token trained is the token read.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from mmembed.data.shards import encode_image
from mmembed.data.synth.tasks import DATASETS, Cand, Example, SynthDataset
from mmembed.prompts.judge import judgment_body, judgment_instruction

RELATIONS = ("positive", "false_negative", "negative")
ANSWERS = {True: " yes", False: " no"}
POOL = 16  # examples generated together: other examples' positives are the candidates of one another
FN_SHARE = 0.7  # chance to ask about a false negative when the query has one
YES_SHARE = 0.45  # otherwise: chance of the ground truth (yes) against a negative (no)


@dataclass
class JudgeQuestion:
    """One (query, target) relevance question with its ground-truth answer."""

    dataset: str
    instruction: str
    q_text: str | None
    q_image: Image.Image | None
    t_text: str | None
    t_image: Image.Image | None
    relevant: bool
    relation: str


def _question(ds: SynthDataset, ex: Example, cand: Cand, relation: str) -> JudgeQuestion:
    return JudgeQuestion(ds.name, judgment_instruction(ds.name, task=ds.task, analog=ds.analog), ex.q_text,
                         ex.q_image, cand.text, cand.image, relation != "negative", relation)


def _candidates(ex: Example, pool: list[Example]) -> dict[str, list[Cand]]:
    others = [o.pos for o in pool if o is not ex and o.pos.uid != ex.pos.uid]
    # a false negative says something else than the ground truth (same text = the same label, not a finding)
    fns = [c for c in others if ex.answered_by(c) and (c.text != ex.pos.text or c.image is not None)]
    negs = [c for c in others + ex.negatives + ex.hard if not ex.answered_by(c)]
    return {"positive": [ex.pos], "false_negative": fns, "negative": negs}


def make_judge_questions(rng: random.Random, n: int, side: int = 256,
                         datasets: tuple[SynthDataset, ...] | None = None) -> list[JudgeQuestion]:
    """``n`` questions over the (non-OOD) training datasets, round robin (see ``FN_SHARE`` and ``YES_SHARE``)."""
    datasets = datasets or tuple(d for d in DATASETS if not d.ood)
    out: list[JudgeQuestion] = []
    pools: dict[str, list[Example]] = {}
    while len(out) < n:
        for ds in datasets:
            if len(out) >= n:
                break
            pool = pools.get(ds.name)
            if not pool:
                pool = pools[ds.name] = ds.generate(rng, POOL, side)
            ex = pool.pop(rng.randrange(len(pool)))
            options = _candidates(ex, pool + [ex])
            # False negatives are rare in the world (a few percent of queries): ask about one whenever there is one
            # (most of the time), so the held-out set has enough of them to measure recall on.
            if options["false_negative"] and rng.random() < FN_SHARE:
                relation = "false_negative"
            else:
                relation = "positive" if rng.random() < YES_SHARE or not options["negative"] else "negative"
            out.append(_question(ds, ex, rng.choice(options[relation]), relation))
    return out


def to_record(q: JudgeQuestion, i: int, folder: Path, rel_dir: str, png_level: int = 1) -> dict[str, Any]:
    """The LLaVA record of a question (images saved under ``folder/rel_dir``; paths relative to ``folder``)."""
    paths: dict[str, str | None] = {}
    for role, image in (("query", q.q_image), ("target", q.t_image)):
        paths[role] = None
        if image is not None:
            rel = f"{rel_dir}/{i:06d}_{role}.png"
            (folder / rel).write_bytes(encode_image(image, "png", png_level))
            paths[role] = rel
    body = judgment_body(q.instruction, q.q_text, q.q_image is not None, q.t_text, q.t_image is not None)
    images = [p for p in (paths["query"], paths["target"]) if p is not None]
    record: dict[str, Any] = {"id": f"synth_judge_{i:06d}"}
    if images:
        record["image"] = images
    record["conversations"] = [{"from": "human", "value": body}, {"from": "gpt", "value": ANSWERS[q.relevant]}]
    record["judge"] = {"dataset": q.dataset, "instruction": q.instruction, "relation": q.relation,
                       "answer": "yes" if q.relevant else "no",
                       "query": {"text": q.q_text, "image": paths["query"]},
                       "target": {"text": q.t_text, "image": paths["target"]}}
    return record


def write_judge_questions(name: str, out: Path, seed: int, cfg: Any, png_level: int = 1,
                          datasets: tuple[SynthDataset, ...] | None = None) -> dict[str, Any]:
    """World-generation unit: ``instruct/judge.json`` and ``instruct/judge_heldout.json``; returns counts.

    Sizes: ``cfg.instruct`` training questions (as many as stage-1 conversations) and a quarter as many held out.
    ``datasets``: only these (default: every non-OOD training dataset).
    """
    folder = out / "instruct"
    result: dict[str, Any] = {}
    for split, count in (("train", cfg.instruct), ("heldout", max(8, cfg.instruct // 4))):
        rng = random.Random(f"{seed}/judge-{split}/{name}")
        questions = make_judge_questions(rng, count, cfg.image_side, datasets)
        (folder / "judge_images" / split).mkdir(parents=True, exist_ok=True)
        records = [to_record(q, i, folder, f"judge_images/{split}", png_level) for i, q in enumerate(questions)]
        fname = "judge.json" if split == "train" else "judge_heldout.json"
        (folder / fname).write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        rel = Counter(q.relation for q in questions)
        result[split] = {"questions": len(records), "by_relation": dict(sorted(rel.items())),
                         "yes": sum(q.relevant for q in questions)}
    return result
