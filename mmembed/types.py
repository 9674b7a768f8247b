"""Core value types shared by every part of the kit."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from PIL import Image

ImageLike = Image.Image | str | Path | bytes
Kind = Literal["natural", "document"]
Role = Literal["query", "candidate"]

#: InternVL's image markup. The processor expands ``<IMG_CONTEXT>`` into the image's tokens and the model matches
#: ``<img>``/``</img>`` blocks to images, so any of them inside a text would break the image-token count.
IMAGE_TOKEN_STRINGS = ("<IMG_CONTEXT>", "<img>", "</img>")


def text_problem(text: str) -> str | None:
    """Why a string cannot go into a prompt (a lone surrogate, or an image token inside it), else ``None``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exn:
        return f"not valid Unicode text ({exn.reason} at position {exn.start})"
    for token in IMAGE_TOKEN_STRINGS:
        if token in text:
            return f"contains the image token {token!r}; images go in the image field, not in text"
    return None


@dataclass
class Item:
    """One side of a retrieval pair: any mix of instruction, text and image.

    Args:
        text: Free text (query text, caption, answer, ...). ``None`` when absent.
        image: A PIL image, a path to an image file, or encoded image bytes. ``None`` when absent.
        instruction: Task instruction (paper Tables 11-12). ``None`` uses no instruction line.
        kind: ``"natural"`` (1 tile) or ``"document"`` (up to 4 tiles + thumbnail); decides the tiling policy.

    Raises:
        ValueError: A field of the wrong type, text that is not valid Unicode, or an image token inside a text.
    """

    text: str | None = None
    image: ImageLike | None = None
    instruction: str | None = None
    kind: Kind = "natural"

    def __post_init__(self) -> None:
        if self.kind not in ("natural", "document"):
            raise ValueError(f"Item.kind must be 'natural' or 'document', got {self.kind!r}")
        for name in ("text", "instruction"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, str):
                raise ValueError(f"Item.{name} must be a string or None, got {type(value).__name__}")
            problem = text_problem(value)
            if problem:
                raise ValueError(f"Item.{name} {problem}")
        image = self.image
        if image is not None and not isinstance(image, Image.Image | str | os.PathLike | bytes | bytearray):
            raise ValueError(f"Item.image must be a path, a PIL image or encoded bytes, got {type(image).__name__}")
        if isinstance(image, bytearray):
            self.image = bytes(image)

    @property
    def is_empty(self) -> bool:
        return (self.text is None or not self.text.strip()) and self.image is None


#: What ``Embedder.encode`` accepts per input (see :func:`as_item`).
EncodeInput = Item | str | Image.Image | os.PathLike | Mapping[str, Any]

_ITEM_FIELDS = tuple(f.name for f in fields(Item))


def as_item(value: Any, index: int = 0) -> Item:
    """Coerce one user input into an :class:`Item`.

    ``Item`` is kept; ``str`` is text; a ``PIL.Image.Image`` or a ``pathlib.Path`` / ``os.PathLike`` is an image (a
    plain ``str`` is always text, never a path); a mapping is ``Item(**mapping)`` with keys among
    ``text, image, instruction, kind``.

    Raises:
        TypeError: For any other type, or a mapping with unknown keys.
    """
    if isinstance(value, Item):
        return value
    if isinstance(value, str):
        return Item(text=value)
    if isinstance(value, Image.Image | os.PathLike):
        return Item(image=value if isinstance(value, Image.Image) else Path(value))
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(_ITEM_FIELDS))
        if unknown:
            raise TypeError(f"input {index}: unknown keys {unknown}; an item dict takes {', '.join(_ITEM_FIELDS)}")
        return Item(**value)
    raise TypeError(f"input {index} is a {type(value).__name__}; pass an mmembed.Item, a str (text), a PIL image, "
                    "a pathlib.Path (image file) or a dict with text/image/instruction/kind")
