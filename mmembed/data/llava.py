"""LLaVA-style instruction JSON for stage 1: checked and normalised, dropped records counted by reason."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt", "model": "gpt"}


@dataclass
class LlavaReport:
    """Normalised records and the counts of records dropped, by reason."""

    records: list[dict[str, Any]]
    skipped: dict[str, int]

    def __str__(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"kept {len(self.records)} conversations; skipped: {skipped}"


def normalize_llava(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    out: str | os.PathLike | None = None,
    check_images: bool = True,
) -> LlavaReport:
    """Validate and normalise LLaVA-style instruction data.

    Normalises roles (``user``/``assistant`` -> ``human``/``gpt``), ids (strings, filled if absent) and a single
    image given as a one-element list; adds missing ``<image>`` placeholders at the start of the first human turn.
    Drops (and counts) records that are not dicts (``bad_record``), have unknown roles (``bad_role``), turns that do
    not alternate human/gpt starting with human and ending with gpt (``bad_turns``), empty or non-string values
    (``empty_turn``), more placeholders than images (``placeholder_mismatch``) or missing image files
    (``missing_image``).

    Args:
        path: The JSON file (a list of records).
        image_root: Folder image paths are relative to (default: the JSON's folder).
        out: Where to write the normalised JSON (optional).
        check_images: Check that every image file exists.

    Raises:
        ValueError: The file is not a JSON list.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exn:
        raise ValueError(f"{path}: not valid JSON ({exn}); LLaVA data is one JSON list of records") from exn
    if not isinstance(data, list):
        raise ValueError(f"{path}: top level is {type(data).__name__}; LLaVA data is a JSON list of records")
    kept, skipped = [], Counter()
    for i, rec in enumerate(data):
        reason = None
        if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list) or not rec["conversations"]:
            reason = "bad_record"
        else:
            images = rec.get("image")
            images = [] if images in (None, "") else ([images] if isinstance(images, str) else list(images))
            turns = []
            for turn in rec["conversations"]:
                role = _ROLES.get(str(turn.get("from", "")).lower()) if isinstance(turn, dict) else None
                if role is None:
                    reason = "bad_role"
                    break
                value = turn.get("value")
                if not isinstance(value, str) or not value.strip():
                    reason = "empty_turn"
                    break
                turns.append({"from": role, "value": value})
            if reason is None:
                roles = [t["from"] for t in turns]
                if roles != ["human", "gpt"] * (len(roles) // 2) or len(roles) % 2:
                    reason = "bad_turns"
            if reason is None:
                placeholders = sum(t["value"].count("<image>") for t in turns if t["from"] == "human")
                if placeholders > len(images):
                    reason = "placeholder_mismatch"
                elif placeholders < len(images):
                    turns[0]["value"] = "<image>\n" * (len(images) - placeholders) + turns[0]["value"]
            if reason is None and check_images and any(not (root / p).is_file() for p in images):
                reason = "missing_image"
            if reason is None:
                norm: dict[str, Any] = {"id": str(rec.get("id", f"{path.stem}_{i}"))}
                if images:
                    norm["image"] = images[0] if len(images) == 1 else images
                norm["conversations"] = turns
                kept.append(norm)
        if reason is not None:
            skipped[reason] += 1
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(kept, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return LlavaReport(kept, dict(sorted(skipped.items())))
