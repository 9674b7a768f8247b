"""The public benchmark suites as data (subset lists, not speed scripts -- those are in the top-level benchmarks/):
which subset belongs to which meta-task / collection, and which are OOD.

MMEB (image part, 36 subsets) and VisDoc (24 sets) as the public MMEB / VLM2Vec-V2 evaluation defines them
(paper §5.1, Tables 3-4). The runners look names up here to group scores; a set that is not on a public list (the
synthetic world's ``synth_*`` subsets, a private set) is grouped from the ``subsets.json`` / ``sets.json`` that
ships with the data (see :func:`read_groups`), or by explicit arguments.

Names are matched leniently (case, ``-`` / ``_`` / spaces ignored), so ``ImageNet_1K`` (the training repo's spelling)
finds ``ImageNet-1K`` and ``ViDoRe_biomedical_lectures_v2`` finds ``ViDoRe_biomedical_lectures_v2_multilingual``.
Bare ViDoRe / VisRAG names that would be ambiguous (``arxivqa``, ``docvqa``, ``infovqa`` exist in both) are not
aliased: use the prefixed VLM2Vec-V2 names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

MMEB_META_TASKS: dict[str, tuple[str, ...]] = {
    "classification": ("ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "Place365", "ImageNet-A",
                       "ImageNet-R", "ObjectNet", "Country211"),
    "vqa": ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W", "ScienceQA", "VizWiz", "GQA",
            "TextVQA"),
    "retrieval": ("VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS", "WebQA",
                  "FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS"),
    "grounding": ("MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"),
}
"""MMEB image subsets per meta-task (10 / 10 / 12 / 4), in the order of the public leaderboard."""

MMEB_OOD: frozenset[str] = frozenset({
    "Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211", "ScienceQA", "VizWiz", "GQA", "TextVQA",
    "FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing",
})
"""The 16 out-of-distribution MMEB subsets (no training split); the other 20 are IND."""

MMEB_SUBSETS: tuple[str, ...] = tuple(s for names in MMEB_META_TASKS.values() for s in names)

VISDOC_GROUPS: dict[str, tuple[str, ...]] = {
    "vidore_v1": ("ViDoRe_arxivqa", "ViDoRe_docvqa", "ViDoRe_infovqa", "ViDoRe_tabfquad", "ViDoRe_tatdqa",
                  "ViDoRe_shiftproject", "ViDoRe_syntheticDocQA_artificial_intelligence",
                  "ViDoRe_syntheticDocQA_energy", "ViDoRe_syntheticDocQA_government_reports",
                  "ViDoRe_syntheticDocQA_healthcare_industry"),
    "vidore_v2": ("ViDoRe_esg_reports_human_labeled_v2", "ViDoRe_biomedical_lectures_v2_multilingual",
                  "ViDoRe_economics_reports_v2_multilingual", "ViDoRe_esg_reports_v2_multilingual"),
    "visrag": ("VisRAG_ArxivQA", "VisRAG_ChartQA", "VisRAG_MP-DocVQA", "VisRAG_InfoVQA", "VisRAG_PlotQA",
               "VisRAG_SlideVQA"),
    "ood": ("ViDoSeek-page", "ViDoSeek-doc", "MMLongBench-page", "MMLongBench-doc"),
}
"""VisDoc sets per collection (Table 4's VDRv1 / VDRv2 / VR / OOD columns), with VLM2Vec-V2's names."""

VISDOC_GROUP_TITLES = {"vidore_v1": "ViDoRe v1", "vidore_v2": "ViDoRe v2", "visrag": "VisRAG", "ood": "OOD",
                       "ind": "IND"}  # "ind": sets grouped only by their split (the synthetic world's)

VISDOC_SETS: tuple[str, ...] = tuple(s for names in VISDOC_GROUPS.values() for s in names)


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name).lower()


def _aliases() -> dict[str, str]:
    table = {_norm(n): n for n in (*MMEB_SUBSETS, *VISDOC_SETS)}
    for name in VISDOC_GROUPS["vidore_v1"] + VISDOC_GROUPS["vidore_v2"]:
        bare = name.removeprefix("ViDoRe_")
        if bare not in ("arxivqa", "docvqa", "infovqa"):  # also VisRAG set names: ambiguous without a prefix
            table.setdefault(_norm(bare), name)
        if name.endswith("_multilingual"):  # DESIGN.md / the ViDoRe v2 paper spell them without the suffix
            short = name.removesuffix("_multilingual")
            table.setdefault(_norm(short), name)
            table.setdefault(_norm(short.removeprefix("ViDoRe_")), name)
    return table


_ALIASES = _aliases()


def canonical_name(name: str) -> str | None:
    """The public list's spelling of a subset / set name, or ``None`` when it is not on a public list."""
    return _ALIASES.get(_norm(name))


@dataclass(frozen=True)
class SetInfo:
    """Where one evaluated set sits in the report.

    Attributes:
        group: Meta-task for MMEB (``classification``, ``vqa``, ``retrieval``, ``grounding``), collection for VisDoc
            (``vidore_v1``, ``vidore_v2``, ``visrag``, ``ood``); ``other`` when unknown.
        split: ``ind`` or ``ood``; ``None`` when unknown (the set then counts in neither average).
    """

    group: str = "other"
    split: str | None = None


def mmeb_info(name: str) -> SetInfo | None:
    """Meta-task and IND/OOD of a public MMEB subset, or ``None`` if the name is not on the list."""
    canon = canonical_name(name)
    for task, names in MMEB_META_TASKS.items():
        if canon in names:
            return SetInfo(task, "ood" if canon in MMEB_OOD else "ind")
    return None


def visdoc_info(name: str) -> SetInfo | None:
    """Collection and IND/OOD of a public VisDoc set, or ``None`` if the name is not on the list."""
    canon = canonical_name(name)
    for group, names in VISDOC_GROUPS.items():
        if canon in names:
            return SetInfo(group, "ood" if group == "ood" else "ind")
    return None


def _split(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):  # {"ood": true}
        return "ood" if value else "ind"
    value = str(value).strip().lower()
    if value not in ("ind", "ood"):
        raise ValueError(f"split must be 'ind' or 'ood' (any case), got {value!r}")
    return value


def read_groups(path: str | Path) -> dict[str, SetInfo]:
    """Read a data folder's ``subsets.json`` (MMEB) or ``sets.json`` (VisDoc) into ``{name: SetInfo}``.

    Each entry may carry ``meta_task`` or ``group`` and ``split`` (``"IND"`` / ``"OOD"``, any case) or ``ood``
    (bool), which is what ``mmembed-data synth`` writes. A VisDoc entry without a group is grouped by its split.
    """
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    out = {}
    for name, meta in raw.items():
        split = _split(meta.get("split", meta.get("ood")))
        group = meta.get("meta_task") or meta.get("group") or split or "other"
        out[name] = SetInfo(str(group), split)
    return out


def resolve_info(
    name: str,
    lookup: str,
    groups: Mapping[str, SetInfo] | None = None,
    ind_ood: Mapping[str, str] | None = None,
) -> SetInfo:
    """Group and split of one set: explicit ``groups`` first, then the public list, then ``other``.

    Args:
        name: Set name as found in the data.
        lookup: ``"mmeb"`` or ``"visdoc"`` (which public list to consult).
        groups: Per-name information, e.g. from :func:`read_groups`.
        ind_ood: Per-name ``"ind"`` / ``"ood"`` overrides (wins over everything else for the split).
    """
    if groups and name in groups:
        info = groups[name]
    else:
        info = (mmeb_info if lookup == "mmeb" else visdoc_info)(name) or SetInfo()
    if ind_ood and name in ind_ood:
        info = SetInfo(info.group, _split(ind_ood[name]))
    return info
