"""Turning ``Item`` s into model inputs: templates, data-dependent tiling, the stock processor, padding."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from transformers import BatchFeature

from mmembed.backbone.templates import format_item_text
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


def load_image(image: Image.Image | str | Path, what: str = "image") -> Image.Image:
    """Open a PIL image or path as RGB, with a one-line error naming the path on failure."""
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{what}: cannot read image {path}: {e}") from None


def image_size(image: Image.Image | str | Path, what: str = "image") -> tuple[int, int]:
    """(width, height) without decoding pixels; same one-line errors as ``load_image``."""
    if isinstance(image, Image.Image):
        return image.size
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: image file not found: {path}")
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{what}: cannot read image {path}: {e}") from None


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
    """

    def __init__(self, processor, tile_policy: TilePolicy | None = None, use_chat_template: bool = True,
                 max_text_tokens: int = 256) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tile_policy = tile_policy or TilePolicy()
        self.use_chat_template = use_chat_template and self.tokenizer.chat_template is not None
        self.max_text_tokens = max_text_tokens

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
        return self.chat(body)

    def chat(self, body: str) -> str:
        """``body`` as the user turn of the chat template, ending with the assistant's generation prompt."""
        if not self.use_chat_template:
            return body
        return self.tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                                  add_generation_prompt=True)

    def cut(self, text: str | None) -> str | None:
        """``text`` cut to ``max_text_tokens`` tokens (``None`` stays ``None``)."""
        return self._cut(text)

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
        image = load_image(item.image, what=f"item {index}")
        out = self.processor(text=[text], images=[image], return_tensors="pt", **self._image_kwargs(item.kind))
        pv = out["pixel_values"]
        return {"input_ids": out["input_ids"][0].tolist(), "pixel_values": pv, "num_tiles": int(pv.shape[0])}

    def encode_prompt(self, text: str, images: Sequence[tuple[ImageLike, str]], what: str = "prompt") -> dict:
        """Tokenize a finished prompt holding one image placeholder per entry of ``images``, in order.

        Each image is tiled with its own kind's cap (a natural query image and a document candidate in one prompt
        get 1 and up to 4 tiles). Why not one processor call: the stock processor applies one tiling setting to all
        images of a call. The prompt is cut after each placeholder and each piece goes through the stock processor
        with its image; special tokens bound the pieces, so the concatenated ids equal those of a single call.

        Args:
            text: The prompt with ``self.image_token`` placeholders (chat template already applied).
            images: ``(image, kind)`` per placeholder.
            what: Names the prompt in error messages.

        Returns:
            Like :meth:`encode_one`: ``input_ids`` (list), ``pixel_values`` (tiles of all images, in order, or
            None) and ``num_tiles`` (their total).
        """
        parts = text.split(self.image_token)
        if len(parts) - 1 != len(images):
            raise ValueError(f"{what}: {len(parts) - 1} image placeholder(s) for {len(images)} image(s)")
        ids: list[int] = []
        pvs = []
        for i, (part, (image, kind)) in enumerate(zip(parts[:-1], images)):
            out = self.processor(text=[part + self.image_token], images=[load_image(image, what=f"{what} image {i}")],
                                 return_tensors="pt", **self._image_kwargs(kind))
            ids += out["input_ids"][0].tolist()
            pvs.append(out["pixel_values"])
        if parts[-1]:
            ids += self.tokenizer(parts[-1], add_special_tokens=False)["input_ids"]
        pv = torch.cat(pvs, dim=0) if pvs else None
        return {"input_ids": ids, "pixel_values": pv, "num_tiles": 0 if pv is None else int(pv.shape[0])}

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
        w, h = image_size(item.image)
        return self.processor.image_processor.get_number_of_image_patches(h, w, self._image_kwargs(item.kind))

    def num_visual_tokens(self, item: Item) -> int:
        """``<IMG_CONTEXT>`` tokens the item costs: tokens per tile x tiles (thumbnail included)."""
        return self.processor.image_seq_length * self.num_tiles(item)
