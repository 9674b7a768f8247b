"""MMEB (v2 and v1) and BEIR VisDoc readers on fixtures written in the exact source formats."""

from __future__ import annotations

import os

import pytest

from mmembed.data.evalsets import read_beir_visdoc, read_mmeb, split_legacy_text
from mmembed.prompts.embedding import instructions_for
from tests.fixtures_data import png_bytes, write_beir, write_parquet


def _images(root, *names):
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).write_bytes(png_bytes())


def test_read_mmeb_v2_pools_duplicates_and_strips_placeholders(tmp_path):
    _images(tmp_path / "img", "cls/a.png", "cls/b.png", "t2i/x.png", "t2i/y.png")
    inst = "<|image_1|>\nIdentify the object shown in the image."
    path = write_parquet(tmp_path / "VOC2007.parquet", {
        "qry_inst": [inst, inst, inst],
        "qry_text": ["", "", ""],
        "qry_img_path": ["cls/a.png", "cls/b.png", "cls/a.png"],
        "tgt_inst": ["Represent the given text."] * 3,
        "tgt_text": [["dog", "cat", "bird"], ["cat", "dog", "bird"], ["dog", "bird", "cat"]],
        "tgt_img_path": [["", "", ""], ["", "", ""], ["", "", ""]],
    })
    subset = read_mmeb(path, tmp_path / "img")
    assert subset.name == "VOC2007" and len(subset) == 3
    assert len(subset.queries) == 2 and len(subset.candidates) == 3  # identical inputs are embedded once
    q = subset.queries[subset.rows[0].query]
    assert q.instruction == "Identify the object shown in the image." and q.text is None
    assert q.image == str(tmp_path / "img/cls/a.png") and q.kind == "natural"
    gt = [subset.candidates[r.candidates[0]].text for r in subset.rows]
    assert gt == ["dog", "cat", "dog"]
    assert subset.rows[0].query == subset.rows[2].query
    assert all(c.image is None and c.instruction == "Represent the given text." for c in subset.candidates)

    t2i = write_parquet(tmp_path / "DocVQA" / "test-00000-of-00001.parquet", {  # HF folder layout
        "qry_inst": ["<|image_1|>\nRepresent the given image with the given query and retrieve the answer."],
        "qry_text": ["What is the total?"],
        "qry_img_path": ["t2i/x.png"],
        "tgt_inst": ["Represent the given text."],
        "tgt_text": [["12", "13"]],
        "tgt_img_path": [None],
    }).parent
    doc = read_mmeb(t2i, tmp_path / "img")
    assert doc.name == "DocVQA" and doc.queries[0].kind == "document" and doc.queries[0].text == "What is the total?"
    assert [c.text for c in doc.candidates] == ["12", "13"]


def test_read_mmeb_v1_splits_fused_instructions(tmp_path):
    _images(tmp_path, "q.png", "c1.png", "c2.png")
    path = write_parquet(tmp_path / "CIRR.parquet", {
        "qry_text": ["<|image_1|>\nGiven an image, find a similar everyday image with the described changes: "
                     "make it red"],
        "qry_img_path": ["q.png"],
        "tgt_text": [["<|image_1|>\nRepresent the given image.", "<|image_1|>\nRepresent the given image."]],
        "tgt_img_path": [["c1.png", "c2.png"]],
    })
    with pytest.raises(ValueError, match="version='v1'"):
        read_mmeb(path, tmp_path)
    subset = read_mmeb(path, tmp_path, version="v1", instructions="file")
    q = subset.queries[0]
    assert q.instruction == "Given an image, find a similar everyday image with the described changes"
    assert q.text == "make it red"
    assert [(c.instruction, c.text, os.path.basename(c.image)) for c in subset.candidates] == [
        ("Represent the given image.", None, "c1.png"), ("Represent the given image.", None, "c2.png")]
    paper = read_mmeb(path, tmp_path, version="v1")  # default: the paper's Tables 11-12, as in training
    assert (paper.queries[0].instruction, paper.queries[0].text) == (instructions_for("CIRR")[0], "make it red")
    assert {c.instruction for c in paper.candidates} == {instructions_for("CIRR")[1]}
    assert split_legacy_text("tench") == (None, "tench")
    assert split_legacy_text("<|image_1|>\nRepresent the given image for classification\n") == (
        "Represent the given image for classification", None)


