"""Judge throughput with and without KV-cache prefix reuse (the K candidates of one query share the prompt prefix).

The judgment template puts the query before the target, so the ``K`` candidates retrieved for one query share every
token up to ``Target:`` -- the instruction, the query text and the query image. ``Judge.score(..., reuse_prefix=True)``
runs that prefix once per query and copies its KV cache to the batch of candidates. This script times both modes on
the same pairs, interleaved, in one run, and prints pairs/s and the ratio per setting:

- ``it2t`` (VQA-like): image + question query, short text answers as targets -- a long shared prefix;
- ``t2i`` (retrieval-like): text query, image targets -- a short shared prefix, most tokens in the suffix.

It also prints the largest difference between the two modes' logits (they compute the same thing).

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_judge_prefix                      # mini preset, CPU defaults
    python -m benchmarks.bench_judge_prefix --judge /models/judge-folder   # any local judge checkpoint
"""

from __future__ import annotations

import argparse
import random

import torch

from benchmarks.common import (
    add_common_args,
    benchmark_session,
    check_common_args,
    device_description,
    log,
    natural_images,
    print_table,
    run_interleaved,
    tile_side,
)
from mmembed.judge import Judge, JudgePair, judgment_instruction
from mmembed.types import Item

SETTINGS = ("it2t", "t2i")


def make_pairs(setting: str, queries: int, k: int, side: int, seed: int) -> list[JudgePair]:
    """``queries`` x ``k`` pairs; the pairs of one query share its ``Item`` (and so its prefix)."""
    from mmembed.data.synth import scenes

    rng = random.Random(seed)
    images = natural_images(rng, queries + k, side)
    pairs = []
    for i in range(queries):
        image, scene = images[i]
        if setting == "it2t":
            query = Item(text=f"How many {scenes.PLURALS[scene.objects[0].shape]} are there?", image=image)
            targets = [Item(text=w) for w in (scenes.COUNT_WORDS * k)[1 : k + 1]]
            inst = judgment_instruction("Visual7W")
        else:
            query = Item(text=scenes.long_caption(scene))
            targets = [Item(image=img) for img, _ in images[queries : queries + k]]
            inst = judgment_instruction("MSCOCO", task="t2i")
        pairs += [JudgePair(query, t, inst) for t in targets]
    return pairs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, reps=3)
    parser.add_argument("--judge", default=None, help="judge checkpoint folder (default: the --preset, random init)")
    parser.add_argument("--queries", type=int, default=2, help="queries per repetition")
    parser.add_argument("--k", type=int, default=19, help="candidates judged per query (top-20 minus the positive)")
    parser.add_argument("--batch-size", type=int, default=19, help="pairs per forward pass (targets per pass)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    args = parser.parse_args(argv)
    check_common_args(args)
    results: dict = {}
    with benchmark_session(args) as (preset, device, dtype):
        judge = Judge.from_pretrained(args.judge or preset, device=device, dtype=dtype, seed=args.seed)
        if not judge.supports_prefix_reuse:
            raise SystemExit(f"{judge.model_type} judges are scored without prefix reuse; nothing to compare")
        side = tile_side(preset) if args.judge is None else 448
        log(f"judge {args.judge or preset} on {device_description(device)}, {dtype}; K={args.k}, "
            f"{args.queries} queries/rep, batch {args.batch_size}")
        rows = []
        for setting in args.settings:
            pairs = make_pairs(setting, args.queries, args.k, side, args.seed)
            plain = judge.score(pairs, batch_size=args.batch_size)
            reused = judge.score(pairs, batch_size=args.batch_size, reuse_prefix=True)
            diff = float(torch.maximum((plain.yes - reused.yes).abs(), (plain.no - reused.no).abs()).max())
            fns = {"plain": lambda p=pairs: judge.score(p, batch_size=args.batch_size),
                   "reuse": lambda p=pairs: judge.score(p, batch_size=args.batch_size, reuse_prefix=True)}
            t = run_interleaved(fns, args.reps, args.warmup, device)
            rate = {name: len(pairs) / t.median(name) for name in fns}
            ratio = t.ratio("plain", "reuse")
            results[setting] = {"pairs_per_s": rate, "ratio": ratio, "max_abs_logit_diff": diff}
            rows.append([setting, f"{rate['plain']:.2f}", f"{rate['reuse']:.2f}", f"{ratio:.2f}x", f"{diff:.2e}"])
            print(f"RATIO judge {setting} pairs/s: reuse/plain = {ratio:.2f}x "
                  f"(plain {rate['plain']:.2f}, reuse {rate['reuse']:.2f} pairs/s; max |logit diff| {diff:.1e})")
        print_table("Judge pairs/s", ["setting", "plain", "prefix reuse", "speed-up", "max |diff|"], rows)
    return results


if __name__ == "__main__":
    main()
