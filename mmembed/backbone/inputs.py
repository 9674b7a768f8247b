"""Turning ``Item`` s into model inputs: templates, data-dependent tiling, the stock processor, padding."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import BatchFeature

from mmembed.backbone import pixels
from mmembed.data.images import DEFAULT_MAX_PIXELS, describe_source, open_image
from mmembed.data.images import image_size as _image_size
from mmembed.data.skips import SkipSample
from mmembed.prompts.embedding import format_item_text, template_parts
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

    def processor_kwargs(self, kind: str) -> dict:
        """The image-processor arguments that apply this policy to an item of ``kind``."""
        return tiling_kwargs(self.max_tiles(kind))


def tiling_kwargs(max_tiles: int) -> dict:
    """InternVL dynamic-tiling arguments of the stock image processor for a tile cap (thumbnail added when > 1).

    The one home of how a tile cap becomes processor arguments: embedding inputs (``TilePolicy``) and stage-1
    conversations (``mmembed.datamodules.instruction``) both call it.
    """
    if max_tiles < 1:
        raise ValueError(f"max_tiles must be >= 1, got {max_tiles}")
    return {"crop_to_patches": max_tiles > 1, "max_patches": max_tiles, "min_patches": 1}


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

    Each item is formatted with the paper's query/candidate template as one user turn of the tokenizer's chat
    template (the released InternVL3-*-hf one: the image part renders as the image placeholder on its own line),
    followed by the generation prompt and the pooled token, and processed with its own tile cap (natural vs
    document); then all items are right-padded together. Right padding keeps every real token at the same position
    as when the item is encoded alone.

    The pooled token (paper eq. 1: the hidden state of the input's last token, "a single [EOS] token"): with
    ``pooled_token="eos"`` (default) the tokenizer's EOS token (``<|im_end|>`` for InternVL3) is appended after
    ``<|im_start|>assistant\\n``, so the embedding is read at an EOS token, as the paper describes. ``"prompt_end"``
    appends nothing: the embedding is read at the generation prompt's final newline (this kit's behaviour before
    the setting existed).

    Args:
        processor: an ``InternVLProcessor`` (``ImageOnlyInternVLProcessor``) whose ``image_seq_length`` matches the
            model's compression.
        tile_policy: tile caps per item kind.
        use_chat_template: wrap the templated text in the tokenizer's chat template (as InternVL3 is prompted).
        max_text_tokens: the item's free text is cut to this many tokens (image tokens are never cut).
        pooled_token: ``"eos"`` or ``"prompt_end"``, see above.
        max_pixels: per-image pixel limit, the same as the shard reader's by default.
        fast_images: tile, resize and normalise images with ``mmembed.backbone.pixels`` (tensor ops; same tiles and
            tokens, pixels within one 8-bit level of the stock processor's)
            and expand the image placeholder here, instead of calling the stock processor per item; ``False`` runs
            the stock processor (the reference the fast path is tested against). Falls back to the stock processor
            when the image processor uses settings the tensor path does not reproduce.
    """

    POOLED_TOKENS = ("eos", "prompt_end")

    def __init__(self, processor, tile_policy: TilePolicy | None = None, use_chat_template: bool = True,
                 max_text_tokens: int = 256, pooled_token: str = "eos",
                 max_pixels: int = DEFAULT_MAX_PIXELS, fast_images: bool = True) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tile_policy = tile_policy or TilePolicy()
        self.use_chat_template = use_chat_template and self.tokenizer.chat_template is not None
        self.max_text_tokens = max_text_tokens
        if pooled_token not in self.POOLED_TOKENS:
            raise ValueError(f"pooled_token must be one of {self.POOLED_TOKENS}, got {pooled_token!r}")
        if pooled_token == "eos" and self.tokenizer.eos_token is None:
            raise ValueError("pooled_token='eos' but the tokenizer has no eos_token; set one (InternVL3: <|im_end|>) "
                             "or use pooled_token='prompt_end'")
        self.pooled_token = pooled_token
        self.max_pixels = max_pixels
        self.fast_images = fast_images and pixels.supports(processor.image_processor)

    @property
    def image_token(self) -> str:
        return self.processor.image_token

    def _cut(self, text: str | None) -> str | None:
        # Byte-level BPE: every token covers at least one UTF-8 byte, so a short text cannot exceed the cap and
        # needs no extra tokenisation pass (this runs for every item in the loader workers).
        cap = self.max_text_tokens
        if not text or len(text.encode("utf-8")) <= cap:
            return text
        # A long text is tokenised in growing prefixes, not whole: a 20 MB field cost 32 s and 3.6 GB before it was
        # cut to 256 tokens. A prefix's first `cap` tokens are the whole text's once the cut lies far enough past
        # them (only the pre-token piece at the cut can tokenise differently); two prefixes of n and 2n characters
        # agreeing on them shows that, else the window doubles (the whole text at worst).
        window = 16 * cap
        ids = self._ids(text[:window])
        while len(text) > window:
            if len(ids) > cap:
                longer = self._ids(text[: 2 * window])
                if longer[:cap] == ids[:cap]:
                    return self.tokenizer.decode(ids[:cap])
                ids = longer
            else:
                ids = self._ids(text[: 2 * window])
            window *= 2
        return text if len(ids) <= cap else self.tokenizer.decode(ids[:cap])

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt(self, item: Item, role: Role) -> str:
        """The full prompt string for an item (image placeholder not yet expanded), ending in the pooled token."""
        text, has_image = self._cut(item.text), item.image is not None
        if self.use_chat_template:
            content = template_parts(text, item.instruction, has_image, role)
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                        add_generation_prompt=True)
            if has_image and self.image_token not in prompt:
                raise ValueError(
                    f"the tokenizer's chat template does not render an image part as {self.image_token!r}, which the "
                    "processor expands; use the released InternVL3-*-hf template "
                    "(mmembed.backbone.tokenizer.HF_CHAT_TEMPLATE) or use_chat_template=False")
        else:
            prompt = format_item_text(text, item.instruction, has_image, role, self.image_token)
        return prompt + (self.tokenizer.eos_token if self.pooled_token == "eos" else "")

    @property
    def pooled_token_id(self) -> int | None:
        """Id of the token every prompt ends with (read by last-token pooling); ``None`` for ``"prompt_end"``."""
        return self.tokenizer.eos_token_id if self.pooled_token == "eos" else None

    def chat(self, body: str) -> str:
        """``body`` as the user turn of the chat template, ending with the assistant's generation prompt (no pooled
        token: the reranker and the judge read the next token's logits there)."""
        if not self.use_chat_template:
            return body
        return self.tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                                  add_generation_prompt=True)

    def cut(self, text: str | None) -> str | None:
        """``text`` cut to ``max_text_tokens`` tokens (``None`` stays ``None``)."""
        return self._cut(text)

    def _image_kwargs(self, kind: str) -> dict:
        return self.tile_policy.processor_kwargs(kind)

    def encode_one(self, item: Item, role: Role, index: int = 0) -> dict:
        """Tokenize one item; returns ``input_ids`` (list), ``pixel_values`` (tensor or None), ``num_tiles``."""
        if item.is_empty:
            raise ValueError(f"item {index} has neither text nor image; drop it or give it content")
        text = self.prompt(item, role)
        if item.image is None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return {"input_ids": ids, "pixel_values": None, "num_tiles": 0}
        image = load_image(item.image, what=f"item {index}", max_pixels=self.max_pixels)
        if self.fast_images:
            pv = pixels.tile_pixels(image, self.processor.image_processor, self.tile_policy.max_tiles(item.kind))
            p = self.processor
            expanded = f"{p.start_image_token}{p.image_token * (p.image_seq_length * pv.shape[0])}{p.end_image_token}"
            ids = self.tokenizer(text.replace(p.image_token, expanded, 1), add_special_tokens=False)["input_ids"]
            return {"input_ids": ids, "pixel_values": pv, "num_tiles": int(pv.shape[0])}
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
            pil = load_image(image, what=f"{what} image {i}", max_pixels=self.max_pixels)
            out = self.processor(text=[part + self.image_token], images=[pil], return_tensors="pt",
                                 **self._image_kwargs(kind))
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
        w, h = image_size(item.image, max_pixels=self.max_pixels)
        return self.processor.image_processor.get_number_of_image_patches(h, w, self._image_kwargs(item.kind))

    def num_visual_tokens(self, item: Item) -> int:
        """``<IMG_CONTEXT>`` tokens the item costs: tokens per tile x tiles (thumbnail included)."""
        return self.processor.image_seq_length * self.num_tiles(item)

    def num_tokens(self, items: list[Item], role: Role) -> list[int]:
        """Sequence length of each item as ``encode_one`` builds it, without processing pixels.

        The prompts are tokenized in one call; an image adds its visual tokens plus ``<img>``/``</img>`` in place
        of the one placeholder token the prompt holds (the processor's expansion). Image sizes come from headers.
        """
        if not items:
            return []
        ids = self.tokenizer([self.prompt(it, role) for it in items], add_special_tokens=False)["input_ids"]
        return [len(t) + (self.num_visual_tokens(it) + 1 if it.image is not None else 0)
                for t, it in zip(ids, items)]
