"""Decoding and validating raw shard samples: the one place a sample is checked against the schema.

:func:`validate_raw` checks a raw webdataset sample (tar key, duplicate members, JSON -> :class:`Sample` with
every field's type, duplicate ids) and is shared by training, ``inspect`` and ``count``; :func:`decode_sample`
adds the images through the kit's one image decoder (:func:`mmembed.data.images.open_image`).
:func:`decode_samples` is the pipeline stage that skips and counts every bad sample.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import webdataset as wds
from PIL import Image

from mmembed.data.images import DEFAULT_MAX_PIXELS, open_image
from mmembed.data.schema import Sample, SchemaError, Side
from mmembed.data.skips import SkipCounter, SkipSample
from mmembed.types import Item

log = logging.getLogger(__name__)

#: Set by the shard reader on a raw sample whose key repeats a member or comes back later in the same shard.
DUPLICATE_FLAG = "__duplicate__"


def check_key(key: str) -> None:
    """Refuse tar keys that are paths out of the shard: absolute, ``..`` segments, backslashes, drive letters.

    Raises:
        SkipSample: ``unsafe_member``.
    """
    parts = key.replace("\\", "/").split("/")
    if key.startswith(("/", "\\", "~")) or "\\" in key or ".." in parts or (len(key) > 1 and key[1] == ":"):
        raise SkipSample("unsafe_member", f"tar key {key[:80]!r} is a path outside the shard")


def parse_sample(data: bytes | str) -> Sample:
    """Parse a sample's JSON member into a :class:`Sample`, checking the whole schema.

    Raises:
        SkipSample: ``bad_json`` (does not parse, nests too deep, a field missing or of the wrong type),
            ``bad_text`` (a lone surrogate, an image token inside a text) or ``unsafe_member``.
    """
    try:
        d = json.loads(data)
    except RecursionError:
        raise SkipSample("bad_json", "JSON nested too deep") from None
    except (ValueError, TypeError) as exn:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SkipSample("bad_json", repr(exn)[:300]) from None
    try:
        return Sample.from_json(d)
    except SchemaError as exn:
        raise SkipSample(exn.reason, str(exn)) from None
    except RecursionError:
        raise SkipSample("bad_json", "JSON nested too deep") from None


def validate_raw(raw: Mapping[str, Any], seen_ids: set[str] | None = None) -> Sample:
    """Check one raw webdataset sample (``{"__key__", "json", ...}``) and return its :class:`Sample`.

    Args:
        raw: The sample as the shard reader groups it.
        seen_ids: Sample ids already read in this pass; a repeat is refused and a new id is added.

    Raises:
        SkipSample: ``unsafe_member``, ``duplicate_member``, ``missing_member`` (no JSON), ``bad_json``,
            ``bad_text``, ``empty_side`` or ``duplicate_id``.
    """
    check_key(str(raw.get("__key__", "")))
    if raw.get(DUPLICATE_FLAG):
        raise SkipSample("duplicate_member", str(raw[DUPLICATE_FLAG]))
    data = raw.get("json")
    if data is None:
        raise SkipSample("missing_member", "no .json member")
    sample = parse_sample(data)
    for side in sample.sides:
        if side.is_empty:
            raise SkipSample("empty_side", "a side has neither text nor image")
    if seen_ids is not None:
        if sample.id in seen_ids:
            raise SkipSample("duplicate_id", f"sample id {sample.id[:80]!r} was already read")
        seen_ids.add(sample.id)
    return sample


def decode_sample(
    raw: Mapping[str, Any], *, max_pixels: int = DEFAULT_MAX_PIXELS, seen_ids: set[str] | None = None
) -> tuple[Sample, dict[str, Image.Image]]:
    """Validate one raw webdataset sample and decode its images.

    Returns:
        The :class:`Sample` and a dict from member name (``"query.png"``) to its decoded RGB image.

    Raises:
        SkipSample: With the reason the sample cannot be used (see :func:`validate_raw` and
            :func:`~mmembed.data.images.open_image`).
    """
    sample = validate_raw(raw, seen_ids)
    return sample, {name: open_image(payload, max_pixels=max_pixels)
                    for name, payload in image_members(raw, sample).items()}


def image_members(raw: Mapping[str, Any], sample: Sample) -> dict[str, bytes | bytearray | memoryview]:
    """The encoded image members ``sample`` names, from its raw tar group (no decoding).

    Shared by :func:`decode_sample` and ``mmembed-data count``, so both find a member -- or miss it -- alike.

    Raises:
        SkipSample: ``missing_member`` (not in the group) or ``corrupt_image`` (not raw bytes).
    """
    members: dict[str, bytes | bytearray | memoryview] = {}
    for side in sample.sides:
        if side.image is None or side.image in members:
            continue
        payload = raw.get(side.image, raw.get(side.image.lower()))
        if payload is None:
            raise SkipSample("missing_member", f"no member {side.image!r}")
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise SkipSample("corrupt_image", f"member {side.image!r} is not raw bytes")
        members[side.image] = payload
    return members


def side_to_item(side: Side, images: Mapping[str, Image.Image]) -> Item:
    """The :class:`mmembed.types.Item` for one side, with its decoded image attached."""
    return Item(
        text=side.text,
        image=images[side.image] if side.image is not None else None,
        instruction=side.instruction,
        kind=side.kind,  # type: ignore[arg-type]  # validated by the schema
    )


@dataclass
class DecodedSample:
    """A decoded training sample as it leaves :func:`decode_samples`.

    Attributes:
        sample: The schema sample (JSON fields).
        images: Member name -> RGB image.
        key: The tar key.
        url: The shard it came from.
        skipped: Skips counted in this worker since the previous yielded sample (sum these across a batch).
    """

    sample: Sample
    images: dict[str, Image.Image]
    key: str = ""
    url: str = ""
    skipped: dict[str, int] = field(default_factory=dict)

    def items(self) -> tuple[Item, Item, list[Item]]:
        """``(query, positive, negatives)`` as Items ready for a processor/collate."""
        s = self.sample
        return (
            side_to_item(s.query, self.images),
            side_to_item(s.positive, self.images),
            [side_to_item(n, self.images) for n in s.negatives],
        )

    def extra_positive_items(self) -> list[Item]:
        """The judge-identified extra positives as Items (empty for shards without stage-3 curation)."""
        return [side_to_item(p, self.images) for p in self.sample.extra_positives]


def decode_samples(
    src: Iterable[Mapping[str, Any]], counter: SkipCounter | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Iterator[DecodedSample]:
    """Decode raw samples, skipping (and counting) the bad ones; a ``webdataset`` pipeline stage.

    Duplicate sample ids are detected within one pass of this stage (one worker's share of the shards per pass);
    repeats across workers or ranks are not seen here.

    Args:
        src: Raw samples from :func:`~mmembed.data.reading.shard_samples`.
        counter: Where skips are counted (a fresh one if None).
        max_pixels: Per-image pixel limit, see :func:`~mmembed.data.images.open_image`.
    """
    counter = counter if counter is not None else SkipCounter()
    start = Counter(counter.counts)
    seen_ids: set[str] = set()
    for raw in src:
        key, url = str(raw.get("__key__", "")), str(raw.get("__url__", ""))
        try:
            sample, images = decode_sample(raw, max_pixels=max_pixels, seen_ids=seen_ids)
        except SkipSample as skip:
            if counter.strict:
                raise
            counter.add(skip.reason, where=f"{url}:{key[:80]}", detail=skip.detail)
            continue
        yield DecodedSample(sample, images, key=key, url=url, skipped=counter.take_new())
    this_pass = Counter(counter.counts)
    this_pass.subtract(start)
    if any(v > 0 for v in this_pass.values()):
        log.warning("[%s] pass finished; skipped %s", counter.name, {k: v for k, v in this_pass.items() if v > 0})


#: Pipeline stage: ``decode_and_skip(counter=c)`` after :data:`~mmembed.data.reading.read_shard_samples`.
decode_and_skip = wds.pipelinefilter(decode_samples)
