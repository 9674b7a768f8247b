"""The kit's embedder as a sentence-transformers module: ``SentenceTransformer(folder, trust_remote_code=True)``.

An exported folder's ``modules.json`` names :class:`MMEmbedModule`, which loads the folder with
``Embedder.from_pretrained`` and runs the kit's own preprocessing (the paper's templates, tiling, VTC token count)
and forward (VTC backbone, last-token pooling, L2 normalisation), so sentence-transformers' ``encode`` gives the
same vectors as ``Embedder.encode``. sentence-transformers' conventions map as follows:

- ``encode_query`` / ``encode_document`` (``task="query"`` / ``"document"``) choose the query / candidate template;
  a plain ``encode`` uses the query template (the ``Embedder.encode`` default).
- a prompt (``prompt=`` or a named prompt, ``prompt_name="MSCOCO_t2i-query"``) is the task *instruction* of the
  template, for inputs without their own; the saved named prompts are the paper's Tables 11-12.
- inputs: text ``str``; a ``str`` that is an image file path or a ``data:image/...;base64,`` URI; ``PIL.Image``;
  an (H, W, C) uint8 array; ``{"text": ..., "image": ...}`` dicts (also ``instruction`` / ``kind`` keys, as
  ``mmembed.Item``); ``mmembed.Item``. Image URLs are refused (nothing is fetched).

Requires the ``st`` extra (sentence-transformers >= 6.3).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sentence_transformers.base.modality import is_image_url_or_path
from sentence_transformers.base.modules.input_module import InputModule

from mmembed.embedder import Embedder, with_prompt
from mmembed.types import Item, as_item

#: The files ``SentenceTransformer.save`` writes itself.
ST_FILES = ("modules.json", "config_sentence_transformers.json")

#: sentence-transformers ``task`` values that select the candidate template.
DOCUMENT_TASKS = ("document", "passage", "corpus", "candidate")


def st_input_to_item(value: Any, index: int = 0) -> Item:
    """One sentence-transformers input as an ``Item`` (see the module docstring for what is accepted).

    Raises:
        ValueError: An image URL, or a chat-message input. TypeError: any other unsupported input.
    """
    if isinstance(value, str):
        if value.startswith("data:image/"):
            return Item(image=base64.b64decode(value.split(",", 1)[1]))
        if is_image_url_or_path(value):
            if os.path.isfile(value):
                return Item(image=Path(value))
            if value.startswith(("http://", "https://")):
                raise ValueError(f"input {index}: image URLs are not fetched; download {value!r} and pass its path")
        return Item(text=value)
    if isinstance(value, np.ndarray) and value.ndim == 3:
        return Item(image=Image.fromarray(value))
    message = value[0] if isinstance(value, list | tuple) and value else value
    if isinstance(message, dict) and "role" in message and "content" in message:
        raise ValueError(f"input {index}: chat messages are not supported; pass text, an image or a "
                         "{'text': ..., 'image': ...} dict")
    if isinstance(value, dict) and isinstance(value.get("image"), str):
        image = st_input_to_item(value["image"], index).image
        if image is None:
            raise ValueError(f"input {index}: 'image' {value['image']!r} is not an image file or data URI")
        value = {**value, "image": image}
    return as_item(value, index)


class MMEmbedModule(InputModule):
    """Input module + model in one: preprocessing and forward are ``Embedder``'s (see the module docstring).

    Args:
        embedder: The kit's embedder; its backbone becomes this module's submodule (so ``.to(device)`` moves it).
    """

    save_in_root = True

    def __init__(self, embedder: Embedder) -> None:
        super().__init__()
        self.embedder = embedder
        self.backbone = embedder.module  # registered as a submodule: device moves, eval(), parameters()
        self.tokenizer = embedder.input_builder.tokenizer

    @property
    def modalities(self) -> list:
        # "message" lets sentence-transformers pass mixed batches (its length sort mixes text and images); chat
        # message dicts themselves are refused in preprocess.
        return ["text", "image", ("image", "text"), "message"]

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", local_files_only: bool = False,
             **kwargs: Any) -> MMEmbedModule:
        """Load an exported folder with ``Embedder.from_pretrained`` (local folders only; nothing is fetched).

        ``model_kwargs={"dtype": ...}`` (sentence-transformers' ``model_kwargs``) sets the parameter dtype.
        """
        path = Path(model_name_or_path) / subfolder
        if not path.is_dir():
            raise ValueError(f"{model_name_or_path!r} is not a local folder; export one with Embedder.save_pretrained")
        model_kwargs = kwargs.get("model_kwargs") or {}
        dtype = model_kwargs.get("dtype", model_kwargs.get("torch_dtype"))
        return cls(Embedder.from_pretrained(path, device="cpu", dtype=dtype))

    def preprocess(self, inputs: Sequence[Any], prompt: str | None = None, task: str | None = None,
                   **kwargs: Any) -> dict[str, torch.Tensor]:
        """Items in the query (default) or candidate (``task="document"``) template, batched as the kit does."""
        role = "candidate" if task in DOCUMENT_TASKS else "query"
        items = [with_prompt(st_input_to_item(x, i), prompt) for i, x in enumerate(inputs)]
        for i, it in enumerate(items):
            if it.is_empty:
                raise ValueError(f"input {i} has neither text nor image; drop it or give it content")
        return dict(self.embedder.input_builder(items, role))

    def forward(self, features: dict[str, torch.Tensor], **kwargs: Any) -> dict[str, torch.Tensor]:
        """Adds ``sentence_embedding``: the L2-normalised last-token state (the model's native output)."""
        features["sentence_embedding"] = self.backbone.embed(**features, normalize=True).float()
        return features

    def get_embedding_dimension(self) -> int:
        return self.embedder.embed_dim

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        """Write the folder with ``Embedder.save_pretrained``, keeping the files ``SentenceTransformer.save`` wrote.

        sentence-transformers writes ``modules.json`` and ``config_sentence_transformers.json`` (its current prompts,
        similarity function, ...) before saving its modules; those win over the embedder's defaults.
        """
        out = Path(output_path)
        written = {name: (out / name).read_text() for name in ST_FILES if (out / name).is_file()}
        self.embedder.save_pretrained(out)
        for name, text in written.items():
            (out / name).write_text(text)