def test_mmeb_eval_instructions_default_to_the_paper_tables(tmp_path):
    _images(tmp_path, "q.png")
    path = write_parquet(tmp_path / "ImageNet-1K.parquet", {  # v1 bare-label candidates: no instruction in the file
        "qry_text": ["<|image_1|>\nRepresent the given image for classification\n"], "qry_img_path": ["q.png"],
        "tgt_text": [["tench", "goldfish"]], "tgt_img_path": [["", ""]],
    })
    q_inst, t_inst = instructions_for("ImageNet-1K")
    paper = read_mmeb(path, tmp_path, version="v1")
    assert [(c.instruction, c.text) for c in paper.candidates] == [(t_inst, "tench"), (t_inst, "goldfish")]
    assert paper.queries[0].instruction == q_inst and paper.queries[0].text is None
    own = read_mmeb(path, tmp_path, version="v1", instructions="file")
    assert [c.instruction for c in own.candidates] == [None, None]
    assert own.queries[0].instruction == "Represent the given image for classification"
    synth = read_mmeb(write_parquet(tmp_path / "synth_x.parquet", {  # not in the tables: the file's are kept
        "qry_inst": ["Find it."], "qry_text": ["x"], "qry_img_path": [""], "tgt_inst": ["Represent it."],
        "tgt_text": [["a", "b"]], "tgt_img_path": [["", ""]]}), tmp_path)
    assert synth.queries[0].instruction == "Find it." and synth.candidates[0].instruction == "Represent it."
    with pytest.raises(ValueError, match="'paper'"):
        read_mmeb(path, tmp_path, version="v1", instructions="table")


def test_read_mmeb_errors_name_the_fix(tmp_path):
    path = write_parquet(tmp_path / "x.parquet", {
        "qry_inst": ["a"], "qry_text": ["b"], "qry_img_path": ["missing.png"], "tgt_inst": ["c"],
        "tgt_text": [["d", "e"]], "tgt_img_path": [["", ""]],
    })
    with pytest.raises(FileNotFoundError, match="1 of 1 images .* pass the folder that holds"):
        read_mmeb(path, tmp_path)
    assert len(read_mmeb(path, tmp_path, check_images=False)) == 1
    bad = write_parquet(tmp_path / "y.parquet", {
        "qry_inst": ["a"], "qry_text": ["b"], "qry_img_path": [""], "tgt_inst": ["c"],
        "tgt_text": [["d", "e"]], "tgt_img_path": [["", "", "f.png"]],
    })
    with pytest.raises(ValueError, match="row 0: tgt_text has 2 entries and tgt_img_path 3"):
        read_mmeb(bad, tmp_path)
    with pytest.raises(ValueError, match="unknown MMEB version"):
        read_mmeb(bad, tmp_path, version="v3")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_mmeb(tmp_path / "nope.parquet", tmp_path)


@pytest.mark.parametrize("hf_layout", [False, True])
def test_read_beir_visdoc(tmp_path, hf_layout):
    folder = write_beir(tmp_path / "set", hf_layout=hf_layout)
    data = read_beir_visdoc(folder, image_dir=tmp_path / "cache")
    assert data.name == "set" and data.query_ids == ["q1", "q2"] and data.dropped == {"no_qrels": 1}
    assert data.qrels == {"q1": {"p1": 1}, "q2": {"p2": 2, "p3": 0}}
    assert data.corpus_ids == ["p1", "p2", "p3"]
    assert [os.path.basename(c.image) for c in data.corpus] == ["p1.png", "p2.jpg", "p3.png"]
    assert os.path.dirname(data.corpus[2].image) == str(folder / "pages")  # stored by path: used in place
    assert all(c.kind == "document" and c.instruction == "Represent the given visual documents." for c in data.corpus)
    assert data.queries[0].text == "red page?" and data.queries[0].image is None
    assert open(data.corpus[1].image, "rb").read()[:3] == b"\xff\xd8\xff"  # bytes written as they were


def test_read_beir_visdoc_language_and_errors(tmp_path):
    folder = write_beir(tmp_path / "ml", language=True)
    data = read_beir_visdoc(folder, language="english")
    assert data.query_ids == ["q1"] and data.dropped == {"language": 1, "no_qrels": 1}
    assert (folder / "images" / "p1.png").exists()  # default cache: next to the set
    with pytest.raises(ValueError, match="no 'language' column"):
        read_beir_visdoc(write_beir(tmp_path / "mono"), language="english")
    broken = write_beir(tmp_path / "broken")
    write_parquet(broken / "qrels.parquet", {"query-id": ["q1"], "corpus-id": ["p9"], "score": [1]})
    with pytest.raises(ValueError, match="1 corpus ids are not in the corpus"):
        read_beir_visdoc(broken)
    (broken / "queries.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="no queries.parquet"):
        read_beir_visdoc(broken)
