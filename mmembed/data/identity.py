"""Which positive is which: a side's content key (exact duplicates share it) and the corpus id mining, curation and
saved indexes all use for it (so an index built from shards and the miner name a candidate alike)."""

from __future__ import annotations

import hashlib

from PIL import Image

from mmembed.data.schema import Side


def content_key(side: Side, image: Image.Image | None) -> str:
    """A hash of a side's content -- its text and decoded pixels -- that identifies exact duplicates.

    The instruction and the image encoding are left out: the same caption or picture stored twice (as PNG and JPEG,
    or under two templates) is the same candidate.
    """
    h = hashlib.sha1()
    # Length-prefixed parts, so a text can never run into the image header that follows it.
    text = side.text.encode("utf-8") if side.text is not None else None
    h.update(b"T%d:" % len(text) + text if text is not None else b"T-:")
    if image is not None:
        h.update(f"I{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
        h.update(image.tobytes())
    return h.hexdigest()


def corpus_id(dataset: str, side: Side, image: Image.Image | None, key: str | None = None) -> str:
    """The corpus id of a positive: its ``Side.id``, else ``{dataset}/sha1:{content hash}`` (saved indexes use it too).

    Args:
        key: The side's :func:`content_key` when already computed.
    """
    return side.id or f"{dataset}/sha1:{(key or content_key(side, image))[:16]}"
