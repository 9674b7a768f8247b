"""Benchmark and training files exactly as their hubs lay them out: one folder per subset/config of split shards."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F

from mmembed.data.converters import mmeb_train_to_shards
from mmembed.data.evalsets import read_parquet
from mmembed.data.shards import iter_decoded
from mmembed.eval.mmeb import evaluate_mmeb, resolve_mmeb_subsets
from tests.fixtures_data import jpeg_bytes, png_bytes, write_parquet

SHARD = "test-00000-of-00001.parquet"


class HashEncoder:
    """Deterministic stand-in embedder: a text's vector is its hash; enough to run the reader and metric path."""

    def encode(self, items, role="query", batch_size=16, show_progress=None):
        rows = []
        for it in items:
            seed = int(hashlib.sha1(f"{it.text}|{it.image}".encode()).hexdigest()[:8], 16)
            rows.append(torch.randn(8, generator=torch.Generator().manual_seed(seed)))
        return F.normalize(torch.stack(rows), dim=-1)


def _mmeb_eval_root(root, images=True):
    """MMEB eval as the hub ships it: ``{subset}/test-00000-of-00001.parquet``, image paths relative to the root."""
    for subset, folder in (("MSCOCO_t2i", "MSCOCO"), ("ImageNet-1K", "ImageNet")):
        write_parquet(root / subset / SHARD, {
            "qry_inst": ["<|image_1|>\nFind an image."] * 2, "qry_text": ["a red one", "a green one"],
            "qry_img_path": ["", ""], "tgt_inst": ["Represent the image."] * 2,
            "tgt_text": [["", ""], ["", ""]],
            "tgt_img_path": [[f"{folder}/r.png", f"{folder}/g.jpg"], [f"{folder}/g.jpg", f"{folder}/r.png"]],
        })
        if images:
            (root / "images" / folder).mkdir(parents=True, exist_ok=True)
            (root / "images" / folder / "r.png").write_bytes(png_bytes())
            (root / "images" / folder / "g.jpg").write_bytes(jpeg_bytes())
    return root


def test_mmeb_eval_hub_root_names_subsets_by_folder_and_groups_them(tmp_path):
    root = _mmeb_eval_root(tmp_path / "MMEB-eval")
    paths, _, _ = resolve_mmeb_subsets(root)
    assert paths == {"ImageNet-1K": root / "ImageNet-1K", "MSCOCO_t2i": root / "MSCOCO_t2i"}
    res = evaluate_mmeb(HashEncoder(), root, image_root=root / "images")
    got = {n: (s.group, s.split) for n, s in res.sets.items()}
    assert got == {"ImageNet-1K": ("classification", "ind"), "MSCOCO_t2i": ("retrieval", "ind")}
    one = evaluate_mmeb(HashEncoder(), root / "MSCOCO_t2i", image_root=root / "images")  # one subset folder
    assert list(one.sets) == ["MSCOCO_t2i"] and one.sets["MSCOCO_t2i"].group == "retrieval"
    assert one.sets["MSCOCO_t2i"].score == res.sets["MSCOCO_t2i"].score


def test_mmeb_eval_missing_images_name_the_first_and_the_count(tmp_path):
    root = _mmeb_eval_root(tmp_path / "MMEB-eval", images=False)
    with pytest.raises(FileNotFoundError, match=r"2 of 2 images .* missing under .*images \(first: .*g\.jpg\)"):
        evaluate_mmeb(HashEncoder(), root / "ImageNet-1K", image_root=root / "images")


def test_mmeb_train_hub_folder_reads_one_split(tmp_path):
    img = tmp_path / "images"
    img.mkdir()
    (img / "a.jpg").write_bytes(jpeg_bytes())
    sub = tmp_path / "MMEB-train" / "ImageNet_1K"
    for split, n in (("original", 2), ("diverse_instruction", 3)):
        write_parquet(sub / f"{split}-00000-of-00001.parquet", {
            "qry": [f"<|image_1|>\n{split} instruction: "] * n, "qry_image_path": ["a.jpg"] * n,
            "pos_text": [f"label{i}" for i in range(n)], "pos_image_path": [""] * n,
        })
    assert mmeb_train_to_shards(sub, img, tmp_path / "o1").written == 2  # default: original
    report = mmeb_train_to_shards(sub, img, tmp_path / "o2", split="diverse_instruction")
    assert report.written == 3 and [d.sample.dataset for d in iter_decoded(report.shards)] == ["ImageNet_1K"] * 3
    with pytest.raises(FileNotFoundError, match=r"splits there: \['diverse_instruction', 'original'\]"):
        mmeb_train_to_shards(sub, img, tmp_path / "o3", split="train")
    with pytest.raises(ValueError, match="several splits"):
        read_parquet(sub, "MMEB-train")


def test_visdoc_pairs_hub_folder_with_image_structs_and_splits(tmp_path):
    import pyarrow as pa

    from mmembed.data.converters import visdoc_pairs_to_shards
    from tests.fixtures_data import IMAGE_STRUCT

    data = tmp_path / "colpali_train_set" / "data"
    schema = pa.schema([("query", pa.string()), ("image", IMAGE_STRUCT)])
    for split, n in (("train", 3), ("test", 1)):
        write_parquet(data / f"{split}-00000-of-00001.parquet", {
            "query": [f"{split} q{i}" for i in range(n)],
            "image": [{"bytes": png_bytes((10 * i, 0, 0), (30, 40)), "path": f"p{i}.png"} for i in range(n)]}, schema)
    with pytest.raises(ValueError, match=r"several splits \['test', 'train'\]"):
        visdoc_pairs_to_shards(data, tmp_path / "out", "Colpali")
    report = visdoc_pairs_to_shards(data, tmp_path / "out", "Colpali", split="train")
    samples = [d.sample for d in iter_decoded(report.shards)]
    assert [s.query.text for s in samples] == ["train q0", "train q1", "train q2"]
    assert all(s.positive.kind == "document" and s.task == "t2vd" for s in samples)


def test_vidore_beir_hub_layout_reads_with_image_structs(tmp_path):
    from mmembed.data.evalsets import read_beir_visdoc
    from tests.fixtures_data import write_beir

    folder = write_beir(tmp_path / "vidore_docvqa_test_subsampled_beir", hf_layout=True)
    assert (folder / "corpus" / SHARD).is_file() and not (folder / "corpus.parquet").exists()
    s = read_beir_visdoc(folder)
    assert s.name == "vidore_docvqa_test_subsampled_beir" and s.query_ids == ["q1", "q2"]
    assert s.corpus_ids == ["p1", "p2", "p3"] and all(it.kind == "document" for it in s.corpus)
    assert s.qrels == {"q1": {"p1": 1}, "q2": {"p2": 2, "p3": 0}} and s.dropped == {"no_qrels": 1}
