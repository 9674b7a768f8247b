"""Turning ``Item`` s into model inputs: templates, data-dependent tiling, the stock processor, padding."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import BatchFeature

from mmembed.backbone.templates import format_item_text
from mmembed.data.images import DEFAULT_MAX_PIXELS, describe_source, open_image
from mmembed.data.images import image_size as _image_size
from mmembed.data.skips import SkipSample
from mmembed.types import ImageLike, Item, Role


@dataclass(frozen=True)
class TilePolicy:
    """Max InternVL tiles per image by item kind (paper §5.2): natural images 1, visual documents 4 (+ thumbnail)."""

    natural: int = 1
    document: int = 4

    def __post_init__(self) -> None:
        if self.natural < 1 or self.document < 1:
            raise ValueError(f"tile caps must be >= 1, got natural={self.natural}, document={self.document}")

    def max_tiles(self, kind: str) -> int:
        return self.document if kind == "document" else self.natural


def _image_error(exn: SkipSample, what: str, image: object) -> ValueError:
    return ValueError(f"{what}: cannot read image {describe_source(image)}: {exn.reason} ({exn.detail[:200]})")


def load_image(image: ImageLike, what: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a PIL image, a path or encoded bytes with the kit's one decoder (EXIF rotation, alpha on white, the
    shards' pixel limit), so inference and evaluation see the pixels training sees; one-line errors.

    Raises:
        FileNotFoundError: A path that does not exist.
        ValueError: Not an image, above ``max_pixels``, or a mode that cannot become RGB.
    """
    if isinstance(image, str | Path) and not Path(image).is_file():
        raise FileNotFoundError(f"{what}: image file not found: {image}")
    try:
        return open_image(image, max_pixels=max_pixels)
    except SkipSample as exn:
        raise _image_error(exn, what, image) from None


def image_size(image: ImageLike, what: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of the image ``load_image`` returns (EXIF rotation included), without decoding pixels."""
    if isinstance(image, str | Path) and not Path(image).is_file():
        raise FileNotFoundError(f"{what}: image file not found: {image}")
    try:
        return _image_size(image, max_pixels=max_pixels)
    except SkipSample as exn:
        raise _image_error(exn, what, image) from None


class InputBuilder:
    """Builds padded model inputs for a list of items, using the stock InternVL processor.

    Each item is formatted with the paper's query/candidate template, wrapped in the tokenizer's chat template,
    and processed with its own tile cap (natural vs document), then all items are right-padded together. Right
    padding keeps every real token at the same position as when the item is encoded alone.

    Args:
        processor: an ``InternVLProcessor`` (``ImageOnlyInternVLProcessor``) whose ``image_seq_length`` matches the
            model's compression.
        tile_policy: tile caps per item kind.
        use_chat_template: wrap the templated text in the tokenizer's chat template (as InternVL3 is prompted).
        max_text_tokens: the item's free text is cut to this many tokens (image tokens are never cut).
        max_pixels: per-image pixel limit, the same as the shard reader's by default.
    """

    def __init__(self, processor, tile_policy: TilePolicy | None = None, use_chat_template: bool = True,
                 max_text_tokens: int = 256, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tile_policy = tile_policy or TilePolicy()
        self.use_chat_template = use_chat_template and self.tokenizer.chat_template is not None
        self.max_text_tokens = max_text_tokens
        self.max_pixels = max_pixels

    @property
    def image_token(self) -> str:
        return self.processor.image_token

    def _cut(self, text: str | None) -> str | None:
        # Byte-level BPE: every token covers at least one UTF-8 byte, so a short text cannot exceed the cap and
        # needs no extra tokenisation pass (this runs for every item in the loader workers).
        if not text or len(text.encode("utf-8")) <= self.max_text_tokens:
            return text
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= self.max_text_tokens else self.tokenizer.decode(ids[: self.max_text_tokens])

    def prompt(self, item: Item, role: Role) -> str:
        """The full prompt string for an item (image placeholder not yet expanded)."""
        body = format_item_text(self._cut(item.text), item.instruction, item.image is not None, role, self.image_token)
        if not self.use_chat_template:
            return body
        return self.tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                                  add_generation_prompt=True)

    def _image_kwargs(self, kind: str) -> dict:
        n = self.tile_policy.max_tiles(kind)
        return {"crop_to_patches": n > 1, "max_patches": n, "min_patches": 1}

    def encode_one(self, item: Item, role: Role, index: int = 0) -> dict:
        """Tokenize one item; returns ``input_ids`` (list), ``pixel_values`` (tensor or None), ``num_tiles``."""
        if item.is_empty:
            raise ValueError(f"item {index} has neither text nor image; drop it or give it content")
        text = self.prompt(item, role)
        if item.image is None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return {"input_ids": ids, "pixel_values": None, "num_tiles": 0}
        image = load_image(item.image, what=f"item {index}", max_pixels=self.max_pixels)
        out = self.processor(text=[text], images=[image], return_tensors="pt", **self._image_kwargs(item.kind))
        pv = out["pixel_values"]
        return {"input_ids": out["input_ids"][0].tolist(), "pixel_values": pv, "num_tiles": int(pv.shape[0])}

    def collate(self, encoded: list[dict]) -> BatchFeature:
        """Right-pad a list of ``encode_one`` outputs into one batch."""
        padded = self.tokenizer.pad({"input_ids": [e["input_ids"] for e in encoded]}, padding=True,
                                    padding_side="right", return_tensors="pt")
        data = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"],
                "num_tiles": torch.tensor([e["num_tiles"] for e in encoded], dtype=torch.long)}
        pvs = [e["pixel_values"] for e in encoded if e["pixel_values"] is not None]
        if pvs:
            data["pixel_values"] = torch.cat(pvs, dim=0)
        return BatchFeature(data)

    def __call__(self, items: list[Item], role: Role) -> BatchFeature:
        return self.collate([self.encode_one(it, role, i) for i, it in enumerate(items)])

    def num_tiles(self, item: Item) -> int:
        """Tiles an item's image will be cut into (0 without image), under this builder's tile policy."""
        if item.image is None:
            return 0
        w, h = image_size(item.image, max_pixels=self.max_pixels)
        return self.processor.image_processor.get_number_of_image_patches(h, w, self._image_kwargs(item.kind))

    def num_visual_tokens(self, item: Item) -> int:
        """``<IMG_CONTEXT>`` tokens the item costs: tokens per tile x tiles (thumbnail included)."""
        return self.processor.image_seq_length * self.num_tiles(item)
