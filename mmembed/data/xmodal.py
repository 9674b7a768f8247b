"""Readers for the paper's Table 5 cross-modal sets, in their common public formats.

* Short captions -- Flickr30K and MSCOCO 5k test: the Karpathy-split JSON (``dataset_flickr30k.json``,
  ``dataset_coco.json``): ``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}, ...]}]}``; the
  ``test`` split holds 1k (Flickr30K) / 5k (MSCOCO) images with 5 captions each.
* Long captions -- ShareGPT4V (1k eval subset) and Urban1K: a JSON list / JSON lines of ``{"image", "caption"}``
  (ShareGPT4V's own ``{"image", "conversations": [..., {"from": "gpt", "value": caption}]}`` also reads), or
  Urban1K's folder layout ``image/<stem>.jpg`` + ``caption/<stem>.txt``.
* Compositional -- SugarCrepe: one JSON per sub-setting (``replace_obj.json``, ``swap_att.json``, ``add_att.json``,
  ...) mapping an id to ``{"filename", "caption", "negative_caption"}`` over COCO val2017 images.

Every reader returns plain data (image paths, caption strings, which image each caption describes); the runner in
:mod:`mmembed.eval.xmodal` turns it into ``Item`` s with the paper's instructions.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: A folder of cross-modal sets lists them here: ``{name: {"format", "path", "image_root"?, "analog"?, "split"?}}``.
SETS_FILE = "sets.json"
FORMATS = ("karpathy", "pairs", "urban1k", "sugarcrepe")


@dataclass
class CaptionSet:
    """Image-caption retrieval data: ``captions[i]`` describes ``images[caption_image[i]]``."""

    name: str
    images: list[str]
    captions: list[str]
    caption_image: list[int]
    analog: str | None = None


@dataclass
class CompositionSet:
    """SugarCrepe-style data: for ``images[i]``, ``positives[i]`` is right and ``negatives[i]`` a hard negative."""

    name: str
    images: list[str]
    positives: list[str]
    negatives: list[str]
    analog: str | None = None


def _check_images(paths: list[str], source: Path, root: Path) -> None:
    missing = [p for p in dict.fromkeys(paths) if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(set(paths))} images named in {source} are missing under "
                                f"{root} (first: {missing[0]}); pass the folder holding the images as image_root")


def _load_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; point to the {what} file")
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        try:  # JSON lines
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON or JSON lines ({e}); expected the {what} format") from None


def read_karpathy(path: str | os.PathLike, image_root: str | os.PathLike | None = None, *, split: str = "test",
                  name: str | None = None, analog: str | None = None, check_images: bool = True) -> CaptionSet:
    """Read one split of a Karpathy-split JSON (Flickr30K / MSCOCO); image path = ``image_root/filepath/filename``."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    data = _load_json(path, "Karpathy-split JSON")
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError(f"{path}: no 'images' list; expected the Karpathy-split JSON (dataset_*.json)")
    images, captions, owner = [], [], []
    for entry in data["images"]:
        if entry.get("split") != split:
            continue
        sentences = [s.get("raw") or " ".join(s.get("tokens", [])) for s in entry.get("sentences", [])]
        sentences = [s.strip() for s in sentences if s and s.strip()]
        if not sentences:
            continue
        images.append(str(root / entry.get("filepath", "") / entry["filename"]))
        captions += sentences
        owner += [len(images) - 1] * len(sentences)
    if not images:
        raise ValueError(f"{path}: no image in split {split!r}; the Karpathy files use 'train', 'val', 'test'")
    if check_images:
        _check_images(images, path, root)
    return CaptionSet(name or path.stem, images, captions, owner, analog)


def _pair_caption(rec: dict) -> str | None:
    if rec.get("caption"):
        return str(rec["caption"])
    replies = [c.get("value") for c in rec.get("conversations", []) if c.get("from") in ("gpt", "assistant")]
    return str(replies[-1]) if replies else None


