"""Embedding prompts: the templates of paper §3.1 and the per-dataset task instructions of Tables 11-12.

Templates: ``Instruct: {query instruction} <image> Query: {query text}`` for queries and
``Instruct: {target instruction} <image> Text: {target text}`` for candidates. ``template_parts`` turns an item
into chat-message content parts (text / image / text) so the released InternVL3-*-hf chat template renders the
image part itself (as the image placeholder on its own line); ``format_item_text`` renders the same parts without a
chat template.

The tables are data: ``instructions_for(name)`` looks a dataset up by name (case- and punctuation-insensitive,
so ``ImageNet_1K``, ``ImageNet-1K`` and ``imagenet1k`` are the same entry). Direction-dependent datasets
(MSCOCO, VisualNews, ...) are keyed with their task suffix, e.g. ``MSCOCO_t2i``; the bare name resolves to the
entry whose task matches ``task=`` when given.
"""

from __future__ import annotations

import re

#: The label before the item's text, per role (paper §3.1 templates).
TEXT_LABELS = {"query": "Query: ", "candidate": "Text: "}

_IMG = "Represent the given image."
_TXT = "Represent the given text."
_VD = "Represent the given visual documents."
_CROP = "Represent the cropped image."
_IT = "Represent the given image with related text information."
_VQA = "Represent the given image with the given query and retrieve the answer."
_RET_VD = "Retrieve relevant visual documents based on a given query."
_CAPTION = "Find an image caption describing the given image."
_EVERYDAY = "Find me an everyday image that matches the given query."

# name -> (task, query instruction, target instruction). Tables 11 and 12 of the paper, in order.
INSTRUCTIONS: dict[str, tuple[str, str, str]] = {
    "BAAI-MTP": ("t2t", "Retrieve relevant texts based on a given query.", _TXT),
    "ImageNet-1K_i2i": ("i2i", "Find a image that looks similar to the provided image.", _IMG),
    "NIGHTS": ("i2i", "Find a day-to-day image that looks similar to the provided image.", _IMG),
    "BLIP": ("t2i", "Retrieve relevant images based on a given query.", _IMG),
    "VisDial": ("t2i", "Represent the given dialogue about an image, which is used for image retrieval.", _IMG),
    "VisualNews_t2i": ("t2i", "Retrieve an image of the given query.", _IMG),
    "MSCOCO_t2i": ("t2i", _EVERYDAY, _IMG),
    "Flickr30K_t2i": ("t2i", _EVERYDAY, _IMG),
    "ShareGPT4V_t2i": ("t2i", _EVERYDAY, _IMG),
    "Urban1K_t2i": ("t2i", _EVERYDAY, _IMG),
    "Docmatix_t2vd": ("t2vd", _RET_VD, _VD),
    "Colpali": ("t2vd", _RET_VD, _VD),
    "VisRAG": ("t2vd", _RET_VD, _VD),
    "ViDoSeek": ("t2vd", _RET_VD, _VD),
    "MMLongBench": ("t2vd", _RET_VD, _VD),
    "Wiki-SS-NQ": ("t2vd", "Find the document image that can answer the given query.", _VD),
    "ImageNet-1K": ("i2t", "Represent the given image for classification.", _TXT),
    "HatefulMemes": (
        "i2t",
        "Represent the given image for binary classification to determine whether it constitutes hateful speech "
        "or not.",
        _TXT,
    ),
    "VOC2007": ("i2t", "Identify the object shown in the image.", _TXT),
    "SUN397": ("i2t", "Identify the scene shown in the image.", _TXT),
    "Place365": ("i2t", "Identify the scene shown in the image.", _TXT),
    "ImageNet-A": ("i2t", "Represent the given image for classification.", _TXT),
    "ImageNet-R": ("i2t", "Represent the given image for classification.", _TXT),
    "ObjectNet": ("i2t", "Identify the object shown in the image.", _TXT),
    "Country211": ("i2t", "Identify the country depicted in the image.", _TXT),
    "VisualNews_i2t": ("i2t", "Find a caption for the news in the given photo.", _TXT),
    "MSCOCO_i2t": ("i2t", "Find an image caption describing the given everyday image.", _TXT),
    "Flickr30K_i2t": ("i2t", _CAPTION, _TXT),
    "ShareGPT4V_i2t": ("i2t", _CAPTION, _TXT),
    "Urban1K_i2t": ("i2t", _CAPTION, _TXT),
    "SugarCrepe": ("i2t", _CAPTION, _TXT),
    # Table 12
    "MegaPairs": ("it2i", "Represent the given image with the given query and retrieve the related images.", _IMG),
    "CIRR": ("it2i", "Given an image, find a similar everyday image with the described changes as the given query.",
             _IMG),
    "N24News": ("it2t", "Represent the given news image with the given query for domain classification.", _TXT),
    "MSCOCO": (
        "it2i",
        "Select the portion of the image where the object label is represented by the given query.",
        _CROP,
    ),
    "FashionIQ": ("it2i", "Find an image to match the fashion image and style note.", _IMG),
    "Visual7W-Pointing": ("it2i", "Select the portion of the image that answers the given query.", _CROP),
    "RefCOCO": (
        "it2i",
        "Select the portion of the image where the object label is represented by the given query.",
        _CROP,
    ),
    "Docmatix": ("it2t", _VQA, _TXT),
    "OK-VQA": ("it2t", _VQA, _TXT),
    "A-OKVQA": ("it2t", _VQA, _TXT),
    "DocVQA": ("it2t", _VQA, _TXT),
    "InfographicsVQA": ("it2t", _VQA, _TXT),
    "ChartQA": ("it2t", _VQA, _TXT),
    "Visual7W": ("it2t", _VQA, _TXT),
    "ScienceQA": ("it2t", _VQA, _TXT),
    "VizWiz": ("it2t", _VQA, _TXT),
    "GQA": ("it2t", _VQA, _TXT),
    "TextVQA": ("it2t", _VQA, _TXT),
    "WebQA": ("t2it", "Find a related image and text content from Wikipedia that answers the given query.",
              "Represent the given Wikipedia image with related text information."),
    "EDIS": ("t2it", "Find a related image and text content from a news that matches the provided query.", _IT),
    "OVEN": ("it2it", "Retrieve a Wikipedia image-description pair that provides evidence for the given query.", _IT),
    "RefCOCO-Matching": ("it2it", "Select the identical object in the image that follows the given query.",
                         "Represent the object in the image that follows the given text."),
}

