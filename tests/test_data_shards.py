"""Shard writing (byte-reproducible) and robust reading (every bad sample counted, never fatal)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from rich.console import Console

from mmembed.data import cli
from mmembed.data.schema import Sample, Side
from mmembed.data.shards import (
    SkipCounter,
    SkipSample,
    count_shards,
    decode_and_skip,
    expand_urls,
    inspect_shards,
    iter_decoded,
    open_image,
    read_shard_samples,
    shards_by_dataset,
    tar_is_complete,
    to_rgb,
    write_shards,
)
from mmembed.types import Item
from tests.fixtures_data import bomb_png, png_bytes, text_sample


def _write(tmp_path, n=5, maxcount=2, negatives=1, name="a"):
    return write_shards((text_sample(i, negatives=negatives) for i in range(n)), str(tmp_path / f"{name}-%06d.tar"),
                        maxcount=maxcount)


def test_round_trip_splits_by_maxcount_and_restores_samples(tmp_path):
    paths = _write(tmp_path)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["a-000000.tar", "a-000001.tar", "a-000002.tar"]
    decoded = list(iter_decoded(paths))
    assert [d.sample.id for d in decoded] == [f"toy_t2i/{i:05d}" for i in range(5)]
    original, images = text_sample(3, negatives=1)
    d = decoded[3]
    assert d.sample == original
    assert np.array_equal(np.asarray(d.images["pos.png"]), np.asarray(images["pos.png"]))
    query, pos, negs = d.items()
    assert isinstance(query, Item) and query.text == "caption number 3" and query.image is None
    assert pos.image.size == (16, 16) and pos.instruction == "Represent the given image." and len(negs) == 1
    with tarfile.open(paths[0]) as tf:
        names = tf.getnames()
        assert names == ["toy_t2i_00000.json", "toy_t2i_00000.neg0.png", "toy_t2i_00000.pos.png",
                         "toy_t2i_00001.json", "toy_t2i_00001.neg0.png", "toy_t2i_00001.pos.png"]
        info = tf.getmember(names[0])
        assert (info.mtime, info.uname, info.uid, info.mode) == (0, "mmembed", 0, 0o444)


def test_identical_input_gives_identical_bytes(tmp_path):
    first = _write(tmp_path / "x")
    second = _write(tmp_path / "y")
    assert [open(p, "rb").read() for p in first] == [open(p, "rb").read() for p in second]
    changed = write_shards((text_sample(i + (i == 4), negatives=1) for i in range(5)), str(tmp_path / "z-%06d.tar"),
                           maxcount=2)
    assert open(changed[-1], "rb").read() != open(first[-1], "rb").read()


def test_write_rejects_bad_input_with_actionable_errors(tmp_path):
    sample, images = text_sample(0)
    with pytest.raises(ValueError, match="printf-style shard index"):
        write_shards([(sample, images)], str(tmp_path / "no-index.tar"))
    with pytest.raises(ValueError, match="duplicate sample key"):
        write_shards([(sample, images), (sample, images)], str(tmp_path / "d-%06d.tar"))
    with pytest.raises(ValueError, match="pass exactly one image per side"):
        write_shards([(sample, {})], str(tmp_path / "m-%06d.tar"))
    assert write_shards([], str(tmp_path / "empty-%06d.tar")) == []
    assert not list(tmp_path.glob("empty-*"))


def _raw_shard(path, records):
    """Write raw members (bypassing write_shards' validation) to build broken samples."""
    with wds.TarWriter(str(path), encoder=False, mtime=0) as w:
        for rec in records:
            w.write(rec)


def _meta(key, image=None, text="q", kind="natural"):
    s = Sample(id=key, dataset="bad", task="i2t", meta_task="retrieval",
               query=Side(text=None if image else text, image=image), positive=Side(text="label")).to_json()
    s["query"]["kind"] = kind  # Side refuses an unknown kind itself; write it around the check
    return json.dumps(s).encode()


def _tiff_cmyk() -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(buf, format="TIFF")
    return buf.getvalue()


def _png_of(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_reader_counts_each_bad_sample_and_converts_odd_modes(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 0])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 1  # index 1 transparent -> white
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (0, 255))
    la.putpixel((1, 0), (0, 0))
    i16 = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    good = {
        "palette": _png_of(palette),
        "la": _png_of(la),
        "i16": _png_of(i16),
        "cmyk": _tiff_cmyk(),
    }
    records = [{"__key__": k, "json": _meta(k, image=f"query.{'tiff' if k == 'cmyk' else 'png'}"),
                f"query.{'tiff' if k == 'cmyk' else 'png'}": v} for k, v in good.items()]
    records += [
        {"__key__": "corrupt", "json": _meta("corrupt", image="query.png"), "query.png": b"not an image"},
        {"__key__": "truncimg", "json": _meta("truncimg", image="query.png"), "query.png": png_bytes()[:-30]},
        {"__key__": "bomb", "json": _meta("bomb", image="query.png"), "query.png": bomb_png()},
        {"__key__": "big", "json": _meta("big", image="query.png"), "query.png": png_bytes(size=(400, 400))},
        {"__key__": "nomember", "json": _meta("nomember", image="query.png")},
        {"__key__": "nojson", "query.png": png_bytes()},
        {"__key__": "badjson", "json": b"{not json"},
        {"__key__": "badtask", "json": json.dumps({**json.loads(_meta("badtask")), "task": "x2y"}).encode()},
        {"__key__": "badkind", "json": _meta("badkind", kind="video")},
        {"__key__": "empty", "json": _meta("empty", text="  ")},
    ]
    _raw_shard(tmp_path / "bad-000000.tar", records)
    counter = SkipCounter("test")
    decoded = {d.key: d for d in iter_decoded([str(tmp_path / "bad-000000.tar")], counter=counter, max_pixels=100_000)}
    assert sorted(decoded) == ["cmyk", "i16", "la", "palette"]
    px = {k: np.asarray(d.images[d.sample.query.image]).tolist() for k, d in decoded.items()}
    assert px["palette"] == [[[255, 0, 0], [255, 255, 255]]]
    assert px["la"] == [[[0, 0, 0], [255, 255, 255]]]
    assert px["i16"] == [[[0, 0, 0], [128, 128, 128], [255, 255, 255]]]
    assert px["cmyk"][0][0] == [255, 255, 255]
    assert counter.as_dict() == {"bad_json": 3, "corrupt_image": 2, "decompression_bomb": 2, "empty_side": 1,
                                 "missing_member": 2}
    # the per-sample deltas carry every skip that happened before a good sample (here: none were trailing ones)
    assert sum(sum(d.skipped.values()) for d in decoded.values()) == 0  # all bad records come after the good ones


