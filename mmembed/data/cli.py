"""``mmembed-data``: generate the synthetic world, convert real data to shards, inspect and count shards.

Examples::

    mmembed-data synth --out data/synth --seed 0 --size small
    mmembed-data convert mmeb --parquet MMEB-train/CIRR --image-root MMEB-train/images --out data/shards
    mmembed-data convert visdoc-beir --folder visrag-train --dataset VisRAG --out data/shards
    mmembed-data convert visdoc-pairs --parquet colpali_train_set/data --dataset Colpali --out data/shards
    mmembed-data convert jsonl --jsonl pairs.jsonl --image-root imgs --meta-task retrieval --out data/shards
    mmembed-data convert llava --json llava.json --image-root imgs --write llava.clean.json
    mmembed-data count data/synth/train
    mmembed-data inspect 'data/synth/train/synth_ret_t2i-*.tar' -n 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def _instruction_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--query-instruction", help="override the paper's query instruction for this dataset")
    p.add_argument("--target-instruction", help="override the paper's target instruction for this dataset")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmembed-data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="generate the synthetic world (shards, eval sets, stage-1 data)")
    p.add_argument("--out", required=True, help="output folder (empty, or a previous world with --overwrite)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=("ci", "small", "repro", "full"), default="small",
                   help="repro: small's training data, 256 queries per MMEB subset and VisDoc set")
    p.add_argument("--false-negative-rate", type=float, default=None,
                   help="share of training examples given a planted false negative (default: the world's default; "
                        "0 = the world of earlier releases)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (output does not depend on it)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous synthetic world in --out")

    conv = sub.add_parser("convert", help="convert a real data format to shards").add_subparsers(
        dest="format", required=True
    )
    p = conv.add_parser("mmeb", help="MMEB-train parquet (one subset)")
    p.add_argument("--parquet", required=True, help="the subset's parquet file or folder")
    p.add_argument("--image-root", required=True, help="folder the *_image_path columns are relative to")
    p.add_argument("--dataset", help="subset name (default: folder name / file stem)")
    p.add_argument("--task", help="override the task (t2i, i2t, it2t, ...)")
    p.add_argument("--meta-task", help="override the meta-task (classification, vqa, retrieval, grounding, visdoc)")
    p.add_argument("--limit", type=int, help="convert only the first N rows")
    p.add_argument("--split", default="original",
                   help="hub-layout folder: which split's shards to read (original | diverse_instruction)")
    _instruction_args(p)

    p = conv.add_parser("visdoc-beir", help="BEIR-layout visual-document set (queries/corpus/qrels)")
    p.add_argument("--folder", required=True)
    p.add_argument("--dataset", required=True, help="name for shards and instructions, e.g. VisRAG")
    p.add_argument("--min-score", type=int, default=1, help="qrels score that makes a page a positive")
    _instruction_args(p)

    p = conv.add_parser("visdoc-pairs", help="ColPali/VisRAG-style (query, page image) parquet")
    p.add_argument("--parquet", required=True, help="parquet file or folder")
    p.add_argument("--dataset", required=True, help="name for shards and instructions, e.g. Colpali")
    p.add_argument("--query-column", default="query")
    p.add_argument("--image-column", default="image")
    p.add_argument("--image-root", help="base folder for image paths stored as strings")
    p.add_argument("--limit", type=int)
    p.add_argument("--split", default=None, help="hub-layout folder with several splits: which one (e.g. train)")
    _instruction_args(p)

    p = conv.add_parser("jsonl", help="generic JSON lines {query, positive, negatives, dataset}")
    p.add_argument("--jsonl", required=True)
    p.add_argument("--image-root", required=True)
    p.add_argument("--dataset", help="dataset for lines that do not name one")
    p.add_argument("--task", help="task for lines that do not name one (default: from the modalities)")
    p.add_argument("--meta-task", help="meta-task for lines that do not name one")
    _instruction_args(p)

    for name in ("mmeb", "visdoc-beir", "visdoc-pairs", "jsonl"):
        conv.choices[name].add_argument("--out", required=True, help="folder for {dataset}-%%06d.tar shards")
        conv.choices[name].add_argument("--maxcount", type=int, default=1000, help="samples per shard")

    p = conv.add_parser("llava", help="validate/normalise LLaVA-style instruction JSON")
    p.add_argument("--json", required=True)
    p.add_argument("--image-root", help="default: the JSON's folder")
    p.add_argument("--write", help="write the normalised JSON here")
    p.add_argument("--no-check-images", action="store_true")

    p = sub.add_parser("count", help="count samples per dataset / task / meta-task")
    p.add_argument("shards", nargs="+", help="shard files, globs, brace patterns or folders")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")

    p = sub.add_parser("inspect", help="print the first samples of shards")
    p.add_argument("shards", nargs="+")
    p.add_argument("-n", type=int, default=3)
    return parser


def _convert(args: argparse.Namespace) -> list:
    from mmembed.data import converters as cv

    common = {"maxcount": args.maxcount, "progress": True} if args.format != "llava" else {}
    instr = {"query_instruction": getattr(args, "query_instruction", None),
             "target_instruction": getattr(args, "target_instruction", None)}
    if args.format == "mmeb":
        return [cv.mmeb_train_to_shards(args.parquet, args.image_root, args.out, args.dataset, task=args.task,
                                        meta_task=args.meta_task, limit=args.limit, split=args.split, **instr,
                                        **common)]
    if args.format == "visdoc-beir":
        return [cv.visdoc_beir_to_shards(args.folder, args.out, args.dataset, min_score=args.min_score, **instr,
                                         **common)]
    if args.format == "visdoc-pairs":
        return [cv.visdoc_pairs_to_shards(args.parquet, args.out, args.dataset, query_column=args.query_column,
                                          image_column=args.image_column, image_root=args.image_root,
                                          limit=args.limit, split=args.split, **instr, **common)]
    if args.format == "jsonl":
        return cv.jsonl_to_shards(args.jsonl, args.image_root, args.out, dataset=args.dataset, task=args.task,
                                  meta_task=args.meta_task, **instr, **common)
    return [cv.normalize_llava(args.json, args.image_root, out=args.write, check_images=not args.no_check_images)]


def _print_counts(counts: dict, console) -> None:
    from rich.table import Table

    console.print(f"{counts['samples']} samples in {counts['shards']} shards")
    for key in ("by_dataset", "by_task", "by_meta_task"):
        table = Table(key.replace("_", " "))
        table.add_column("samples", justify="right")
        for name, n in counts[key].items():
            table.add_row(name, str(n))
        console.print(table)
    if counts["skipped"]:
        console.print(f"[yellow]skipped: {counts['skipped']}[/yellow]")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mmembed-data``; returns the exit status."""
    args = _build_parser().parse_args(argv)
    from rich.console import Console

    console = Console(stderr=False)
    try:
        if args.command == "synth":
            from mmembed.data.synth import generate

            if Path(args.out).exists() and not Path(args.out).is_dir():
                raise ValueError(f"--out {args.out} is a file; give a folder (new, empty, or a previous world with "
                                 "--overwrite)")
            start = time.perf_counter()
            from mmembed.data.synth.world import DEFAULT_FALSE_NEGATIVE_RATE

            rate = DEFAULT_FALSE_NEGATIVE_RATE if args.false_negative_rate is None else args.false_negative_rate
            manifest = generate(args.out, args.seed, args.size, workers=args.workers, overwrite=args.overwrite,
                                false_negative_rate=rate)
            t = manifest["totals"]
            console.print(f"wrote {t['train_samples']} training samples in {t['train_shards']} shards, "
                          f"{sum(t['mmeb_queries_by_meta_task'].values())} MMEB eval queries, "
                          f"{len(manifest['eval']['visdoc'])} VisDoc sets, {manifest['instruct']['conversations']} "
                          f"stage-1 conversations to {args.out} in {time.perf_counter() - start:.1f}s; "
                          f"{t['planted_false_negatives']} planted false negatives (rate {rate}), "
                          f"{t['queries_with_false_negatives']} training queries with a false negative in the corpus")
        elif args.command == "convert":
            for report in _convert(args):
                console.print(str(report))
        elif args.command == "count":
            from mmembed.data.inspection import count_shards
            from mmembed.data.reading import expand_urls

            counts = count_shards(expand_urls(args.shards))
            if args.json:
                print(json.dumps(counts, indent=2, sort_keys=True))
            else:
                _print_counts(counts, console)
        elif args.command == "inspect":
            from mmembed.data.inspection import inspect_shards
            from mmembed.data.reading import expand_urls

            inspect_shards(expand_urls(args.shards), n=args.n, console=console)
    except (ValueError, OSError) as exn:  # OSError: unreadable / unwritable paths (permissions, a file for a folder)
        print(f"mmembed-data: error: {exn}", file=sys.stderr)  # plain print: rich would wrap the line
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
