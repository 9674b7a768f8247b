"""Table 5's cross-modal evaluation: text-image retrieval (short and long captions) and SugarCrepe.

* Retrieval sets (Flickr30K, MSCOCO 5k, ShareGPT4V, Urban1K): every caption is ranked against all images of the set
  (``{set}_t2i``) and every image against all captions (``{set}_i2t``); the score is Hit@1 x100 (the paper's
  "Precision@1"; for an image with several captions any one of them counts). Hit@5 / Hit@10 are reported too.
* SugarCrepe sub-settings: each image scores its positive caption against its hard-negative caption; the score is
  the accuracy x100 (ties count one half).

Instructions are the paper's (Tables 11-12) for the set's public analog (``{analog}_t2i`` / ``{analog}_i2t``,
``SugarCrepe``); a set whose analog is not in the tables uses MSCOCO's. Groups: ``short``, ``long``,
``compositional`` (Table 5's column groups), ``other`` for unknown analogs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from mmembed.data.xmodal import CaptionSet, CompositionSet, load_xmodal_sets
from mmembed.eval import metrics
from mmembed.eval.results import BenchmarkResult, Encoder, SetScore, Timer
from mmembed.prompts.embedding import instructions_for
from mmembed.types import Item

#: Table 5's column group of each public set.
GROUPS = {"Flickr30K": "short", "MSCOCO": "short", "ShareGPT4V": "long", "Urban1K": "long",
          "SugarCrepe": "compositional"}
HIT_KS = (1, 5, 10)


def _instructions(analog: str | None, task: str) -> tuple[str, str]:
    try:
        return instructions_for(analog or "", task)
    except KeyError:
        return instructions_for("MSCOCO", task)


def _encode(embedder: Encoder, items: list[Item], role: str, batch_size: int, show: bool | None) -> torch.Tensor:
    return embedder.encode(items, role=role, batch_size=batch_size, show_progress=show).float()


def evaluate_caption_set(embedder: Encoder, s: CaptionSet, *, batch_size: int = 16,
                         show_progress: bool | None = None) -> dict[str, dict[str, float]]:
    """``{"t2i": {"hit@1": .., ...}, "i2t": {...}}`` (x100) for one retrieval set."""
    q_t2i, c_t2i = _instructions(s.analog, "t2i")
    q_i2t, c_i2t = _instructions(s.analog, "i2t")
    caps_q = _encode(embedder, [Item(text=t, instruction=q_t2i) for t in s.captions], "query", batch_size,
                     show_progress)
    imgs_c = _encode(embedder, [Item(image=p, instruction=c_t2i) for p in s.images], "candidate", batch_size,
                     show_progress)
    imgs_q = _encode(embedder, [Item(image=p, instruction=q_i2t) for p in s.images], "query", batch_size,
                     show_progress)
    caps_c = _encode(embedder, [Item(text=t, instruction=c_i2t) for t in s.captions], "candidate", batch_size,
                     show_progress)
    owner = torch.tensor(s.caption_image)
    t2i_rel = torch.zeros(len(s.captions), len(s.images))
    t2i_rel[torch.arange(len(s.captions)), owner] = 1
    out = {}
    for task, scores, rel in (("t2i", caps_q @ imgs_c.T, t2i_rel), ("i2t", imgs_q @ caps_c.T, t2i_rel.T)):
        out[task] = {f"hit@{k}": 100.0 * float(metrics.hit_at_k(scores, rel, k)) for k in HIT_KS}
    return out


def evaluate_composition_set(embedder: Encoder, s: CompositionSet, *, batch_size: int = 16,
                             show_progress: bool | None = None) -> dict[str, float]:
    """``{"accuracy": ..}`` (x100): how often an image scores its positive caption above its hard negative."""
    q_inst, c_inst = _instructions(s.analog or "SugarCrepe", "i2t")
    imgs = _encode(embedder, [Item(image=p, instruction=q_inst) for p in s.images], "query", batch_size,
                   show_progress)
    pos = _encode(embedder, [Item(text=t, instruction=c_inst) for t in s.positives], "candidate", batch_size,
                  show_progress)
    neg = _encode(embedder, [Item(text=t, instruction=c_inst) for t in s.negatives], "candidate", batch_size,
                  show_progress)
    sp, sn = (imgs * pos).sum(-1), (imgs * neg).sum(-1)
    return {"accuracy": 100.0 * float(((sp > sn).float() + 0.5 * (sp == sn).float()).mean())}


def _head(s: CaptionSet | CompositionSet, n: int | None) -> CaptionSet | CompositionSet:
    """The first ``n`` images of a set (and their captions), for quick checks."""
    if n is None or n >= len(s.images):
        return s
    if isinstance(s, CompositionSet):
        return CompositionSet(s.name, s.images[:n], s.positives[:n], s.negatives[:n], s.analog)
    keep = [i for i, o in enumerate(s.caption_image) if o < n]
    return CaptionSet(s.name, s.images[:n], [s.captions[i] for i in keep], [s.caption_image[i] for i in keep],
                      s.analog)


def evaluate_xmodal(
    embedder: Encoder,
    data: Mapping[str, CaptionSet | CompositionSet] | str | Path,
    out_dir: str | Path | None = None,
    *,
    batch_size: int = 16,
    names: list[str] | None = None,
    max_queries: int | None = None,
    show_progress: bool | None = None,
    extra: dict | None = None,
) -> BenchmarkResult:
    """Evaluate an embedder on cross-modal sets (paper Table 5 protocol, embedder only).

    Args:
        embedder: An :class:`mmembed.Embedder` or anything with its ``encode``.
        data: A folder with ``sets.json`` (see :func:`mmembed.data.xmodal.load_xmodal_sets`), a synthetic-world
            root, or ``{name: set}`` already read.
        out_dir: Where ``metrics.json`` and ``scores.png`` go; ``None`` writes nothing.
        batch_size: Encoding batch size.
        names: Only these sets.
        max_queries: Only the first N images of every set (and their captions).
        show_progress: Progress bars while encoding.
        extra: Context stored in ``metrics.json``.

    Returns:
        A ``BenchmarkResult`` (benchmark ``xmodal``) with sets ``{name}_t2i`` / ``{name}_i2t`` (Hit@1) and one per
        SugarCrepe sub-setting (accuracy), grouped ``short`` / ``long`` / ``compositional``.
    """
    sets = dict(data) if isinstance(data, Mapping) else load_xmodal_sets(data)
    if names is not None:
        unknown = [n for n in names if n not in sets]
        if unknown:
            raise ValueError(f"sets {unknown} are not in the data (have {sorted(sets)}); "
                             "fix --sets / names")
        sets = {n: sets[n] for n in names}
    out = Path(out_dir) if out_dir is not None else None
    result = BenchmarkResult("xmodal", "hit@1 | accuracy", "E", out_dir=out, extra=dict(extra or {}))
    for name, s in sets.items():
        s = _head(s, max_queries)
        compositional = isinstance(s, CompositionSet)
        with Timer() as t:
            fn = evaluate_composition_set if compositional else evaluate_caption_set
            values = fn(embedder, s, batch_size=batch_size, show_progress=show_progress)
        if compositional:
            result.sets[name] = SetScore(name, "compositional", None, values["accuracy"], values, len(s.images),
                                         2 * len(s.images), seconds=round(t.seconds, 3))
            continue
        group = GROUPS.get(s.analog or "", "other")
        for task, n_q, n_c in (("t2i", len(s.captions), len(s.images)), ("i2t", len(s.images), len(s.captions))):
            result.sets[f"{name}_{task}"] = SetScore(f"{name}_{task}", group, None, values[task]["hit@1"],
                                                     values[task], n_q, n_c, seconds=round(t.seconds / 2, 3))
    if out is not None:
        result.write()
    return result