def test_unsupported_mode_and_open_image_limits():
    with pytest.raises(SkipSample) as info:
        to_rgb(Image.new("La", (2, 2)))
    assert info.value.reason == "unsupported_mode"
    assert open_image(png_bytes(size=(30, 20))).size == (30, 20)
    with pytest.raises(SkipSample, match="decompression_bomb"):
        open_image(png_bytes(size=(30, 20)), max_pixels=599)
    with pytest.raises(ValueError, match="unknown skip reason"):
        SkipCounter().add("oops")


def test_truncated_and_missing_shards_are_counted_once_and_the_epoch_goes_on(tmp_path):
    paths = _write(tmp_path, n=8, maxcount=4, negatives=0)
    data = open(paths[0], "rb").read()
    assert tar_is_complete(paths[0])
    good_tail = [d.sample.id for d in iter_decoded([paths[1]])]
    with tarfile.open(paths[0]) as tf:
        members = tf.getmembers()  # sample 0: json, png; sample 1: json, png; ...
    # cut 1: inside sample 1's image data (tarfile raises); cut 2: at that member's header (tarfile stays silent)
    for cut in (members[3].offset_data + members[3].size // 2, members[3].offset):
        open(paths[0], "wb").write(data[:cut])
        assert not tar_is_complete(paths[0])
        counter = SkipCounter()
        ids = [d.sample.id for d in iter_decoded([paths[0], str(tmp_path / "missing-000000.tar"), paths[1]],
                                                 counter=counter)]
        assert ids[-4:] == good_tail and ids[0] == "toy_t2i/00000"
        assert counter.counts["truncated_shard"] == 1 and counter.counts["missing_shard"] == 1
        assert len(ids) + counter.counts["missing_member"] <= 8


def _identity(x):
    return x


def test_skip_counts_travel_with_samples_from_dataloader_workers(tmp_path):
    import torch

    for s in range(2):  # per shard: two broken samples first, then good ones
        records = [{"__key__": f"b{s}{k}", "json": b"{broken"} for k in range(2)]
        _raw_shard(tmp_path / f"w-{s:06d}.tar", records)
        extra = write_shards((text_sample(10 * s + i) for i in range(3)), str(tmp_path / f"g{s}-%06d.tar"))
        with tarfile.open(tmp_path / f"w-{s:06d}.tar", "a") as out, tarfile.open(extra[0]) as src:
            for m in src.getmembers():
                out.addfile(m, src.extractfile(m))
    counter = SkipCounter()
    pipeline = wds.DataPipeline(
        wds.SimpleShardList([str(tmp_path / f"w-{s:06d}.tar") for s in range(2)]),
        wds.split_by_worker,
        read_shard_samples(counter=counter),
        decode_and_skip(counter=counter),
    )
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=2, collate_fn=_identity)
    got = list(loader)
    merged = SkipCounter()
    for d in got:
        merged.merge(d.skipped)
    assert len(got) == 6 and merged.as_dict() == {"bad_json": 4}
    assert counter.total == 0  # the main process's copy saw nothing: counts arrive only with the data


