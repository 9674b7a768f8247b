"""Converters on small fixtures written in each exact source format; the shards are read back and checked."""

from __future__ import annotations

import json
import tarfile

import pyarrow as pa
import pytest

from mmembed.data import cli
from mmembed.data.converters import (
    jsonl_to_shards,
    mmeb_train_to_shards,
    normalize_llava,
    resolve_instructions,
    visdoc_beir_to_shards,
    visdoc_pairs_to_shards,
)
from mmembed.data.shards import iter_decoded
from mmembed.prompts.embedding import instructions_for
from tests.fixtures_data import IMAGE_STRUCT, jpeg_bytes, png_bytes, write_beir, write_parquet


def _samples(paths):
    return [d.sample for d in iter_decoded(paths)]


def test_mmeb_train_classification_and_cirr(tmp_path):
    img = tmp_path / "images"
    img.mkdir()
    (img / "a.jpg").write_bytes(jpeg_bytes())
    (img / "b.png").write_bytes(png_bytes())
    write_parquet(tmp_path / "ImageNet_1K" / "original-00000-of-00001.parquet", {
        "qry": ["<|image_1|>\nRepresent the given image for classification\n"] * 4,
        "qry_image_path": ["a.jpg", "b.png", "missing.png", "a.jpg"],
        "pos_text": ["tench", "goldfish", "shark", ""],
        "pos_image_path": ["", "", "", ""],
        "neg_text": ["goldfish", "", "", ""],
        "neg_image_path": ["", "", "", ""],
    })
    report = mmeb_train_to_shards(tmp_path / "ImageNet_1K", img, tmp_path / "out")
    assert report.written == 2 and report.skipped == {"empty_side": 1, "missing_image": 1}
    samples = _samples(report.shards)
    q_inst, t_inst = instructions_for("ImageNet-1K")
    first = samples[0]
    assert (first.dataset, first.task, first.meta_task) == ("ImageNet_1K", "i2t", "classification")
    assert first.query.text is None and first.query.image == "query.jpg" and first.query.instruction == q_inst
    assert first.positive.text == "tench" and first.positive.instruction == t_inst
    assert [n.text for n in first.negatives] == ["goldfish"] and samples[1].negatives == []
    with tarfile.open(report.shards[0]) as tf:  # source bytes are stored untouched
        assert tf.extractfile("ImageNet_1K_00000000.query.jpg").read() == (img / "a.jpg").read_bytes()

    write_parquet(tmp_path / "cirr.parquet", {
        "qry": ["<|image_1|>\nGiven an image, find a similar everyday image with the described changes: make it blue"],
        "qry_image_path": ["a.jpg"],
        "pos_text": ["<|image_1|>\nRepresent the given image."],
        "pos_image_path": ["b.png"],
    })
    with pytest.raises(ValueError, match="--task and --meta-task"):
        mmeb_train_to_shards(tmp_path / "cirr.parquet", img, tmp_path / "out")
    cirr = _samples(mmeb_train_to_shards(tmp_path / "cirr.parquet", img, tmp_path / "out", "CIRR").shards)[0]
    assert cirr.task == "it2i" and cirr.query.text == "make it blue" and cirr.positive.text is None
    assert cirr.positive.image == "pos.png" and cirr.query.instruction == instructions_for("CIRR")[0]


def test_instruction_resolution_and_its_errors(tmp_path):
    assert resolve_instructions("MSCOCO", "t2i") == instructions_for("MSCOCO_t2i")
    assert resolve_instructions("CIRR", query_instruction="q") == ("q", instructions_for("CIRR")[1])
    assert resolve_instructions("my_set", query_instruction="q", target_instruction="t") == ("q", "t")
    with pytest.raises(ValueError, match="--query-instruction"):
        resolve_instructions("my_set")
    write_parquet(tmp_path / "mine.parquet", {"qry": ["hello"], "qry_image_path": [""], "pos_text": ["world"],
                                              "pos_image_path": [""]})
    with pytest.raises(ValueError, match="--query-instruction"):
        mmeb_train_to_shards(tmp_path / "mine.parquet", tmp_path, tmp_path / "out", task="t2t", meta_task="retrieval")
    report = mmeb_train_to_shards(tmp_path / "mine.parquet", tmp_path, tmp_path / "out", task="t2t",
                                  meta_task="retrieval", query_instruction="Q.", target_instruction="T.")
    s = _samples(report.shards)[0]
    assert (s.query.text, s.query.instruction) == ("hello", "Q.")
    assert (s.positive.text, s.positive.instruction) == ("world", "T.")
    write_parquet(tmp_path / "eval_like.parquet", {"qry_inst": ["x"], "qry_text": ["y"]})
    with pytest.raises(ValueError, match="missing MMEB-train column"):
        mmeb_train_to_shards(tmp_path / "eval_like.parquet", tmp_path, tmp_path / "out", "CIRR")


