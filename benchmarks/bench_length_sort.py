"""Encode speed-up from batching by token count on a mixed corpus (issue 14: "sort by real token count").

``Embedder.encode`` orders each call's inputs by their real sequence length (prompt tokens + visual tokens,
``InputBuilder.num_tokens``) before cutting batches, and restores the input order afterwards. On a corpus that mixes
short texts, one-tile natural images and multi-tile document pages, batching in input order pads every short item up
to the longest item of its batch; sorted batching does not. This script encodes the same shuffled mixed corpus both
ways, interleaved, checks both give the same embeddings, and prints the padded tokens and the speed-up ratio.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_length_sort                         # mini preset, CPU, 1 thread
    .venv/bin/python -m benchmarks.bench_length_sort --preset tiny --n 12 --reps 1   # smoke size
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from benchmarks.common import (
    add_common_args,
    benchmark_session,
    check_common_args,
    device_description,
    document_pages,
    log,
    natural_images,
    run_interleaved,
    tile_side,
)

CONFIGS = ("input order", "length-sorted")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(parser, reps=3)
    parser.add_argument("--n", type=int, default=48, help="corpus size (split evenly: text, natural, document)")
    parser.add_argument("--batch-size", type=int, default=8, help="Embedder.encode batch size")
    args = parser.parse_args(argv)
    check_common_args(args)
    if args.n < 3 or args.batch_size < 1:
        raise SystemExit(f"--n must be >= 3 and --batch-size >= 1 (got {args.n}, {args.batch_size})")
    return args


def mixed_corpus(preset: str, n: int, seed: int) -> list:
    """A shuffled corpus of texts, natural images and document pages (a third each), with candidate instructions."""
    from mmembed import Item
    from mmembed.data.synth import scenes
    from mmembed.prompts.embedding import instructions_for

    rng = random.Random(seed)
    side = tile_side(preset)
    k = n // 3
    nat_inst, doc_inst = instructions_for("MSCOCO_t2i")[1], instructions_for("VisRAG")[1]
    # Texts of varied length: questions about pages and scene captions (long captions name every object).
    txt_inst = instructions_for("MSCOCO_i2t")[1]
    texts = [Item(text=scenes.long_caption(scenes.random_scene(rng)) if i % 2 else q, instruction=txt_inst)
             for i, (_, q) in enumerate(document_pages(rng, n - 2 * k, side))]
    natural = [Item(image=im, instruction=nat_inst) for im, _ in natural_images(rng, k, side)]
    documents = [Item(image=im, instruction=doc_inst, kind="document") for im, _ in document_pages(rng, k, 2 * side)]
    corpus = texts + natural + documents
    rng.shuffle(corpus)
    return corpus


def padded_tokens(lengths: list[int], order: list[int], batch_size: int) -> tuple[int, int]:
    """(real tokens, tokens computed with right padding) when ``order`` is cut into batches."""
    computed = 0
    for i in range(0, len(order), batch_size):
        batch = [lengths[j] for j in order[i : i + batch_size]]
        computed += max(batch) * len(batch)
    return sum(lengths), computed


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print the ratio line; returns the measured numbers (for tests)."""
    args = parse_args(argv)
    start = time.perf_counter()
    with benchmark_session(args) as (name, device, dtype):
        from mmembed import Embedder

        print(f"device: {device_description(device)} | dtype {str(dtype).removeprefix('torch.')} | preset {name}")
        emb = Embedder.from_pretrained(name, device=device, dtype=dtype, seed=args.seed)
        corpus = mixed_corpus(name, args.n, args.seed)
        lengths = emb.input_builder.num_tokens(corpus, "candidate")
        real, unsorted_tokens = padded_tokens(lengths, list(range(len(corpus))), args.batch_size)
        _, sorted_tokens = padded_tokens(lengths, sorted(range(len(corpus)), key=lengths.__getitem__), args.batch_size)
        print(f"corpus: {len(corpus)} items, sequence lengths {min(lengths)}-{max(lengths)} tokens, "
              f"batch size {args.batch_size}")
        print(f"tokens computed: input order {unsorted_tokens}, length-sorted {sorted_tokens} (real {real}; "
              f"padding {unsorted_tokens - real} vs {sorted_tokens - real})")

        def fn(sort: bool):
            return lambda: emb.encode(corpus, role="candidate", batch_size=args.batch_size, sort_by_length=sort,
                                      show_progress_bar=False)

        a, b = fn(False)(), fn(True)()
        max_diff = float((a - b).abs().max())
        print(f"max |difference| between the two orders' embeddings: {max_diff:.2e}")
        timings = run_interleaved({CONFIGS[0]: fn(False), CONFIGS[1]: fn(True)}, args.reps, args.warmup, device,
                                  progress=log)
        for c in CONFIGS:
            print(f"{c}: {len(corpus) / timings.median(c):.2f} items/s (median of {args.reps}, "
                  f"spread {timings.spread(c):.0%})")
        ratio = timings.ratio(CONFIGS[0], CONFIGS[1])
        cpu = "" if device.type == "cuda" else f" [CPU-time ratio {timings.ratio(*CONFIGS, cpu=True):.2f}x]"
        print(f"RATIO length-sorted / input-order encode items/s = {ratio:.2f}x{cpu}")
    print(f"wall time of the benchmark (after imports): {time.perf_counter() - start:.0f} s")
    return {"ratio": ratio, "max_diff": max_diff, "tokens": (real, unsorted_tokens, sorted_tokens),
            "lengths": lengths}


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