def test_count_expand_and_inspect(tmp_path, capsys):
    _write(tmp_path, n=5, maxcount=2)
    write_shards((text_sample(i, dataset="toy_other", task="i2i") for i in range(3)), str(tmp_path / "b-%06d.tar"))
    _raw_shard(tmp_path / "c-000000.tar", [{"__key__": "x", "json": b"{broken"}])
    counts = count_shards(str(tmp_path))
    assert counts["samples"] == 8 and counts["shards"] == 5
    assert counts["by_dataset"] == {"toy_other": 3, "toy_t2i": 5}
    assert counts["by_task"] == {"i2i": 3, "t2i": 5} and counts["skipped"] == {"bad_json": 1}
    assert shards_by_dataset(str(tmp_path / "[ab]-*.tar")) == {
        "a": [str(tmp_path / f"a-{i:06d}.tar") for i in range(3)], "b": [str(tmp_path / "b-000000.tar")]}
    (tmp_path / "odd.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="shard names must be"):
        shards_by_dataset(str(tmp_path / "odd.tar"))
    assert len(expand_urls(str(tmp_path / "a-{000000..000001}.tar"))) == 2
    assert len(expand_urls([str(tmp_path / "a-*.tar"), str(tmp_path / "b-000000.tar")])) == 4
    with pytest.raises(FileNotFoundError, match="no shards match"):
        expand_urls(str(tmp_path / "nothing-*.tar"))
    console = Console(file=io.StringIO(), width=200)
    shown = inspect_shards(str(tmp_path / "a-*.tar"), n=2, console=console)
    assert [d.sample.id for d in shown] == ["toy_t2i/00000", "toy_t2i/00001"]
    assert "caption number 1" in console.file.getvalue()
    assert cli.main(["count", str(tmp_path / "b-*.tar"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["by_dataset"] == {"toy_other": 3}
    assert cli.main(["count", str(tmp_path / "zzz-*.tar")]) == 2
    assert "mmembed-data: error: no shards match" in capsys.readouterr().err  # one line, on stderr


def test_extra_positives_round_trip_and_stay_out_of_the_original_layout(tmp_path):
    plain, images = text_sample(0, negatives=1)
    assert "extra_positives" not in plain.to_json()  # shards without judge data keep their bytes
    curated = Sample(id="toy/x", dataset="toy_t2i", task="t2i", meta_task="retrieval", query=plain.query,
                     positive=plain.positive, negatives=plain.negatives,
                     extra_positives=[Side(image="xpos0.png", id="c7"), Side(text="also right", id="c9")])
    extra = {**images, "xpos0.png": Image.new("RGB", (8, 8), (0, 255, 0))}
    paths = write_shards([(curated, extra)], str(tmp_path / "c-%06d.tar"))
    (dec,) = list(iter_decoded(paths))
    assert dec.sample == curated
    xs = dec.extra_positive_items()
    assert xs[0].image.getpixel((0, 0)) == (0, 255, 0) and xs[1].text == "also right"
    with pytest.raises(ValueError, match="xpos0.png"):
        write_shards([(curated, images)], str(tmp_path / "d-%06d.tar"))
