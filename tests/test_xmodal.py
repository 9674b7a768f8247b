"""Table 5's cross-modal sets: readers on fixtures in each public format, Hit@k, the runner, callback, CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mmembed.data.xmodal import read_caption_pairs, read_karpathy, read_sugarcrepe, read_urban1k
from mmembed.eval.metrics import hit_at_k
from mmembed.eval.xmodal import evaluate_xmodal
from tests.fixtures_data import jpeg_bytes, png_bytes


def _images(root, *names):
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).write_bytes(png_bytes() if n.endswith(".png") else jpeg_bytes())


def _karpathy(tmp_path):
    _images(tmp_path / "coco", "val2014/a.jpg", "val2014/b.jpg", "train2014/c.jpg")
    data = {"images": [
        {"filepath": "val2014", "filename": "a.jpg", "split": "test", "sentences": [{"raw": "a dog"}, {"raw": "dog"}]},
        {"filepath": "val2014", "filename": "b.jpg", "split": "test", "sentences": [{"raw": "a cat"}]},
        {"filepath": "train2014", "filename": "c.jpg", "split": "train", "sentences": [{"raw": "a cow"}]},
    ]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))
    return read_karpathy(tmp_path / "dataset_coco.json", tmp_path / "coco", name="MSCOCO", analog="MSCOCO")


def test_readers_for_each_public_format(tmp_path):
    coco = _karpathy(tmp_path)
    assert [p.split("coco/")[1] for p in coco.images] == ["val2014/a.jpg", "val2014/b.jpg"]  # test split only
    assert coco.captions == ["a dog", "dog", "a cat"] and coco.caption_image == [0, 0, 1]

    _images(tmp_path / "sg", "x.jpg", "y.jpg")
    (tmp_path / "sg.json").write_text(json.dumps([
        {"image": "x.jpg", "caption": "a long caption of x"},
        {"image": "y.jpg", "conversations": [{"from": "human", "value": "<image>\nDescribe"},
                                             {"from": "gpt", "value": "a long caption of y"}]}]))
    sg = read_caption_pairs(tmp_path / "sg.json", tmp_path / "sg")
    assert sg.captions == ["a long caption of x", "a long caption of y"] and sg.caption_image == [0, 1]

    _images(tmp_path / "Urban1k" / "image", "1.jpg", "2.jpg")
    (tmp_path / "Urban1k" / "caption").mkdir()
    for i in (1, 2):
        (tmp_path / "Urban1k" / "caption" / f"{i}.txt").write_text(f"city scene {i}\n")
    urban = read_urban1k(tmp_path / "Urban1k")
    assert urban.captions == ["city scene 1", "city scene 2"] and urban.images[1].endswith("image/2.jpg")

    _images(tmp_path / "val2017", "000000000139.jpg")
    (tmp_path / "swap_att.json").write_text(json.dumps(
        {"0": {"filename": "000000000139.jpg", "caption": "a red cup on a blue table",
               "negative_caption": "a blue cup on a red table"}}))
    sugar = read_sugarcrepe(tmp_path / "swap_att.json", tmp_path / "val2017")
    assert (sugar.name, sugar.positives, sugar.negatives) == ("swap_att", ["a red cup on a blue table"],
                                                               ["a blue cup on a red table"])


def test_readers_name_missing_images_and_bad_records(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps({"images": [
        {"filename": f"{i}.jpg", "split": "test", "sentences": [{"raw": "x"}]} for i in range(3)]}))
    with pytest.raises(FileNotFoundError, match=r"3 of 3 images .*first: .*0\.jpg\)"):
        read_karpathy(tmp_path / "d.json", tmp_path)
    with pytest.raises(ValueError, match="no image in split 'val'"):
        read_karpathy(tmp_path / "d.json", tmp_path, split="val")
    (tmp_path / "s.json").write_text(json.dumps({"0": {"filename": "a.jpg", "caption": "x"}}))
    with pytest.raises(ValueError, match="negative_caption"):
        read_sugarcrepe(tmp_path / "s.json")


def test_hit_at_k_counts_any_relevant_and_ties_in_expectation():
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.9, 0.3], [0.5, 0.5, 0.5]])
    rel = torch.tensor([[0, 1, 1], [1, 0, 1], [1, 1, 0]])
    assert hit_at_k(scores, rel, 1, reduction="none").tolist() == pytest.approx([0.0, 0.0, 2 / 3])
    assert hit_at_k(scores, rel, 2, reduction="none").tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert hit_at_k(torch.zeros(1, 4), torch.tensor([[1, 0, 0, 0]]), 2).item() == pytest.approx(0.5)


class OracleEncoder:
    """Image i and its captions map to one-hot i; anything else (a hard negative) to a fixed other direction."""

    def __init__(self, caption_owner: dict[str, int], image_index: dict[str, int], dim: int = 64):
        self.caption_owner, self.image_index, self.dim = caption_owner, image_index, dim

    def encode(self, items, role="query", batch_size=16, show_progress=None):
        out = torch.zeros(len(items), self.dim)
        for row, it in enumerate(items):
            k = self.image_index[it.image] if it.image is not None else self.caption_owner.get(it.text, self.dim - 1)
            out[row, k] = 1.0
        return F.normalize(out + 1e-3, dim=-1)


def test_runner_scores_an_oracle_perfectly_and_a_collapsed_model_at_chance(tmp_path):
    coco = _karpathy(tmp_path)
    _images(tmp_path / "val2017", "a.jpg", "b.jpg")
    sugar = {str(i): {"filename": f, "caption": f"right {i}", "negative_caption": f"wrong {i}"}
             for i, f in enumerate(["a.jpg", "b.jpg"])}
    (tmp_path / "replace_obj.json").write_text(json.dumps(sugar))
    sets = {"MSCOCO": coco, "replace_obj": read_sugarcrepe(tmp_path / "replace_obj.json", tmp_path / "val2017")}
    owner = {c: coco.caption_image[i] for i, c in enumerate(coco.captions)} | {"right 0": 0, "right 1": 1}
    images = {p: i for i, p in enumerate(coco.images)} | {p: i for i, p in enumerate(sets["replace_obj"].images)}
    res = evaluate_xmodal(OracleEncoder(owner, images), sets, tmp_path / "out")
    assert {n: (s.group, round(s.score, 3)) for n, s in res.sets.items()} == {
        "MSCOCO_t2i": ("short", 100.0), "MSCOCO_i2t": ("short", 100.0), "replace_obj": ("compositional", 100.0)}
    assert (tmp_path / "out" / "metrics.json").is_file()

    class Collapsed:
        def encode(self, items, role="query", batch_size=16, show_progress=None):
            return F.normalize(torch.ones(len(items), 4), dim=-1)

    flat = evaluate_xmodal(Collapsed(), sets)
    assert flat.sets["MSCOCO_t2i"].score == pytest.approx(50.0)  # 2 images tied: 1/2
    assert flat.sets["MSCOCO_i2t"].score == pytest.approx(100 * (2 / 3 + 1 / 3) / 2)  # 2 of 3, 1 of 3 captions
    assert flat.sets["replace_obj"].score == pytest.approx(50.0)  # ties count one half


def test_synthetic_analogs_evaluate_through_the_callback_and_cli(tmp_path, tiny_embedder):
    from mmembed.callbacks.eval import XModalEvalCallback

    from mmembed.data.synth.world import SIZES
    from mmembed.data.synth.xmodal import write_xmodal
    from mmembed.eval import cli

    written = write_xmodal("table5", tmp_path / "world", 0, SIZES["ci"])
    assert set(written) == {"synth_short", "synth_long", "synth_sugarcrepe_swap", "synth_sugarcrepe_replace"}
    cb = XModalEvalCallback(tmp_path / "world", max_queries=3, batch_size=8)
    res = cb.evaluate(tiny_embedder, tmp_path / "cb", {})
    assert set(res.groups) == {"short", "long", "compositional"}
    assert res.sets["synth_short_t2i"].num_candidates == 3 and res.sets["synth_sugarcrepe_swap"].num_queries == 3
    assert all(0.0 <= s.score <= 100.0 for s in res.sets.values())
    assert cli.main(["xmodal", "--model", "tiny", "--data", str(tmp_path / "world"), "--out", str(tmp_path / "o"),
                     "--sets", "synth_sugarcrepe_swap", "--max-queries", "2", "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["benchmark"] == "xmodal" and list(metrics["sets"]) == ["synth_sugarcrepe_swap"]