# Aliases seen in the wild (MMEB subset names, training-repo spellings).
_ALIASES = {"InfographicVQA": "InfographicsVQA", "Country-211": "Country211", "VisualNews": "VisualNews_t2i",
            "Flickr30K": "Flickr30K_t2i", "ShareGPT4V": "ShareGPT4V_t2i", "Urban1K": "Urban1K_t2i",
            "BLIP Bootstrapped Image-Text Pairs": "BLIP", "ColPali": "Colpali"}


def _norm(name: str) -> str:
    """A dataset name for lookups: lower case, letters and digits only (``ImageNet_1K`` -> ``imagenet1k``)."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


_INDEX: dict[str, str] = {_norm(k): k for k in INSTRUCTIONS}
_INDEX.update({_norm(a): t for a, t in _ALIASES.items()})


def instructions_for(dataset: str, task: str | None = None) -> tuple[str, str]:
    """Return the paper's ``(query_instruction, target_instruction)`` for a dataset name.

    Args:
        dataset: Dataset name as in the paper or MMEB (e.g. ``"ImageNet_1K"``, ``"MSCOCO_t2i"``, ``"CIRR"``).
        task: Optional task code (``"t2i"``, ``"i2t"``, ...) to pick the direction of bidirectional datasets.

    Raises:
        KeyError: the name is not in Tables 11-12; the message says to pass explicit instructions instead.
    """
    if task is not None:
        key = _INDEX.get(_norm(f"{dataset}_{task}"))
        if key is not None:
            return INSTRUCTIONS[key][1], INSTRUCTIONS[key][2]
    key = _INDEX.get(_norm(dataset))
    if key is None:
        raise KeyError(
            f"no instructions for dataset {dataset!r} in the paper's Tables 11-12; "
            "pass query/target instructions explicitly (e.g. --query-instruction/--target-instruction)"
        )
    return INSTRUCTIONS[key][1], INSTRUCTIONS[key][2]


def template_parts(text: str | None, instruction: str | None, has_image: bool, role: str) -> list[dict]:
    """The paper's query/candidate template (§3.1) as chat content parts, in order instruction, image, text.

    Parts that are absent are dropped (no ``Instruct:`` without an instruction, no ``Query:`` without text), so a
    text-only item has no image part. Adjacent text pieces are merged into one part.

    Returns:
        ``[{"type": "text", "text": ...} | {"type": "image"}, ...]``, the content of one user message.
    """
    if role not in TEXT_LABELS:
        raise ValueError(f"role must be one of {sorted(TEXT_LABELS)}, got {role!r}")
    pieces: list[dict] = []

    def add_text(s: str) -> None:
        if pieces and pieces[-1]["type"] == "text":
            pieces[-1]["text"] += " " + s
        else:
            pieces.append({"type": "text", "text": s})

    if instruction:
        add_text(f"Instruct: {instruction}")
    if has_image:
        if pieces:
            pieces[-1]["text"] += " "  # "Instruct: ... <image>": the placeholder follows the instruction's space
        pieces.append({"type": "image"})
    if text:
        if pieces and pieces[-1]["type"] == "image":
            pieces.append({"type": "text", "text": TEXT_LABELS[role] + text})
        else:
            add_text(TEXT_LABELS[role] + text)
    return pieces


def format_item_text(text: str | None, instruction: str | None, has_image: bool, role: str, image_token: str) -> str:
    """``template_parts`` as one string, the image part rendered as the chat template does: ``image_token + "\\n"``.

    E.g. ``Instruct: Find it. <IMG_CONTEXT>\\nQuery: a cat``; used when no chat template wraps the prompt.
    """
    parts = template_parts(text, instruction, has_image, role)
    return "".join(p["text"] if p["type"] == "text" else image_token + "\n" for p in parts)
