"""The synthetic world: real formats, byte-reproducible, clean eval candidates, true planted false negatives."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mmembed.data.converters import normalize_llava
from mmembed.data.evalsets import load_mmeb_suite, load_visdoc_suite
from mmembed.data.schema import TASKS
from mmembed.data.shards import count_shards, iter_decoded
from mmembed.data.synth import DATASETS, SIZES, generate, world
from mmembed.data.synth import scenes as sc


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth_ci(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "world"
    manifest = generate(out, seed=0, size="ci", workers=1, progress=False)
    return out, manifest


def test_same_seed_gives_byte_identical_worlds_whatever_the_workers(synth_ci, tmp_path):
    out, _ = synth_ci
    before = _hashes(out)  # taken before any reader writes caches into the world
    generate(tmp_path / "again", seed=0, size="ci", workers=2, progress=False)
    assert _hashes(tmp_path / "again") == before
    # another seed changes a unit's bytes
    cfg = SIZES["ci"]
    (tmp_path / "s1" / "train").mkdir(parents=True)
    world.write_train("synth_ret_t2i", tmp_path / "s1", 1, cfg)
    assert (tmp_path / "s1/train/synth_ret_t2i-000000.tar").read_bytes() != (
        out / "train/synth_ret_t2i-000000.tar").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        generate(tmp_path / "again", seed=0, size="ci", progress=False)


def test_manifest_matches_the_files(synth_ci):
    out, manifest = synth_ci
    train = {d.name for d in DATASETS if not d.ood}
    assert set(manifest["train"]) == train
    counts = count_shards(str(out / "train"))
    assert counts["by_dataset"] == {n: manifest["train"][n]["samples"] for n in train}
    assert counts["skipped"] == {}
    for name in train:  # one dataset per shard file, several shards each
        shards = sorted((out / "train").glob(f"{name}-*.tar"))
        assert len(shards) == manifest["train"][name]["shards"] >= 2
    assert manifest["totals"]["train_samples"] == counts["samples"] == len(train) * SIZES["ci"].train_per_dataset
    assert set(manifest["totals"]["train_by_meta_task"]) == {"classification", "vqa", "retrieval", "grounding",
                                                              "visdoc"}
    subsets = json.loads((out / "eval/mmeb/subsets.json").read_text())
    assert {v["meta_task"] for v in subsets.values()} == {"classification", "vqa", "retrieval", "grounding"}
    assert {v["split"] for v in subsets.values()} == {"IND", "OOD"}
    assert all(subsets[d.name]["split"] == ("OOD" if d.ood else "IND") for d in DATASETS if d.name in subsets)


def test_training_samples_decode_with_the_declared_shape(synth_ci):
    out, _ = synth_ci
    per_dataset: dict[str, list] = {}
    for d in iter_decoded(str(out / "train")):
        per_dataset.setdefault(d.sample.dataset, []).append(d)
    for ds in DATASETS:
        if ds.ood:
            continue
        samples = per_dataset[ds.name]
        assert all(len(d.sample.negatives) == ds.negatives for d in samples), ds.name
        first = samples[0].sample
        assert first.task == ds.task in TASKS and first.query.instruction == ds.query_instruction
        assert first.positive.kind == ds.candidate_kind and first.query.kind == ds.query_kind
    page = per_dataset["synth_vd"][0]
    assert page.images["pos.png"].size == (672, 864) and page.sample.positive.kind == "document"


def test_planted_false_negatives_really_answer_the_query(synth_ci):
    out, manifest = synth_ci
    assert manifest["train"]["synth_ret_t2i"]["queries_with_false_negatives"] > 0
    samples = {d.sample.positive.id: d.sample for d in iter_decoded(str(out / "train/synth_ret_t2i-*.tar"))}
    checked = 0
    for s in samples.values():
        for fn_id in s.meta["false_negative_ids"]:
            other = samples[fn_id].meta
            assert fn_id != s.positive.id
            if " background" in s.query.text and s.query.text.startswith(("a ", "an ")):  # short caption
                words = s.query.text.split(" on a ")[0].split()[1:]  # colour texture shape
                bg = s.query.text.split(" on a ")[1].split()[0]
                looks = {(o["color"], o["texture"], o["shape"]) for o in other["objects"]}
                assert other["background"] == bg and tuple(words) in looks
                checked += 1
    assert checked > 0


def test_eval_sets_are_clean_and_disjoint_from_training(synth_ci, tmp_path):
    out, _ = synth_ci
    suite = load_mmeb_suite(out / "eval/mmeb")
    assert len(suite) == sum(d.meta_task != "visdoc" for d in DATASETS)
    for name, subset in suite.items():
        table = pq.read_table(out / f"eval/mmeb/{name}.parquet")
        assert table.column_names == list(world.MMEB_COLUMNS)
        assert len(subset.rows) == SIZES["ci"].eval_queries
        for row in subset.rows:
            assert len(row.candidates) == len(set(row.candidates)) >= 3, name
    cls = suite["synth_cls_shape"]
    assert all(len(r.candidates) == len(sc.SHAPES) for r in cls.rows)
    assert suite["synth_vqa_doc"].queries[0].kind == "document"
    # the ground-truth text of a label task is the scene's attribute: check one against the picture
    assert {cls.candidates[r.candidates[0]].text for r in cls.rows} <= set(sc.SHAPES)
    visdoc = load_visdoc_suite(out / "eval/visdoc", image_dir=tmp_path)
    assert {n: v.split for n, v in visdoc.items()} == {"synth_vidore": "IND", "synth_slides": "OOD"}
    for v in visdoc.values():
        assert all(len(rel) == 1 for rel in v.qrels.values()) and len(v.corpus) == 3 * SIZES["ci"].visdoc_companies
    train_images = set()
    for d in iter_decoded(str(out / "train")):
        train_images.update(hashlib.sha1(im.tobytes()).hexdigest() for im in d.images.values())
    from PIL import Image

    eval_images = {hashlib.sha1(Image.open(p).convert("RGB").tobytes()).hexdigest()
                   for p in (out / "eval/mmeb/images").rglob("*.png")}
    assert train_images and eval_images and not train_images & eval_images


def test_stage1_instruct_data_is_valid_llava(synth_ci):
    out, manifest = synth_ci
    report = normalize_llava(out / "instruct/llava.json")
    assert report.skipped == {} and len(report.records) == SIZES["ci"].instruct == manifest["instruct"]["conversations"]
    boxes = [t["value"] for r in report.records for t in r["conversations"] if "<box>" in t["value"]]
    for box in boxes:
        coords = json.loads(box.split("<box>")[1].split("</box>")[0])[0]
        assert all(0 <= v <= 1000 for v in coords) and coords[0] < coords[2] and coords[1] < coords[3]


def test_scene_rules_that_the_generators_rely_on():
    rng = random.Random(0)
    for _ in range(200):
        scene = sc.random_scene(rng, (2, 5))
        phrases = [sc.referring_phrase(scene, o) for o in scene.objects]
        assert len(set(phrases)) == len(phrases)  # every object has a unique referring phrase
        edited, text = sc.edit_scene(scene, rng)
        assert edited.signature != scene.signature and text
        assert sc.rejitter(scene, rng).signature == scene.signature
    for ds in DATASETS:  # hard negatives never answer their query; the positive always does
        for ex in ds.generate(random.Random(1), 6, 64):
            assert ex.answered_by(ex.pos), ds.name
            assert not any(ex.answered_by(c) for c in ex.negatives + ex.hard), ds.name


# ------------------------------------------------------------------------------------- planted false negatives
def _planted(name: str, rate: float, n: int = 24) -> tuple[list, int]:
    from mmembed.data.synth.tasks import BY_NAME, plant_false_negatives

    ds = BY_NAME[name]
    examples = ds.generate(random.Random(f"t/{name}"), n, 64)
    return plant_false_negatives(examples, random.Random(f"fn/{name}"), rate)


def test_false_negatives_are_planted_in_every_training_set_and_really_answer():
    from mmembed.data.synth.tasks import Cand

    with_fn = []
    for ds in DATASETS:
        if ds.ood:
            continue
        examples, planted = _planted(ds.name, 0.5)
        assert planted > 0, ds.name
        fns = world.false_negative_ids(examples, ds.name)
        by_id: dict[str, Cand] = {f"{ds.name}/{ex.pos.uid}": ex.pos for ex in examples}
        pairs = [(ex, by_id[f]) for ex, ids in zip(examples, fns) for f in ids]
        for ex, cand in pairs:  # every recorded false negative is a valid positive of its query, not the positive
            assert ex.answered_by(cand) and cand.uid != ex.pos.uid, ds.name
        with_fn.append(ds.name) if pairs else None
        for ex in examples:  # a planted sibling's false negatives include the example it was planted from
            if ex.meta.get("planted") == "sibling":
                source = next(e for e in examples if e.q_uid == ex.meta["planted_from"])
                assert ex.answered_by(source.pos)
    assert len(with_fn) >= 10, with_fn


def test_rate_zero_plants_nothing_and_the_rate_is_a_dose():
    from mmembed.data.synth.tasks import BY_NAME, plant_false_negatives

    examples = BY_NAME["synth_cls_color"].generate(random.Random("t"), 40, 32)
    same, planted = plant_false_negatives(examples, random.Random("fn"), 0.0)
    assert planted == 0 and [e.pos for e in same] == [e.pos for e in examples]
    counts = [_planted("synth_ret_i2t", rate, n=60)[1] for rate in (0.1, 0.4, 0.8)]
    assert counts[0] < counts[1] < counts[2]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        plant_false_negatives(examples, random.Random("fn"), 1.5)


def test_world_records_planted_false_negatives_and_eval_stays_clean(synth_ci):
    out, manifest = synth_ci
    assert manifest["false_negative_rate"] == world.DEFAULT_FALSE_NEGATIVE_RATE
    planted = sum(e["planted_false_negatives"] for e in manifest["train"].values())
    assert planted == manifest["totals"]["planted_false_negatives"]
    seen = {}
    for d in iter_decoded(str(out / "train")):
        if d.sample.meta.get("planted"):
            seen[d.sample.id] = d.sample
    assert len(seen) == planted
    # paraphrases never reach an evaluation set: a label subset's candidates are exactly its vocabulary
    suite = load_mmeb_suite(out / "eval/mmeb")
    for ds in DATASETS:
        if ds.vocabulary is not None and ds.name in suite:
            texts = {c.text for c in suite[ds.name].candidates}
            assert texts <= set(ds.vocabulary), (ds.name, texts - set(ds.vocabulary))
