"""The paper's judgment prompt (§3.3 "Stage 3") and the per-dataset judgment instructions (Table 13), as data.

``judgment_instruction(dataset, task=..., analog=...)`` looks an instruction up by dataset name (the same case- and
punctuation-insensitive matching as :func:`mmembed.prompts.embedding.instructions_for`), then by the real dataset a
synthetic one imitates (``meta["analog"]``), then falls back to a per-task instruction. The per-task fallbacks are
ours, phrased like the paper's entries, for datasets Table 13 does not list.
"""

from __future__ import annotations

from mmembed.prompts.embedding import _norm

#: The judgment template of §3.3, line by line; ``{query}`` and ``{target}`` may hold images (see ``Judge``).
JUDGE_HEAD = "{instruction}\nQuery: "
JUDGE_MIDDLE = "\nTarget: "
JUDGE_TAIL = (
    "\nPlease make your judgment. If relevant, output 'yes'. If irrelevant, output 'no'. You are only allowed to "
    "output 'yes' or 'no'. Please output strictly according to the requirements."
)

_CLS_LABEL = "Determine whether a given image contains an object specified by a class label."
_VQA = "Given a reference image and a question, determine whether the provided answer is correct."
_T2I = "Determine whether the given query text is relevant to the given image."
_I2T = "Determine whether the given text can serve as a caption for the given image."
_VD = "Determine whether the given query text is relevant to the given visual document image."

#: Table 13 (dataset -> judgment instruction). Direction-dependent datasets carry the task suffix.
JUDGMENT_INSTRUCTIONS: dict[str, str] = {
    "ImageNet-1K": _CLS_LABEL,
    "N24News": "Given news containing both image and text content, determine whether the category of the news "
               "matches the given category.",
    "VOC2007": _CLS_LABEL,
    "SUN397": "Determine whether the given image matches the given scene description.",
    "OK-VQA": _VQA,
    "A-OKVQA": _VQA,
    "DocVQA": _VQA,
    "InfographicsVQA": _VQA,
    "ChartQA": _VQA,
    "Visual7W": _VQA,
    "VisDial": "Determine whether the given dialogue text is relevant to the given target image.",
    "CIRR": "Given a text instruction, a reference image, and a target image, determine whether the reference image "
            "transformed by the text instruction is relevant to the target image.",
    "VisualNews_t2i": _T2I,
    "VisualNews_i2t": _I2T,
    "MSCOCO_t2i": _T2I,
    "MSCOCO_i2t": _I2T,
    "NIGHTS": "Determine whether the two given images are similar.",
    "WebQA": "Determine whether the query text is relevant to the given image-text mixed content.",
    "MSCOCO_it2i": "Given a reference image, a object label expressed in text pointing to an object in the reference "
                   "image, and a crop extracted from an image, determine whether the text label points to the given "
                   "crop.",
    "Colpali": _VD,
    "VisRAG": _VD,
}

# Names that mean a Table 13 entry (MMEB spellings, and datasets of the same construction: RefCOCO is MSCOCO-style
# grounding with crops, so it gets the MSCOCO IT->I instruction).
_ALIASES = {"InfographicVQA": "InfographicsVQA", "ColPali": "Colpali", "MSCOCO": "MSCOCO_it2i",
            "RefCOCO": "MSCOCO_it2i", "Visual7W-Pointing": "MSCOCO_it2i"}

#: Fallbacks by task for datasets Table 13 does not list (ours, in the paper's phrasing).
TASK_FALLBACK: dict[str, str] = {
    "t2i": _T2I,
    "i2t": _I2T,
    "it2t": _VQA,
    "it2i": "Given a reference image and a text instruction, determine whether the target image matches them.",
    "i2i": "Determine whether the two given images are similar.",
    "t2t": "Determine whether the given target text is relevant to the given query text.",
    "t2it": "Determine whether the query text is relevant to the given image-text mixed content.",
    "it2it": "Determine whether the given image-text query is relevant to the given image-text target.",
    "i2it": "Determine whether the given image is relevant to the given image-text mixed content.",
    "t2vd": _VD,
    "vd2t": _VQA,
}

#: Datasets whose labels are binary (Table 13 note): removing the ground truth leaves only true negatives.
BINARY_LABEL_DATASETS: tuple[str, ...] = ("HatefulMemes",)

_INDEX: dict[str, str] = {_norm(k): k for k in JUDGMENT_INSTRUCTIONS}
_INDEX.update({_norm(a): t for a, t in _ALIASES.items()})


def _lookup(name: str | None, task: str | None) -> str | None:
    if not name:
        return None
    if task is not None and (key := _INDEX.get(_norm(f"{name}_{task}"))) is not None:
        return JUDGMENT_INSTRUCTIONS[key]
    key = _INDEX.get(_norm(name))
    return JUDGMENT_INSTRUCTIONS[key] if key is not None else None


def judgment_instruction(dataset: str, task: str | None = None, analog: str | None = None) -> str:
    """The judgment instruction for a dataset: Table 13 by name, else by ``analog``, else by ``task``.

    Args:
        dataset: Dataset name (paper / MMEB spelling, or a kit dataset name).
        task: Task code (``"t2i"``, ``"i2t"``, ...): picks the direction of bidirectional entries and the fallback.
        analog: The real dataset a synthetic one imitates (``Sample.meta["analog"]``).

    Raises:
        KeyError: Neither the names nor the task are known; the message says how to pass one explicitly.
    """
    found = _lookup(dataset, task) or _lookup(analog, task) or TASK_FALLBACK.get(task or "")
    if found is None:
        raise KeyError(f"no judgment instruction for dataset {dataset!r} (task {task!r}); add it to "
                       "mmembed.prompts.judge.JUDGMENT_INSTRUCTIONS or pass instructions={name: text}")
    return found


def is_binary_label(dataset: str, analog: str | None = None,
                    binary_datasets: tuple[str, ...] | list[str] = BINARY_LABEL_DATASETS) -> bool:
    """Whether a dataset (or the real dataset it imitates) is in the binary-label skip list."""
    names = {_norm(n) for n in binary_datasets}
    return _norm(dataset) in names or (analog is not None and _norm(analog) in names)


def judgment_body(instruction: str, q_text: str | None, q_image: bool, t_text: str | None, t_image: bool,
                  image_token: str = "<image>") -> str:
    """The judge prompt as one string, each image as ``{image_token}\\n`` before its side's text.

    This is what :class:`mmembed.judge.Judge` renders for processors without a content-list chat template (the
    kit's), with ``<image>`` standing for the processor's image token as in LLaVA-style stage-1 records.
    """
    query = (f"{image_token}\n" if q_image else "") + (q_text or "")
    target = (f"{image_token}\n" if t_image else "") + (t_text or "")
    return JUDGE_HEAD.format(instruction=instruction) + query + JUDGE_MIDDLE + target + JUDGE_TAIL
