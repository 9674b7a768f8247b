"""Core value types shared by every part of the kit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image

ImageLike = Image.Image | str | Path
Kind = Literal["natural", "document"]
Role = Literal["query", "candidate"]


@dataclass
class Item:
    """One side of a retrieval pair: any mix of instruction, text and image.

    Args:
        text: Free text (query text, caption, answer, ...). ``None`` when absent.
        image: A PIL image or a path to one. ``None`` when absent.
        instruction: Task instruction (paper Tables 11-12). ``None`` uses no instruction line.
        kind: ``"natural"`` (1 tile) or ``"document"`` (up to 4 tiles + thumbnail); decides the tiling policy.
    """

    text: str | None = None
    image: ImageLike | None = None
    instruction: str | None = None
    kind: Kind = "natural"

    def __post_init__(self) -> None:
        if self.kind not in ("natural", "document"):
            raise ValueError(f"Item.kind must be 'natural' or 'document', got {self.kind!r}")

    @property
    def is_empty(self) -> bool:
        return (self.text is None or not self.text.strip()) and self.image is None
