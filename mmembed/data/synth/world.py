"""Generate the whole synthetic world in the real formats: training shards, MMEB/VisDoc eval sets, stage-1 data.

Layout under ``out``::

    train/{dataset}-{shard:06d}.tar      one dataset per shard file (schema: mmembed.data.schema)
    eval/mmeb/{subset}.parquet           MMEB v2 image-eval columns; first candidate is the ground truth
    eval/mmeb/images/{subset}/*.png      paths in the parquet are relative to eval/mmeb/images/
    eval/mmeb/subsets.json               subset -> meta_task, IND/OOD, task, kinds, analog
    eval/visdoc/{set}/{queries,corpus,qrels}.parquet   BEIR layout (corpus image as HF Image struct)
    eval/visdoc/sets.json                set -> IND/OOD, style
    eval/xmodal/sets.json + files        Table 5 analogs in public formats (Karpathy JSON, caption pairs, SugarCrepe)
    instruct/llava.json + instruct/images/   LLaVA-style conversations
    manifest.json                        seed, size and counts per dataset / task / split

Planted false negatives (``false_negative_rate``, training sets only; evaluation sets stay clean): see
:func:`mmembed.data.synth.tasks.plant_false_negatives`. Every training sample lists, in ``meta["false_negative_ids"]``,
the ids of the other candidates that also answer its query -- planted or by chance -- and the manifest counts them.
A rate of 0 gives the world of earlier releases (only ``synth_ret_t2i`` / ``synth_ret_i2t`` carry chance twins).

Every unit of work draws from its own RNG, seeded by ``(seed, split, name)``, so the output is byte-identical for
a seed whatever the number of worker processes, and eval examples never share a random stream with training.
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mmembed.data.schema import Sample, Side
from mmembed.data.synth import documents as docs
from mmembed.data.synth.instruct import make_instruct
from mmembed.data.synth.tasks import BY_NAME, DATASETS, Cand, Example, SynthDataset, _companies, plant_false_negatives
from mmembed.data.synth.xmodal import write_xmodal
from mmembed.data.writing import encode_image, write_shards

FORMAT = "mmembed-synth/1"
IMAGE_TOKEN = "<|image_1|>"  # MMEB's legacy placeholder; the real parquet files carry it in the instructions
MMEB_COLUMNS = ("qry_inst", "qry_text", "qry_img_path", "tgt_inst", "tgt_text", "tgt_img_path")
PNG_LEVEL = 1  # zlib level for every PNG written here: ~2x faster than 6 for ~10% more bytes
VISDOC_SETS = {"synth_vidore": ("report", "ind"), "synth_slides": ("slide", "ood")}


@dataclass(frozen=True)
class SizeConfig:
    """How much to generate.

    Attributes:
        train_per_dataset: Training samples per (non-OOD) dataset.
        eval_queries: Queries per MMEB-style subset.
        eval_candidates: Candidates per query for subsets without a fixed label set (those use all labels).
        visdoc_companies: Companies per VisDoc set (3 pages each).
        visdoc_queries: Queries per VisDoc set.
        instruct: Stage-1 conversations.
        maxcount: Samples per training shard.
        image_side: Side of the square scene images.
    """

    train_per_dataset: int
    eval_queries: int
    eval_candidates: int
    visdoc_companies: int
    visdoc_queries: int
    instruct: int
    maxcount: int
    image_side: int = 256


SIZES: dict[str, SizeConfig] = {
    "ci": SizeConfig(24, 12, 8, 5, 12, 24, maxcount=8),
    "small": SizeConfig(96, 64, 16, 24, 64, 300, maxcount=24),
    # small's training data with evaluation sets precise to about a point: 256 queries per MMEB subset and per VisDoc
    # set (binomial SE of the overall MMEB score ~0.5 at tiny-model accuracies; 64 queries give ~1.1)
    "repro": SizeConfig(96, 256, 16, 96, 256, 300, maxcount=24),
    "full": SizeConfig(4000, 200, 20, 100, 200, 8000, maxcount=500),
}


# Chosen by measurement (docs/synthetic_world.md): at 0.3, 6.5% of a trained tiny miner's rule-based top-12
# negatives are planted false negatives (0.1: 3.8%, 0.2: 5.5%, 0.4: 8.5%; 0: 0.3%, the earlier world).
DEFAULT_FALSE_NEGATIVE_RATE = 0.3


def _rng(seed: int, split: str, name: str) -> random.Random:
    return random.Random(f"{seed}/{split}/{name}")


# -------------------------------------------------------------------------------------------------------- training
def false_negative_ids(examples: list[Example], dataset: str, cap: int = 32) -> list[list[str]]:
    """For each example, the ids of *other* positives that also answer its query (by the accepts/provides rule)."""
    index: dict[Any, list[int]] = {}
    for j, ex in enumerate(examples):
        for key in ex.pos.provides:
            index.setdefault(key, []).append(j)
    out = []
    for ex in examples:
        hits = {j for key in ex.accepts for j in index.get(key, ())}
        ids = sorted({f"{dataset}/{examples[j].pos.uid}" for j in hits if examples[j].pos.uid != ex.pos.uid})
        out.append(ids[:cap])
    return out


def _side(c: Cand, member: str, instruction: str, kind: str, dataset: str) -> Side:
    return Side(text=c.text, image=member if c.image is not None else None, instruction=instruction, kind=kind,
                id=f"{dataset}/{c.uid}")


def to_samples(ds: SynthDataset, examples: list[Example], fns: list[list[str]] | None = None
               ) -> Iterator[tuple[Sample, dict[str, Image.Image]]]:
    """Schema samples (with their images) for a dataset's examples, false negatives in ``meta`` (``fns``: their
    :func:`false_negative_ids` when already computed)."""
    fns = false_negative_ids(examples, ds.name) if fns is None else fns
    for i, ex in enumerate(examples):
        images: dict[str, Image.Image] = {}
        query = Side(text=ex.q_text, image="query.png" if ex.q_image is not None else None,
                     instruction=ds.query_instruction, kind=ds.query_kind, id=f"{ds.name}/{ex.q_uid}")
        if ex.q_image is not None:
            images["query.png"] = ex.q_image
        pos = _side(ex.pos, "pos.png", ds.target_instruction, ds.candidate_kind, ds.name)
        if ex.pos.image is not None:
            images["pos.png"] = ex.pos.image
        negs = []
        for j, c in enumerate(ex.negatives):
            negs.append(_side(c, f"neg{j}.png", ds.target_instruction, ds.candidate_kind, ds.name))
            if c.image is not None:
                images[f"neg{j}.png"] = c.image
        meta = {**ex.meta, "false_negative_ids": fns[i], "analog": ds.analog}
        sample = Sample(id=f"{ds.name}/{i:06d}", dataset=ds.name, task=ds.task, meta_task=ds.meta_task, query=query,
                        positive=pos, negatives=negs, meta=meta)
        yield sample, images


def write_train(name: str, out: Path, seed: int, cfg: SizeConfig, false_negative_rate: float = 0.0
                ) -> dict[str, Any]:
    """Generate and shard one training dataset; returns its manifest entry."""
    ds = BY_NAME[name]
    examples = ds.generate(_rng(seed, "train", name), cfg.train_per_dataset, cfg.image_side)
    examples, planted = plant_false_negatives(examples, _rng(seed, "false-negatives", name), false_negative_rate)
    pattern = str(out / "train" / f"{name}-%06d.tar")
    fns = false_negative_ids(examples, name)
    paths = write_shards(to_samples(ds, examples, fns), pattern, maxcount=cfg.maxcount, png_compress_level=PNG_LEVEL)
    return {
        "samples": len(examples),
        "shards": len(paths),
        "task": ds.task,
        "meta_task": ds.meta_task,
        "negatives": ds.negatives,
        "planted_false_negatives": planted,
        "queries_with_false_negatives": sum(bool(f) for f in fns),
        "false_negative_pairs": sum(len(f) for f in fns),
    }


# ---------------------------------------------------------------------------------------------------- MMEB eval
def write_mmeb(name: str, out: Path, seed: int, cfg: SizeConfig) -> dict[str, Any]:
    """Generate one MMEB-v2-style eval subset (parquet + images); returns its subsets.json entry."""
    ds = BY_NAME[name]
    examples = ds.generate(_rng(seed, "eval", name), cfg.eval_queries, cfg.image_side)
    pick = _rng(seed, "eval-distractors", name)
    root = out / "eval" / "mmeb" / "images"
    saved: set[str] = set()

    def save(image: Image.Image | None, uid: str) -> str:
        if image is None:
            return ""
        rel = f"{name}/{uid}.png"
        if rel not in saved:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(encode_image(image, "png", PNG_LEVEL))
            saved.add(rel)
        return rel

    cols: dict[str, list] = {k: [] for k in MMEB_COLUMNS}
    n_cands = []
    for i, ex in enumerate(examples):
        cands = [ex.pos] + [h for h in ex.hard if not ex.answered_by(h)]
        if ds.vocabulary is not None:
            labels = [v for v in ds.vocabulary if v != ex.pos.text]
            pick.shuffle(labels)
            cands = [ex.pos] + [Cand(v, None, frozenset([v])) for v in labels]
        else:
            others = [e.pos for j, e in enumerate(examples) if j != i]
            pick.shuffle(others)
            for c in others:
                if len(cands) >= cfg.eval_candidates:
                    break
                if not ex.answered_by(c) and all(c.uid != d.uid for d in cands):
                    cands.append(c)
            cands = cands[: cfg.eval_candidates]
        has_image = any(c.image is not None for c in cands)
        cols["qry_inst"].append((f"{IMAGE_TOKEN}\n" if ex.q_image is not None else "") + ds.query_instruction)
        cols["qry_text"].append(ex.q_text or "")
        cols["qry_img_path"].append(save(ex.q_image, ex.q_uid))
        cols["tgt_inst"].append((f"{IMAGE_TOKEN}\n" if has_image else "") + ds.target_instruction)
        cols["tgt_text"].append([c.text or "" for c in cands])
        cols["tgt_img_path"].append([save(c.image, c.uid) for c in cands])
        n_cands.append(len(cands))
    schema = pa.schema([(k, pa.string()) for k in ("qry_inst", "qry_text", "qry_img_path", "tgt_inst")]
                       + [("tgt_text", pa.list_(pa.string())), ("tgt_img_path", pa.list_(pa.string()))])
    table = pa.table({k: cols[k] for k in schema.names}, schema=schema)
    pq.write_table(table, out / "eval" / "mmeb" / f"{name}.parquet")
    return {
        "meta_task": ds.meta_task,
        "split": "OOD" if ds.ood else "IND",
        "task": ds.task,
        "query_kind": ds.query_kind,
        "candidate_kind": ds.candidate_kind,
        "analog": ds.analog,
        "queries": len(examples),
        "candidates_per_query": [min(n_cands), max(n_cands)],
        "images": len(saved),
    }


# -------------------------------------------------------------------------------------------------- VisDoc eval
def write_visdoc(name: str, out: Path, seed: int, cfg: SizeConfig) -> dict[str, Any]:
    """Generate one BEIR-layout visual-document retrieval set; returns its sets.json entry."""
    style, split = VISDOC_SETS[name]
    rng = _rng(seed, "visdoc", name)
    folder = out / "eval" / "visdoc" / name
    folder.mkdir(parents=True, exist_ok=True)
    companies = _companies(rng, cfg.visdoc_companies)
    corpus: dict[str, list] = {"corpus-id": [], "image": []}
    for c in companies:
        for page_type in docs.PAGE_TYPES:
            cid = f"{c.name}_{page_type}"
            png = encode_image(docs.render_page(c, page_type, style=style), "png", PNG_LEVEL)
            corpus["corpus-id"].append(cid)
            corpus["image"].append({"bytes": png, "path": f"{cid}.png"})
    pool = [(c, q) for c in companies for q in docs.questions(c)]
    rng.shuffle(pool)
    queries: dict[str, list] = {"query-id": [], "query": [], "answer": []}
    qrels: dict[str, list] = {"query-id": [], "corpus-id": [], "score": []}
    for k, (c, q) in enumerate(pool[: cfg.visdoc_queries]):
        qid = f"q{k:05d}"
        queries["query-id"].append(qid)
        queries["query"].append(q.text)
        queries["answer"].append(q.answer)
        qrels["query-id"].append(qid)
        qrels["corpus-id"].append(f"{c.name}_{q.page_type}")
        qrels["score"].append(1)
    # the layout of ViDoRe / VisRAG on the Hugging Face hub: `datasets.Image` stored as {bytes, path}, and the
    # schema metadata that makes `datasets.load_dataset("parquet", ...)` decode the column as images
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    features = {"corpus-id": {"dtype": "string", "_type": "Value"}, "image": {"_type": "Image"}}
    schema = pa.schema([("corpus-id", pa.string()), ("image", image_type)],
                       metadata={"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(pa.table(corpus, schema=schema), folder / "corpus.parquet")
    pq.write_table(pa.table(queries), folder / "queries.parquet")
    pq.write_table(pa.table(qrels, schema=pa.schema([("query-id", pa.string()), ("corpus-id", pa.string()),
                                                     ("score", pa.int64())])), folder / "qrels.parquet")
    return {"split": split.upper(), "style": style, "queries": len(queries["query"]), "corpus": len(corpus["image"]),
            "qrels": len(qrels["score"])}


# ------------------------------------------------------------------------------------------------------ stage 1
def write_instruct(name: str, out: Path, seed: int, cfg: SizeConfig) -> dict[str, Any]:
    """Generate the LLaVA-style stage-1 set; returns its manifest entry."""
    folder = out / "instruct"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records, kinds = [], Counter()
    made = make_instruct(_rng(seed, "instruct", name), cfg.instruct, cfg.image_side)
    for i, (kind, image, record) in enumerate(made):
        rel = f"images/{i:06d}.png"
        (folder / rel).write_bytes(encode_image(image, "png", PNG_LEVEL))
        records.append({"id": record["id"], "image": rel, "conversations": record["conversations"]})
        kinds[kind] += 1
    (folder / "llava.json").write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"conversations": len(records), "by_kind": dict(sorted(kinds.items()))}


def write_judge(name: str, out: Path, seed: int, cfg: SizeConfig) -> dict[str, Any]:
    """Judge relevance questions for stage 1 (train + held-out); see :mod:`mmembed.data.synth.judge_questions`."""
    from mmembed.data.synth.judge_questions import write_judge_questions

    return write_judge_questions(name, out, seed, cfg, PNG_LEVEL)


_WRITERS = {"train": write_train, "mmeb": write_mmeb, "visdoc": write_visdoc, "instruct": write_instruct,
            "judge": write_judge, "xmodal": write_xmodal}


def _run(unit: tuple[str, str], out: Path, seed: int, cfg: SizeConfig, fn_rate: float) -> dict[str, Any]:
    if unit[0] == "train":
        return write_train(unit[1], out, seed, cfg, fn_rate)
    return _WRITERS[unit[0]](unit[1], out, seed, cfg)


def plan(datasets: tuple[SynthDataset, ...] = DATASETS) -> list[tuple[str, str]]:
    """The units of work, in manifest order."""
    units = [("train", d.name) for d in datasets if not d.ood]
    units += [("mmeb", d.name) for d in datasets if d.meta_task != "visdoc"]
    units += [("visdoc", name) for name in VISDOC_SETS]
    units += [("xmodal", "table5")]
    return units + [("instruct", "llava"), ("judge", "questions")]


def _prepare(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; choose an empty folder or pass --overwrite")
        if not (out / "manifest.json").exists() and not (out / "train").exists():
            raise FileExistsError(f"{out} holds files that are not a synthetic world; refusing to overwrite it")
        for sub in ("train", "eval", "instruct"):
            shutil.rmtree(out / sub, ignore_errors=True)
        (out / "manifest.json").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def generate(
    out: str | Path,
    seed: int = 0,
    size: str = "ci",
    *,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    false_negative_rate: float = DEFAULT_FALSE_NEGATIVE_RATE,
) -> dict[str, Any]:
    """Generate the synthetic world under ``out`` (see the module docstring for the layout).

    Args:
        out: Output folder (must be empty unless ``overwrite``).
        seed: Random seed; the same seed and size give byte-identical files.
        size: ``"ci"`` (seconds), ``"small"`` (CPU quickstart) or ``"full"`` (tens of minutes of tiny-model training).
        workers: Processes used to generate units in parallel (does not change the output).
        overwrite: Replace a previous synthetic world in ``out``.
        progress: Show a rich progress bar.
        false_negative_rate: Share of training examples given a planted false negative (a paraphrased label or
            answer, or a second view of the same thing; see :func:`~mmembed.data.synth.tasks.plant_false_negatives`);
            0 gives the world of earlier releases.

    Returns:
        The manifest (also written to ``out/manifest.json``).
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; use one of {list(SIZES)}")
    if not 0.0 <= float(false_negative_rate) <= 1.0:
        raise ValueError(f"false_negative_rate must be in [0, 1], got {false_negative_rate}")
    cfg, out = SIZES[size], Path(out)
    _prepare(out, overwrite)
    (out / "eval" / "mmeb").mkdir(parents=True, exist_ok=True)
    units = plan()
    results: dict[tuple[str, str], dict[str, Any]] = {}
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("[bold]synth[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task(f"{size} seed={seed}", total=len(units))
        if workers > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = {u: pool.submit(_run, u, out, seed, cfg, false_negative_rate) for u in units}
                for u in units:
                    results[u] = futures[u].result()
                    bar.update(task, advance=1, description=f"{u[0]}/{u[1]}")
        else:
            for u in units:
                bar.update(task, description=f"{u[0]}/{u[1]}")
                results[u] = _run(u, out, seed, cfg, false_negative_rate)
                bar.advance(task)
    manifest = _manifest(results, seed, size, cfg)
    manifest["false_negative_rate"] = float(false_negative_rate)
    subsets = {name: entry for (kind, name), entry in results.items() if kind == "mmeb"}
    (out / "eval" / "mmeb" / "subsets.json").write_text(json.dumps(subsets, indent=2, sort_keys=True) + "\n")
    sets = {name: entry for (kind, name), entry in results.items() if kind == "visdoc"}
    (out / "eval" / "visdoc" / "sets.json").write_text(json.dumps(sets, indent=2, sort_keys=True) + "\n")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _manifest(results: dict[tuple[str, str], dict[str, Any]], seed: int, size: str, cfg: SizeConfig) -> dict[str, Any]:
    train = {n: r for (k, n), r in results.items() if k == "train"}
    mmeb = {n: r for (k, n), r in results.items() if k == "mmeb"}
    by_task, by_meta = Counter(), Counter()
    for r in train.values():
        by_task[r["task"]] += r["samples"]
        by_meta[r["meta_task"]] += r["samples"]
    eval_meta: Counter[str] = Counter()
    for r in mmeb.values():
        eval_meta[f"{r['meta_task']}/{r['split']}"] += r["queries"]
    return {
        "format": FORMAT,
        "seed": seed,
        "size": size,
        "config": asdict(cfg),
        "train": train,
        "eval": {"mmeb": mmeb, "visdoc": {n: r for (k, n), r in results.items() if k == "visdoc"},
                 "xmodal": results.get(("xmodal", "table5"), {})},
        "instruct": results[("instruct", "llava")],
        "judge_questions": results.get(("judge", "questions"), {}),
        "totals": {
            "train_samples": sum(r["samples"] for r in train.values()),
            "train_shards": sum(r["shards"] for r in train.values()),
            "train_by_task": dict(sorted(by_task.items())),
            "train_by_meta_task": dict(sorted(by_meta.items())),
            "planted_false_negatives": sum(r.get("planted_false_negatives", 0) for r in train.values()),
            "queries_with_false_negatives": sum(r["queries_with_false_negatives"] for r in train.values()),
            "mmeb_queries_by_meta_task": dict(sorted(eval_meta.items())),
        },
    }
