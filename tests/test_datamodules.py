"""DataModules: homogeneous batches, mixture, hard negatives, rank splits, skips, workers, instruction labels.

Every test writes its own tiny shards / JSON into tmp_path; nothing is downloaded.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds
from mmembed.datamodules import ContrastiveCollate, ContrastiveDataModule, GroupByDataset, InstructionDataModule
from mmembed.datamodules.common import EpochClock, SharedEpoch
from PIL import Image

from mmembed.data.schema import Sample, Side
from mmembed.data.shards import DecodedSample, iter_decoded, write_shards

B = 4  # batch size used throughout


# ------------------------------------------------------------------------------------------------------- fixtures
def _samples(ds: str, shard: int, n: int):
    """dsA: image query -> text positive, i % 4 text negatives. dsB: text query -> document page, i % 3 pages."""
    for i in range(n):
        sid = f"{ds}/s{shard}/{i:03d}"
        if ds == "dsA":
            negs = [Side(text=f"sample {i} neg {j}", id=f"{sid}/n{j}") for j in range(i % 4)]
            yield Sample(id=sid, dataset=ds, task="i2t", meta_task="classification",
                         query=Side(image="query.png", instruction="Represent the given image.", id=f"{sid}/q"),
                         positive=Side(text=f"sample {i} pos", id=f"{sid}/p"), negatives=negs), {
                "query.png": Image.new("RGB", (32, 32), (i * 20 % 255, 0, 0))}
        else:
            negs = [Side(image=f"neg{j}.png", kind="document", id=f"{sid}/n{j}") for j in range(i % 3)]
            images = {"pos.png": Image.new("RGB", (128, 64), "white")}
            images.update({f"neg{j}.png": Image.new("RGB", (128, 64), "gray") for j in range(i % 3)})
            yield Sample(id=sid, dataset=ds, task="t2vd", meta_task="visdoc",
                         query=Side(text=f"question {i}", id=f"{sid}/q"),
                         positive=Side(image="pos.png", kind="document", id=f"{sid}/p"), negatives=negs), images


def _write(root: Path, per_shard: int = 12) -> Path:
    for ds in ("dsA", "dsB"):
        for sh in range(2):
            write_shards(_samples(ds, sh, per_shard), str(root / f"{ds}-{sh}-%03d.tar"), maxcount=1000)
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def builder():
    from mmembed.backbone import build_input_builder

    return build_input_builder("tiny", vtc_factor=2)


def _dm(shards: Path, builder, **kw) -> ContrastiveDataModule:
    kw = {"batch_size": B, "num_workers": 0, "shuffle_buffer": 8, "input_builder": builder, **kw}
    dm = ContrastiveDataModule(str(shards / "*.tar"), **kw)
    dm.setup("fit")
    return dm


def _epoch(dm: ContrastiveDataModule) -> list[dict]:
    batches = []
    for batch in dm.train_dataloader():
        dm.record_skips(batch)
        batches.append(batch)
    return batches


def _dataset_of(sample_id: str) -> str:
    return sample_id.split("/")[0]


# ---------------------------------------------------------------------------------------------- contrastive
def test_batches_are_homogeneous_and_shaped(shards, builder):
    dm = _dm(shards, builder, num_hard_negatives=2)
    negs = {s.sample.id: len(s.sample.negatives) for s in iter_decoded(str(shards / "*.tar"))}
    batches = _epoch(dm)
    assert len(batches) == dm.num_train_batches == 48 // B  # samples counted at setup
    seen = Counter()
    for b in batches:
        assert {_dataset_of(i) for i in b["ids"]} == {b["dataset"]}
        assert b["num_negatives"] == min(2, min(negs[i] for i in b["ids"]))
        n = b["num_negatives"]
        assert b["query"]["input_ids"].shape[0] == B and b["candidate"]["input_ids"].shape[0] == B * (1 + n)
        assert len(b["pos_ids"]) == B and len(b["neg_ids"]) == B * n
        assert b["pos_ids"] == [f"{i}/p" for i in b["ids"]]
        for side in ("query", "candidate"):
            feat = b[side]
            tiles = int(feat["num_tiles"].sum())
            assert tiles == (feat["pixel_values"].shape[0] if "pixel_values" in feat else 0)
        if b["dataset"] == "dsB":  # 128x64 pages: 2 tiles + thumbnail under the document cap of 4
            assert b["candidate"]["num_tiles"].tolist() == [3] * (B * (1 + n))
        seen.update(b["ids"])
    assert max(seen.values()) == 1 and len(seen) == 48  # one epoch = one pass here: every sample exactly once


def test_candidate_rows_are_positives_then_negatives_query_major(shards, builder):
    decoded = {s.sample.id: s for s in iter_decoded(str(shards / "dsA-*.tar"))}
    group = [decoded[f"dsA/s0/{i:03d}"] for i in (3, 7, 11, 2)]  # 3, 3, 3, 2 negatives
    batch = ContrastiveCollate(builder, num_hard_negatives=5)({"dataset": "dsA", "samples": group, "skipped": {},
                                                               "dropped": {}})
    assert batch["num_negatives"] == 2
    tok = builder.tokenizer
    rows = [tok.decode(r[m.bool()]) for r, m in zip(batch["candidate"]["input_ids"],
                                                     batch["candidate"]["attention_mask"])]
    for i, sid in enumerate([3, 7, 11, 2]):
        assert f"sample {sid} pos" in rows[i]
        for j in range(2):
            assert f"sample {sid} neg {j}" in rows[B + i * 2 + j]
            assert batch["neg_ids"][i * 2 + j] == f"dsA/s0/{sid:03d}/n{j}"
    none = ContrastiveCollate(builder, num_hard_negatives=0)({"dataset": "dsA", "samples": group, "skipped": {},
                                                              "dropped": {}})
    assert none["num_negatives"] == 0 and none["candidate"]["input_ids"].shape[0] == B and none["neg_ids"] == []


def test_mixture_weight_zero_never_appears(shards, builder):
    dm = _dm(shards, builder, mixture={"dsA": 1.0, "dsB": 0.0}, samples_per_epoch=40)
    batches = _epoch(dm)
    assert len(batches) == 10 and {b["dataset"] for b in batches} == {"dsA"}
    assert dm.dropped_counts["dsB"] > 0


def _fake(ds: str, i: int) -> DecodedSample:
    side = Side(text="x")
    return DecodedSample(Sample(id=f"{ds}/{i}", dataset=ds, task="t2t", meta_task="retrieval", query=side,
                                positive=side), {}, skipped={"bad_json": 1} if i % 50 == 0 else {})


@pytest.mark.parametrize("weights, expected_a", [(None, 0.5), ({"A": 3.0, "B": 1.0}, 0.75), ({"A": 1, "B": 4}, 0.2)])
def test_mixture_weights_set_batch_shares(weights, expected_a):
    # Equal amounts of A and B arrive in per-dataset bursts of 40 (like per-dataset shards).
    stream = [_fake(ds, k * 40 + i) for k in range(100) for ds in ("AB"[k % 2],) for i in range(40)]
    stage = GroupByDataset(B, EpochClock(SharedEpoch()), weights=weights, seed=1)
    stage.clock.tick()
    out = list(stage.run(iter(stream)))
    share = sum(g["dataset"] == "A" for g in out) / len(out)
    assert abs(share - expected_a) < 0.05, share
    assert all(len({s.sample.dataset for s in g["samples"]}) == 1 and len(g["samples"]) == B for g in out)
    # every skip that rode on a sample reaches some batch exactly once, dropped samples included
    assert sum(g["skipped"].get("bad_json", 0) for g in out) == sum(1 for s in stream if s.skipped)
    kept = sum(len(g["samples"]) for g in out)
    assert kept + sum(sum(g["dropped"].values()) for g in out) <= len(stream)


def test_two_ranks_see_disjoint_shards_and_equal_batch_counts(shards, builder):
    ids, lengths = [], []
    for rank in (0, 1):
        dm = _dm(shards, builder, rank=rank, world_size=2, samples_per_epoch=16, shuffle_buffer=0)
        loader = dm.train_dataloader()
        batches = list(loader)
        lengths.append((len(batches), len(loader)))
        ids.append({i for b in batches for i in b["ids"]})
    assert lengths == [(2, 2), (2, 2)]
    shard_of = [{i.rsplit("/", 1)[0] for i in rank_ids} for rank_ids in ids]
    assert shard_of[0] and shard_of[1] and not shard_of[0] & shard_of[1]


def test_epochs_differ_but_are_reproducible(shards, builder):
    def orders(seed):
        dm = _dm(shards, builder, seed=seed, samples_per_epoch=16)
        loader = dm.train_dataloader()
        return [[i for b in loader for i in b["ids"]] for _ in range(2)]

    first = orders(0)
    assert first[0] != first[1]  # a new shard permutation / shuffle each epoch
    assert orders(0) == first


def test_misconfiguration_errors(shards, builder, tmp_path):
    with pytest.raises(FileNotFoundError, match="no shards match"):
        _dm(tmp_path, builder)
    with pytest.raises(ValueError, match=r"4 shard\(s\) for 2 rank\(s\) x 3 DataLoader worker\(s\); need at least 6"):
        _dm(shards, builder, rank=0, world_size=2, num_workers=3)
    unknown = r"mixture names unknown dataset\(s\) \[.dsZ.\]; the shards hold \[.dsA., .dsB.\]"
    with pytest.raises(ValueError, match=unknown):
        _dm(shards, builder, mixture={"dsA": 1.0, "dsZ": 1.0})
    with pytest.raises(ValueError, match="gives no batch per rank"):
        _dm(shards, builder, samples_per_epoch=3)


def _corrupt_shards(root: Path) -> Path:
    _write(root)
    # a truncated copy of a good shard (an interrupted copy)
    good = (root / "dsA-0-000.tar").read_bytes()
    (root / "dsA-9-000.tar").write_bytes(good[: len(good) // 2 + 100])
    # a shard with an unparsable JSON and a sample whose .png member is not an image
    bad = Sample(id="dsA/s8/000", dataset="dsA", task="i2t", meta_task="classification",
                 query=Side(image="query.png"), positive=Side(text="p"))
    with wds.TarWriter(str(root / "dsA-8-000.tar")) as w:
        w.write({"__key__": "broken", "json": b"{not json"})
        w.write({"__key__": "notimage", "json": json.dumps(bad.to_json()).encode(), "query.png": b"not a png"})
        for s, imgs in _samples("dsA", 8, 6):
            buf = io.BytesIO()
            imgs["query.png"].save(buf, format="PNG")
            w.write({"__key__": s.id.replace("/", "_"), "json": json.dumps(s.to_json()).encode(),
                     "query.png": buf.getvalue()})
    return root


def test_corrupt_shards_are_counted_and_the_epoch_continues_with_two_workers(tmp_path, builder):
    root = _corrupt_shards(tmp_path)
    dm = _dm(root, builder, num_workers=2, samples_per_epoch=128)  # > one pass per worker: every shard is read
    batches = _epoch(dm)
    assert len(batches) == 32
    assert all({_dataset_of(i) for i in b["ids"]} == {b["dataset"]} for b in batches)
    counts = dm.skip_counts.as_dict()
    assert counts.get("truncated_shard", 0) >= 1 and counts.get("bad_json", 0) >= 1
    assert counts.get("corrupt_image", 0) >= 1, counts


def test_batches_move_to_a_device(shards, builder):
    dm = _dm(shards, builder, samples_per_epoch=8)
    batch = next(iter(dm.train_dataloader()))
    moved = dm.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert moved["query"]["input_ids"].device.type == "meta"
    assert moved["candidate"]["attention_mask"].device.type == "meta"
    assert moved["ids"] == batch["ids"] and moved["dataset"] == batch["dataset"]


# ---------------------------------------------------------------------------------------------- instruction
CONVS = {
    "good": [("human", "<image>\nHow many circles are there?"), ("gpt", "There are 3 circles."),
             ("human", "What colour is the background?"), ("gpt", "white")],
    "text": [("human", "Say yes."), ("gpt", "yes")],
    "noplace": [("human", "Describe the image."), ("gpt", "a red square on the left")],
}


def _instruct(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    Image.new("RGB", (64, 64), "red").save(tmp_path / "img/a.png")
    Image.new("RGB", (160, 64), "blue").save(tmp_path / "img/wide.png")
    (tmp_path / "img/broken.png").write_bytes(b"\x89PNG not really")

    def rec(rid, conv, image=None):
        r = {"id": rid, "conversations": [{"from": f, "value": v} for f, v in CONVS[conv]]}
        return r | ({"image": image} if image else {})

    records = [rec("good", "good", "img/a.png"), rec("text", "text"), rec("wide", "noplace", "img/wide.png"),
               rec("missing", "good", "img/nope.png"), rec("broken", "good", "img/broken.png"),
               {"id": "noreply", "image": "img/a.png", "conversations": [{"from": "human", "value": "<image>\nhi"}]}]
    (tmp_path / "llava.json").write_text(json.dumps(records))
    return tmp_path / "llava.json"


def _assistant_text(conv: str, tok) -> str:
    return "".join(v + tok.eos_token for f, v in CONVS[conv] if f == "gpt")


def test_instruction_labels_train_only_assistant_replies(tmp_path, builder):
    path = _instruct(tmp_path)
    dm = InstructionDataModule(str(path), batch_size=2, num_workers=0, input_builder=builder, max_tiles=4)
    dm.setup("fit")
    ds, tok = dm.train_dataset, builder.tokenizer
    image_ids = set(tok.convert_tokens_to_ids(["<img>", "</img>", "<IMG_CONTEXT>"]))
    for index, conv in ((0, "good"), (1, "text"), (2, "noplace")):
        item = ds[index]
        ids, labels = item["input_ids"], item["labels"]
        trained = [t for t in labels if t != -100]
        assert tok.decode(trained) == _assistant_text(conv, tok)
        assert not image_ids & set(trained)
        assert all(lab in (-100, t) for t, lab in zip(ids, labels))
    assert ds[0]["num_tiles"] == 1 and ds[2]["num_tiles"] == 4  # 160x64 -> 3 tiles + thumbnail
    assert ds[1]["pixel_values"] is None
    # bad rows are replaced by the next good one and counted
    for i in range(len(ds)):
        ds[i]
    counts = ds.counter.as_dict()
    assert counts["missing_member"] >= 1 and counts["corrupt_image"] >= 1 and counts["bad_json"] >= 1
    # the loader: right padding masked, pixel rows = tiles, counts reach the DataModule
    for batch in dm.train_dataloader():
        dm.record_skips(batch)
        pad = batch["attention_mask"] == 0
        assert (batch["labels"][pad] == -100).all()
        rows = batch["pixel_values"].shape[0] if "pixel_values" in batch else 0
        assert rows == int(batch["num_tiles"].sum())
    assert dm.skip_counts.total >= 1


def test_instruction_packing_isolates_conversations(tmp_path, builder):
    from mmembed.backbone import build_backbone

    path = _instruct(tmp_path)
    dm = InstructionDataModule(str(path), batch_size=3, input_builder=builder, pack=True, max_length=512)
    dm.setup("fit")
    items = [dm.train_dataset[i] for i in (0, 1, 2)]
    packed = dm.collate()(items)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    n = [len(it["input_ids"]) for it in items]
    row_pos = packed["position_ids"][0, : sum(n)].tolist()
    assert row_pos == [p for k in n for p in range(k)]  # restarts per conversation
    model = build_backbone("tiny", vtc_factor=2).eval()
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], attention_mask=None, pixel_values=packed["pixel_values"],
                       position_ids=packed["position_ids"]).logits[0]
        start = 0
        for it, k in zip(items, n):
            alone = model(input_ids=torch.tensor([it["input_ids"]]), attention_mask=torch.ones(1, k, dtype=torch.long),
                          pixel_values=it["pixel_values"]).logits[0]
            torch.testing.assert_close(logits[start : start + k], alone, atol=1e-4, rtol=1e-4)
            assert packed["labels"][0, start : start + k].tolist() == it["labels"]
            start += k