def test_visdoc_beir_and_pairs(tmp_path):
    folder = write_beir(tmp_path / "beir", hf_layout=True)
    report = visdoc_beir_to_shards(folder, tmp_path / "out", "VisRAG")
    assert report.written == 2 and report.skipped == {}  # q1->p1 and q2->p2; p3 has score 0
    samples = _samples(report.shards)
    assert [(s.query.text, s.meta["corpus_id"]) for s in samples] == [("red page?", "p1"), ("green page?", "p2")]
    assert all(s.task == "t2vd" and s.meta_task == "visdoc" and s.positive.kind == "document" for s in samples)
    assert samples[1].positive.image == "pos.jpg"
    assert samples[0].query.instruction == instructions_for("VisRAG")[0]
    assert len(visdoc_beir_to_shards(folder, tmp_path / "out0", "VisRAG", min_score=0).shards) == 1
    assert visdoc_beir_to_shards(folder, tmp_path / "out0", "VisRAG", min_score=0).written == 3

    (tmp_path / "pages").mkdir()
    (tmp_path / "pages" / "x.png").write_bytes(png_bytes((5, 5, 5), (30, 40)))
    write_parquet(tmp_path / "pairs" / "train-0.parquet", {
        "query": ["what is x?", "", "where is y?", "and z?"],
        "image": [{"bytes": png_bytes(), "path": None}, {"bytes": png_bytes(), "path": None},
                  {"bytes": None, "path": "x.png"}, {"bytes": b"garbage", "path": None}],
        "source": ["a", "b", "c", "d"],
    }, pa.schema([("query", pa.string()), ("image", IMAGE_STRUCT), ("source", pa.string())]))
    pairs = visdoc_pairs_to_shards(tmp_path / "pairs", tmp_path / "out", "Colpali", image_root=tmp_path / "pages")
    assert pairs.written == 2 and pairs.skipped == {"corrupt_image": 1, "empty_side": 1}
    assert [s.query.text for s in _samples(pairs.shards)] == ["what is x?", "where is y?"]
    with pytest.raises(ValueError, match="--query-column"):
        visdoc_pairs_to_shards(tmp_path / "pairs", tmp_path / "out", "Colpali", query_column="question")


def test_jsonl_to_shards(tmp_path):
    (tmp_path / "i.png").write_bytes(png_bytes())
    lines = [
        {"query": "a red circle", "positive": {"image": "i.png"}, "dataset": "MSCOCO_t2i"},
        {"query": {"text": "find the page"}, "positive": {"image": "i.png", "kind": "document"},
         "dataset": "mydocs", "meta_task": "visdoc", "negatives": [{"image": "i.png", "kind": "document"}]},
        "not json",
        {"query": "a blue square", "positive": {"image": "nowhere.png"}, "dataset": "MSCOCO_t2i"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    with pytest.raises(ValueError, match="--meta-task"):
        jsonl_to_shards(path, tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="--query-instruction"):  # 'mydocs' is in no table
        jsonl_to_shards(path, tmp_path, tmp_path / "out", meta_task="retrieval")
    reports = jsonl_to_shards(path, tmp_path, tmp_path / "out", meta_task="retrieval",
                              query_instruction="Find it.", target_instruction="Represent it.")
    by = {r.dataset: r for r in reports}
    assert by["MSCOCO_t2i"].written == 1 and by["MSCOCO_t2i"].skipped == {"bad_json": 1, "missing_image": 1}
    coco = _samples(by["MSCOCO_t2i"].shards)[0]
    assert (coco.task, coco.meta_task, coco.query.text, coco.query.instruction) == ("t2i", "retrieval",
                                                                                     "a red circle", "Find it.")
    docs = _samples(by["mydocs"].shards)[0]
    assert docs.task == "t2vd" and docs.meta_task == "visdoc" and docs.negatives[0].kind == "document"
    table = jsonl_to_shards(path, tmp_path, tmp_path / "out2", dataset="x", meta_task="retrieval",
                            query_instruction="Find it.", target_instruction="Represent it.")
    assert {r.dataset for r in table} == {"MSCOCO_t2i", "mydocs"}


def test_normalize_llava_and_cli(tmp_path, capsys):
    (tmp_path / "img.png").write_bytes(png_bytes())
    records = [
        {"id": 1, "image": "img.png", "conversations": [{"from": "user", "value": "What is it?"},
                                                        {"from": "assistant", "value": "A square."}]},
        {"id": "2", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "3", "image": "img.png", "conversations": [{"from": "human", "value": "<image>\n<image>\nTwo?"},
                                                          {"from": "gpt", "value": "No"}]},
        {"id": "4", "image": "gone.png", "conversations": [{"from": "human", "value": "<image>\nx"},
                                                           {"from": "gpt", "value": "y"}]},
        {"id": "5", "conversations": [{"from": "gpt", "value": "first"}, {"from": "human", "value": "second"}]},
        {"id": "6", "conversations": [{"from": "robot", "value": "?"}, {"from": "gpt", "value": "!"}]},
        {"id": "7", "conversations": [{"from": "human", "value": " "}, {"from": "gpt", "value": "!"}]},
        "nonsense",
    ]
    (tmp_path / "llava.json").write_text(json.dumps(records))
    report = normalize_llava(tmp_path / "llava.json", out=tmp_path / "clean.json")
    assert report.skipped == {"bad_record": 1, "bad_role": 1, "bad_turns": 1, "empty_turn": 1, "missing_image": 1,
                              "placeholder_mismatch": 1}
    assert [r["id"] for r in report.records] == ["1", "2"]
    assert report.records[0]["conversations"] == [{"from": "human", "value": "<image>\nWhat is it?"},
                                                  {"from": "gpt", "value": "A square."}]
    assert json.loads((tmp_path / "clean.json").read_text()) == report.records
    (tmp_path / "dict.json").write_text("{}")
    with pytest.raises(ValueError, match="JSON list of records"):
        normalize_llava(tmp_path / "dict.json")
    assert cli.main(["convert", "llava", "--json", str(tmp_path / "llava.json")]) == 0
    assert "kept 2 conversations" in capsys.readouterr().out
    assert cli.main(["convert", "llava", "--json", str(tmp_path / "dict.json")]) == 2
    assert "JSON list of records" in capsys.readouterr().err