def read_caption_pairs(path: str | os.PathLike, image_root: str | os.PathLike | None = None, *,
                       name: str | None = None, analog: str | None = None, check_images: bool = True) -> CaptionSet:
    """Read (image, long caption) pairs from a JSON list or JSON lines (ShareGPT4V-style records also work)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    data = _load_json(path, "caption pairs JSON")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of {{'image', 'caption'}} records")
    index: dict[str, int] = {}
    captions, owner = [], []
    for i, rec in enumerate(data):
        caption = _pair_caption(rec) if isinstance(rec, dict) else None
        if not caption or not rec.get("image"):
            raise ValueError(f"{path} record {i}: needs 'image' and 'caption' (or a gpt reply in 'conversations')")
        image = str(root / rec["image"])
        owner.append(index.setdefault(image, len(index)))
        captions.append(caption.strip())
    if check_images:
        _check_images(list(index), path, root)
    return CaptionSet(name or path.stem, list(index), captions, owner, analog)


def read_urban1k(folder: str | os.PathLike, *, name: str | None = None, analog: str | None = "Urban1K",
                 check_images: bool = True) -> CaptionSet:
    """Read Urban1K's layout: ``image/<stem>.<ext>`` with its caption in ``caption/<stem>.txt``."""
    folder = Path(folder)
    if not (folder / "image").is_dir() or not (folder / "caption").is_dir():
        raise FileNotFoundError(f"{folder}: expected image/ and caption/ folders (Urban1K layout)")
    images, captions = [], []
    for txt in sorted((folder / "caption").glob("*.txt")):
        found = sorted(p for p in (folder / "image").glob(txt.stem + ".*"))
        if not found:
            raise FileNotFoundError(f"{txt}: no image/{txt.stem}.* next to it ({folder})")
        images.append(str(found[0]))
        captions.append(txt.read_text(encoding="utf-8").strip())
    if not images:
        raise ValueError(f"{folder}/caption holds no .txt captions")
    if check_images:
        _check_images(images, folder, folder)
    return CaptionSet(name or folder.name, images, captions, list(range(len(images))), analog)


def read_sugarcrepe(path: str | os.PathLike, image_root: str | os.PathLike | None = None, *,
                    name: str | None = None, analog: str | None = "SugarCrepe",
                    check_images: bool = True) -> CompositionSet:
    """Read one SugarCrepe sub-setting JSON: ``{id: {"filename", "caption", "negative_caption"}}``."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    data = _load_json(path, "SugarCrepe JSON")
    records = list(data.values()) if isinstance(data, dict) else data
    images, pos, neg = [], [], []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not all(rec.get(k) for k in ("filename", "caption", "negative_caption")):
            raise ValueError(f"{path} record {i}: needs 'filename', 'caption' and 'negative_caption' (SugarCrepe)")
        images.append(str(root / rec["filename"]))
        pos.append(str(rec["caption"]).strip())
        neg.append(str(rec["negative_caption"]).strip())
    if not images:
        raise ValueError(f"{path}: no records")
    if check_images:
        _check_images(images, path, root)
    return CompositionSet(name or path.stem, images, pos, neg, analog)


def read_xmodal_set(folder: Path, name: str, spec: dict[str, Any]) -> CaptionSet | CompositionSet:
    """One entry of a ``sets.json``: ``format`` (karpathy / pairs / urban1k / sugarcrepe), ``path`` (relative to
    the folder), optional ``image_root`` (relative to the folder), ``analog`` (public set name) and ``split``."""
    fmt = spec.get("format")
    if fmt not in FORMATS:
        raise ValueError(f"{folder / SETS_FILE}: set {name!r} has format {fmt!r}; use one of {FORMATS}")
    if "path" not in spec:
        raise ValueError(f"{folder / SETS_FILE}: set {name!r} needs a 'path'")
    path = folder / spec["path"]
    root = folder / spec["image_root"] if spec.get("image_root") else None
    analog = spec.get("analog")
    if fmt == "karpathy":
        return read_karpathy(path, root, split=spec.get("split", "test"), name=name, analog=analog)
    if fmt == "pairs":
        return read_caption_pairs(path, root, name=name, analog=analog)
    if fmt == "urban1k":
        return read_urban1k(path, name=name, analog=analog or "Urban1K")
    return read_sugarcrepe(path, root, name=name, analog=analog or "SugarCrepe")


def load_xmodal_sets(folder: str | os.PathLike) -> dict[str, CaptionSet | CompositionSet]:
    """Every set listed in ``folder/sets.json`` (a synthetic-world root's ``eval/xmodal`` is used)."""
    folder = Path(folder)
    if (folder / "eval" / "xmodal").is_dir():
        folder = folder / "eval" / "xmodal"
    listing = folder / SETS_FILE
    if not listing.is_file():
        raise FileNotFoundError(f"{listing} not found; list the sets as {{name: {{format, path, image_root, analog}}}} "
                                "(see docs/real_data.md)")
    specs = json.loads(listing.read_text(encoding="utf-8"))
    return {name: read_xmodal_set(folder, name, spec) for name, spec in specs.items()}
