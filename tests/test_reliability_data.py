"""Data-layer reliability: one image decoder for every path, one schema check for every reader, fuzzed decoding."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmembed.backbone.inputs import image_size, load_image
from mmembed.data.decode import decode_sample, validate_raw
from mmembed.data.images import DEFAULT_MAX_PIXELS, open_image
from mmembed.data.inspection import count_shards
from mmembed.data.reading import iter_decoded
from mmembed.data.schema import Sample, Side
from mmembed.data.skips import SkipCounter, SkipSample
from mmembed.data.writing import write_shards
from mmembed.types import Item
from tests.fixtures_data import bomb_png, png_bytes


def rotated_rgba_png() -> bytes:
    """A 6x4 half-transparent RGBA PNG whose EXIF says 'rotate 90 CW to display' (orientation 6)."""
    image = Image.new("RGBA", (6, 4), (255, 0, 0, 128))
    image.putpixel((0, 0), (0, 0, 255, 255))
    image.putpixel((5, 3), (0, 255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    image.save(buf, format="PNG", exif=exif.tobytes())
    return buf.getvalue()


def _i2t_sample(i: int = 0) -> Sample:
    return Sample(id=f"s/{i}", dataset="toy", task="i2t", meta_task="classification",
                  query=Side(image="query.png", instruction="Represent the given image."),
                  positive=Side(text="a red square"))


# --------------------------------------------------------------------------------------------------- one decoder
def test_same_rgba_rotated_image_gives_identical_pixels_in_training_eval_and_api(tmp_path):
    data = rotated_rgba_png()
    path = tmp_path / "page.png"
    path.write_bytes(data)
    # training: the shard reader
    urls = write_shards([(_i2t_sample(), {"query.png": data})], str(tmp_path / "t-%06d.tar"))
    (decoded,) = list(iter_decoded(urls))
    train = np.asarray(decoded.images["query.png"])
    # evaluation (Items hold paths) and the Python API (path, bytes or an opened PIL image)
    with Image.open(path) as opened:
        api_pil = np.asarray(load_image(opened))
    evaluation, api_bytes = np.asarray(load_image(str(path))), np.asarray(load_image(data))
    assert train.shape == (6, 4, 3)  # rotated: 4 wide, 6 high
    for other in (evaluation, api_bytes, api_pil):
        assert np.array_equal(train, other)
    assert train[0, 3].tolist() == [0, 0, 255]  # the opaque blue corner, moved by the rotation
    assert train[5, 0].tolist() == [255, 255, 255]  # the fully transparent pixel, composited on white
    assert image_size(str(path)) == (4, 6) == image_size(data)  # tiling sees the rotated size too


def test_input_builder_gives_training_and_eval_items_the_same_pixel_values(tmp_path):
    from mmembed.backbone.model import build_input_builder

    data = rotated_rgba_png()
    path = tmp_path / "page.png"
    path.write_bytes(data)
    urls = write_shards([(_i2t_sample(), {"query.png": data})], str(tmp_path / "t-%06d.tar"))
    (decoded,) = list(iter_decoded(urls))
    train_item = decoded.items()[0]
    builder = build_input_builder("tiny")
    assert builder.max_pixels == DEFAULT_MAX_PIXELS  # the shards' limit
    train = builder.encode_one(train_item, "query")
    for image in (str(path), data):
        other = builder.encode_one(Item(image=image, instruction=train_item.instruction), "query")
        assert torch_equal(train["pixel_values"], other["pixel_values"])
        assert train["input_ids"] == other["input_ids"]


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def test_the_api_applies_the_shards_pixel_limit_with_one_line_errors(tmp_path):
    header_only = bomb_png(8000, 7000)  # 56 MP: under PIL's own 179 MP limit, over the kit's 50 MP
    with pytest.raises(SkipSample, match="decompression_bomb"):
        open_image(header_only)
    for source in (header_only, Image.new("RGB", (8000, 7000))):
        with pytest.raises(ValueError, match="decompression_bomb") as info:
            load_image(source, what="item 3")
        assert "\n" not in str(info.value) and str(info.value).startswith("item 3: cannot read image")
    with pytest.raises(ValueError, match="corrupt_image"):
        load_image(b"not an image")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image(str(tmp_path / "nope.png"))


def test_item_validates_its_fields():
    assert Item(image=png_bytes()).image[:4] == b"\x89PNG"
    bad = [
        ({"text": 12345}, "Item.text must be a string"),
        ({"text": ["a", "b"]}, "Item.text must be a string"),
        ({"instruction": 5}, "Item.instruction must be a string"),
        ({"image": 5}, "Item.image must be a path, a PIL image or encoded bytes"),
        ({"image": ["a.png"]}, "Item.image must be"),
        ({"text": "look: <IMG_CONTEXT> here"}, "image token"),
        ({"text": "a <img> tag"}, "image token"),
        ({"text": "\ud800"}, "not valid Unicode"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            Item(**kwargs)


# ------------------------------------------------------------------------------------------- one schema check
def _sample_json(**changes) -> dict:
    d = _i2t_sample().to_json()
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        target = d
        for p in parents:
            target = target[p]
        if value is _DROP:
            target.pop(last)
        else:
            target[last] = value
    return d


_DROP = object()


def _raw_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


BAD_SAMPLES = {  # name -> (json value or raw bytes, expected reason)
    "image_int": (_sample_json(**{"query.image": 5}), "bad_json"),
    "image_list": (_sample_json(**{"query.image": ["query.png"]}), "bad_json"),
    "deep": (b"[" * 200_000 + b"]" * 200_000, "bad_json"),
    "text_int": (_sample_json(**{"positive.text": 12345}), "bad_json"),
    "text_list": (_sample_json(**{"positive.text": ["a", "b"]}), "bad_json"),
    "surrogate": (json.dumps(_sample_json(**{"positive.text": "\ud800"})).encode(), "bad_text"),
    "img_token": (_sample_json(**{"positive.text": "x <IMG_CONTEXT> y"}), "bad_text"),
    "instruction_int": (_sample_json(**{"query.instruction": 7}), "bad_json"),
    "side_id_int": (_sample_json(**{"positive.id": 3}), "bad_json"),
    "sample_id_list": (_sample_json(id=["s"]), "bad_json"),
    "meta_list": (_sample_json(meta=[1, 2]), "bad_json"),
    "missing_task": (_sample_json(task=_DROP), "bad_json"),
    "negatives_dict": (_sample_json(negatives={"a": 1}), "bad_json"),
    "unknown_side_field": (_sample_json(**{"positive.colour": "red"}), "bad_json"),
    "member_dotdot": (_sample_json(**{"query.image": "../../etc/passwd"}), "unsafe_member"),
    "member_abs": (_sample_json(**{"query.image": "/abs/query.png"}), "unsafe_member"),
    "not_object": (b"[1, 2, 3]", "bad_json"),
    "not_utf8": (b'{"id": "\xff"}', "bad_json"),
}


def _bad_shard(tmp_path: Path) -> tuple[str, dict[str, int], int]:
    members: list[tuple[str, bytes]] = []
    expected: dict[str, int] = {}
    for name, (value, reason) in BAD_SAMPLES.items():
        data = value if isinstance(value, bytes) else json.dumps(value).encode()
        members += [(f"{name}.json", data), (f"{name}.query.png", png_bytes())]
        expected[reason] = expected.get(reason, 0) + 1
    good = json.dumps(_sample_json(id="good")).encode()
    members += [("good.json", good), ("good.query.png", png_bytes())]
    # the same sample id under a second key: the first is kept, the repeat counted
    members += [("dupid.json", good), ("dupid.query.png", png_bytes())]
    # a key that comes back later in the shard, and a key with two JSON members
    members += [("again.json", json.dumps(_sample_json(id="again")).encode()), ("again.query.png", png_bytes()),
                ("other.json", json.dumps(_sample_json(id="other")).encode()), ("other.query.png", png_bytes()),
                ("again.json", json.dumps(_sample_json(id="again2")).encode()), ("again.query.png", png_bytes()),
                ("twice.json", json.dumps(_sample_json(id="twice")).encode()),
                ("twice.json", json.dumps(_sample_json(id="twice")).encode()), ("twice.query.png", png_bytes())]
    # tar keys that are paths out of the shard
    members += [("../evil.json", json.dumps(_sample_json(id="evil")).encode()), ("../evil.query.png", png_bytes()),
                ("/abs/evil2.json", json.dumps(_sample_json(id="evil2")).encode()),
                ("/abs/evil2.query.png", png_bytes())]
    # a sample without JSON, and one whose image member is absent
    members += [("nojson.query.png", png_bytes()), ("noimage.json", json.dumps(_sample_json(id="noimage")).encode())]
    for reason, n in (("duplicate_id", 1), ("duplicate_member", 2), ("unsafe_member", 2), ("missing_member", 2)):
        expected[reason] = expected.get(reason, 0) + n
    return _raw_tar(tmp_path / "bad-000000.tar", members), expected, 3  # good, again (first), other


def test_every_bad_sample_is_skipped_and_counted_by_reason_and_count_agrees(tmp_path):
    url, expected, n_good = _bad_shard(tmp_path)
    counter = SkipCounter("test")
    decoded = list(iter_decoded([url], counter=counter))
    assert sorted(d.sample.id for d in decoded) == ["again", "good", "other"] and len(decoded) == n_good
    assert counter.as_dict() == dict(sorted(expected.items()))
    counts = count_shards([url])
    assert counts["samples"] == n_good
    assert counts["skipped"] == counter.as_dict()  # count shares the reader's check (and labels)


def _train_and_count(url: str) -> tuple[tuple[int, dict], tuple[int, dict]]:
    counter = SkipCounter("train")
    n = len(list(iter_decoded([url], counter=counter)))
    counts = count_shards([url])
    return (n, counter.as_dict()), (counts["samples"], counts["skipped"])


def _three_samples(path: Path) -> tuple[str, bytes, list[tarfile.TarInfo]]:
    members = []
    for i in range(3):
        members += [(f"s{i}.json", json.dumps(_sample_json(id=f"s{i}")).encode()),
                    (f"s{i}.query.png", png_bytes((60 * i, 0, 0), (300, 300)))]
    url = _raw_tar(path, members)
    with tarfile.open(url) as tf:
        return url, Path(url).read_bytes(), tf.getmembers()


def test_count_agrees_with_training_on_a_returning_key_and_a_member_cut_by_truncation(tmp_path):
    j = {k: json.dumps(_sample_json(id=k)).encode() for k in "ab"}
    # key 'a' returns after 'b' with the image its JSON names: training reads 'a' without it, then a duplicate
    url = _raw_tar(tmp_path / "late-000000.tar", [("a.json", j["a"]), ("b.json", j["b"]),
                                                  ("b.query.png", png_bytes()), ("a.query.png", png_bytes())])
    train, count = _train_and_count(url)
    assert train == count == (1, {"duplicate_member": 1, "missing_member": 1})
    # a copy cut inside the last image's bytes: that sample lacks its image in training, and in count
    _, raw, members = _three_samples(tmp_path / "full-000000.tar")
    last = members[-1]
    cut = tmp_path / "cut-000000.tar"
    cut.write_bytes(raw[: last.offset_data + last.size // 2])
    train, count = _train_and_count(str(cut))
    assert train == count == (2, {"missing_member": 1, "truncated_shard": 1})


def test_damaged_shards_are_corrupt_not_truncated(tmp_path):
    import gzip
    import os

    url, raw, members = _three_samples(tmp_path / "ok-000000.tar")
    cases = {}
    cases["random"] = (os.urandom(6000), 0, "not a tar archive")
    cases["bad_gzip"] = (b"\x1f\x8b\x08\x00" + os.urandom(4000), 0, "bad gzip stream")
    flipped = bytearray(raw)
    flipped[5] ^= 0x20  # a byte of the first header's name: its checksum no longer matches
    cases["checksum_first"] = (bytes(flipped), 0, "bad tar header checksum")
    flipped = bytearray(raw)
    flipped[members[2].offset + 5] ^= 0x20  # the header of s1.json, inside the shard
    cases["checksum_inside"] = (bytes(flipped), 1, "bad checksum")
    gz = gzip.compress(raw)
    cases["truncated_gzip"] = (gz[: len(gz) // 2], None, None)
    cases["truncated_tar"] = (raw[: members[-1].offset_data + 10], 2, None)
    for name, (data, n_good, detail) in cases.items():
        path = tmp_path / f"{name}-000000.tar{'.gz' if 'gzip' in name else ''}"
        path.write_bytes(data)
        train, count = _train_and_count(str(path))
        assert train == count, name
        reason = "truncated_shard" if detail is None else "corrupt_shard"
        assert reason in train[1] and ("corrupt_shard" if detail is None else "truncated_shard") not in train[1], \
            (name, train)
        if n_good is not None:
            assert train[0] == n_good, (name, train)
        if detail is not None:
            counter = SkipCounter("x", log_first=0)
            list(iter_decoded([str(path)], counter=counter))
            from mmembed.data.reading import tar_damage

            assert detail in tar_damage(path)[1], (name, tar_damage(path))


def test_count_labels_missing_fields_as_bad_json_not_missing_members(tmp_path):
    d = _sample_json(task=_DROP)
    url = _raw_tar(tmp_path / "m-000000.tar", [("k.json", json.dumps(d).encode()), ("k.query.png", png_bytes())])
    assert count_shards([url])["skipped"] == {"bad_json": 1}


def test_validate_raw_refuses_what_the_writer_refuses():
    with pytest.raises(ValueError, match="must be a string"):
        Side(text=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="is a path"):
        Side(image="../x.png")
    with pytest.raises(SkipSample, match="duplicate_id"):
        raw = {"__key__": "a", "json": json.dumps(_sample_json()).encode(), "query.png": png_bytes()}
        validate_raw(raw, {"s/0"})


# ------------------------------------------------------------------------------------------------------- fuzz
_JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20),
                       st.sampled_from(["\ud800", "<IMG_CONTEXT>", "<img>", "", " ", "../x.png", "/a.png", "query.png",
                                        "pos.png", "neg0.png", "natural", "document", "i2t", "t2i", "vqa"]))
_JSON = st.recursive(_JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                     max_leaves=10)
_FIELDS = ["id", "dataset", "task", "meta_task", "query", "positive", "negatives", "meta", "extra_positives",
           "query.text", "query.image", "query.instruction", "query.kind", "query.id", "positive.text",
           "positive.image", "positive.kind", "positive.foo"]


def _mutated_png(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    b = bytearray(data)
    for pos, value in flips:
        b[pos % len(b)] = value
    return bytes(b)


_TEXT_FIELDS = ["id", "dataset", "query.text", "query.instruction", "query.id", "positive.text",
                "positive.instruction", "positive.id"]
_TEXT = st.one_of(st.text(max_size=30), st.sampled_from(["\ud800", "a\udfffb", "x <IMG_CONTEXT> y", "</img>", "", " "]))


@st.composite
def raw_samples(draw) -> dict:
    d = _i2t_sample().to_json()
    for _ in range(draw(st.integers(0, 3))):
        if draw(st.booleans()):  # a hostile string where a string belongs
            dotted, value = draw(st.sampled_from(_TEXT_FIELDS)), draw(_TEXT)
        else:  # any JSON value anywhere
            dotted, value = draw(st.sampled_from(_FIELDS)), draw(_JSON)
        *parents, last = dotted.split(".")
        target = d
        for p in parents:
            target = target.get(p) if isinstance(target, dict) else None
        if isinstance(target, dict):
            target[last] = value
    if draw(st.integers(0, 4)):
        data = json.dumps(d).encode()
    else:  # raw bytes: cut, garbled or deeply nested JSON
        data = draw(st.one_of(st.binary(max_size=64), st.just(json.dumps(d).encode()[: draw(st.integers(0, 40))]),
                              st.integers(1, 100_000).map(lambda n: b"{\"a\":" * n + b"1" + b"}" * n)))
    image = draw(st.one_of(st.just(png_bytes()), st.just(rotated_rgba_png()), st.binary(max_size=200),
                           st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6)
                           .map(lambda flips: _mutated_png(png_bytes(), flips)),
                           st.just(bomb_png(9000, 9000))))
    key = draw(st.sampled_from(["../k", "/k", "a/b", "k-1", "C:k"])) if draw(st.integers(0, 4)) == 0 else "k"
    return {"__key__": key, "json": data, "query.png": image, "pos.png": image}


@pytest.fixture(scope="module")
def builder():
    from mmembed.backbone.model import build_input_builder

    return build_input_builder("tiny")


FUZZ_EXAMPLES = 300


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(raw=raw_samples())
def test_fuzzed_samples_never_crash_the_reader_or_the_collate(raw, builder):
    """Every raw sample either decodes into items the InputBuilder encodes, or is skipped with a known reason."""
    try:
        sample, images = decode_sample(raw, seen_ids=set())
    except SkipSample as skip:
        event(f"skipped: {skip.reason}")  # --hypothesis-show-statistics lists how the cases ended
        return
    from mmembed.data.decode import DecodedSample

    query, positive, negatives = DecodedSample(sample, images).items()
    for role, item in (("query", query), ("candidate", positive)):
        builder.encode_one(item, role)  # type: ignore[arg-type]
    event("decoded and encoded")


def test_the_server_answers_item_validation_errors_with_400():
    from mmembed.serve.protocol import Limits, RequestError, parse_item

    for value in ("x <IMG_CONTEXT> y", {"text": "a\ud800b"}, {"instruction": "</img>", "text": "q"}):
        with pytest.raises(RequestError) as info:
            parse_item(value, "input[0]", Limits())
        assert info.value.status == 400 and info.value.code == "bad_text"


def test_converters_count_schema_errors_instead_of_stopping(tmp_path):
    from mmembed.data.converters import jsonl_to_shards

    (tmp_path / "i.png").write_bytes(png_bytes())
    lines = [{"query": "a red circle", "positive": {"image": "i.png"}},
             {"query": "a <IMG_CONTEXT> circle", "positive": {"image": "i.png"}},
             {"query": {"text": 123}, "positive": {"image": "i.png"}}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (report,) = jsonl_to_shards(path, tmp_path, tmp_path / "out", dataset="toy", meta_task="retrieval",
                                query_instruction="Find it.", target_instruction="Represent it.")
    assert report.written == 1 and report.skipped == {"bad_json": 1, "bad_text": 1}


def test_instruction_conversations_refuse_image_tokens_and_invalid_text(tmp_path, builder):
    from mmembed.datamodules.instruction import ConversationEncoder

    enc = ConversationEncoder(builder.processor, tmp_path)
    for value in ("what is <IMG_CONTEXT> here", "bad \ud800 text"):
        record = {"conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": "ok"}]}
        with pytest.raises(SkipSample) as info:
            enc.messages(record, 0)
        assert info.value.reason == "bad_text"
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}]}
    assert [m["role"] for m in enc.messages(good, 0)] == ["user", "assistant"]


def test_a_huge_text_is_cut_from_a_prefix_not_tokenised_whole(builder, monkeypatch):
    import random
    import time

    cap = builder.max_text_tokens
    rng = random.Random(0)
    words = ["red", "circle", "über", "日本語", "2024", "  ", "\n", "x" * 40, "!!!", "naïve", "😀"]
    texts = [" ".join(rng.choice(words) for _ in range(n)) for n in (10, 300, 5000)]
    texts += ["a" * 30_000, "1234567890" * 2000, "word " * 4000 + "z" * 9000, "=" * 50_000 + " end"]

    def whole(text):  # the reference: tokenise everything, keep the first `cap` tokens
        ids = builder.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= cap else builder.tokenizer.decode(ids[:cap])

    for text in texts:
        assert builder.cut(text) == whole(text), text[:60]
    # a 20 MB field: only prefixes of a few thousand characters reach the tokenizer
    seen: list[int] = []
    tokenizer = builder.tokenizer
    real_call = type(tokenizer).__call__

    def spy(self, text, *args, **kwargs):
        seen.append(len(text))
        return real_call(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", spy)
    huge = "lorem ipsum dolor sit amet " * (20 * 2**20 // 27)
    start = time.perf_counter()
    out = builder.cut(huge)
    assert max(seen) <= 64 * cap and time.perf_counter() - start < 5.0, (max(seen), time.perf_counter() - start)
    assert huge.startswith(out.rstrip()) and len(tokenizer(out, add_special_tokens=False)["input_ids"]) <= cap
