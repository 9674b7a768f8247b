"""Synthetic analogs of Table 5's cross-modal sets, written in the sets' public formats.

* ``synth_short`` (analog MSCOCO / Flickr30K): Karpathy-split JSON, ``test`` split, two short captions per image
  (two of its objects, or one for a single-object scene).
* ``synth_long`` (analog Urban1K / ShareGPT4V): JSON lines of ``{"image", "caption"}`` with one long caption per image
  that lists every object and where it sits.
* ``synth_sugarcrepe_swap`` / ``synth_sugarcrepe_replace`` (analog SugarCrepe swap-attribute / replace-object):
  SugarCrepe JSON from the world's compositional task (``synth_ret_swap``): the right two-object caption against the
  same caption with the two colours swapped, or one shape replaced.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from mmembed.data.synth import scenes as sc
from mmembed.data.synth.tasks import BY_NAME
from mmembed.data.writing import encode_image

PNG_LEVEL = 1


def write_xmodal(name: str, out: Path, seed: int, cfg: Any) -> dict[str, Any]:
    """Write ``out/eval/xmodal/`` (images, the four sets, ``sets.json``); returns the ``sets.json`` content."""
    folder = out / "eval" / "xmodal"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    n, side = cfg.eval_queries, cfg.image_side

    def save(image, rel: str) -> str:
        (folder / "images" / rel).write_bytes(encode_image(image, "png", PNG_LEVEL))
        return rel

    rng = random.Random(f"{seed}/xmodal/short")
    images = []
    for i in range(n):
        scene = sc.random_scene(rng, (1, 3))
        objs = rng.sample(list(scene.objects), min(2, len(scene.objects)))
        images.append({"filename": save(sc.render(scene, side), f"short_{i:05d}.png"), "split": "test",
                       "sentences": [{"raw": sc.short_caption(scene, o)} for o in objs]})
    (folder / "synth_short.json").write_text(json.dumps({"images": images, "dataset": "synth"}, indent=1))

    rng = random.Random(f"{seed}/xmodal/long")
    lines = []
    for i in range(n):
        scene = sc.random_scene(rng, (2, 4))
        lines.append(json.dumps({"image": save(sc.render(scene, side), f"long_{i:05d}.png"),
                                 "caption": sc.long_caption(scene)}))
    (folder / "synth_long.jsonl").write_text("\n".join(lines) + "\n")

    examples = BY_NAME["synth_ret_swap"].generate(random.Random(f"{seed}/xmodal/sugarcrepe"), n, side)
    swap, repl = {}, {}
    for i, ex in enumerate(examples):
        rel = save(ex.q_image, f"sugarcrepe_{i:05d}.png")
        swapped, replaced = ex.negatives  # the world's compositional negatives, in this order
        swap[str(i)] = {"filename": rel, "caption": ex.pos.text, "negative_caption": swapped.text}
        repl[str(i)] = {"filename": rel, "caption": ex.pos.text, "negative_caption": replaced.text}
    (folder / "swap_att.json").write_text(json.dumps(swap, indent=1))
    (folder / "replace_obj.json").write_text(json.dumps(repl, indent=1))

    sets = {
        "synth_short": {"format": "karpathy", "path": "synth_short.json", "image_root": "images", "analog": "MSCOCO"},
        "synth_long": {"format": "pairs", "path": "synth_long.jsonl", "image_root": "images", "analog": "Urban1K"},
        "synth_sugarcrepe_swap": {"format": "sugarcrepe", "path": "swap_att.json", "image_root": "images",
                                  "analog": "SugarCrepe"},
        "synth_sugarcrepe_replace": {"format": "sugarcrepe", "path": "replace_obj.json", "image_root": "images",
                                     "analog": "SugarCrepe"},
    }
    (folder / "sets.json").write_text(json.dumps(sets, indent=2, sort_keys=True) + "\n")
    return {k: {**v, "images": n} for k, v in sets.items()}
