"""Is the loader the bottleneck? ContrastiveDataModule throughput next to the model's training step rate.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_dataloader                     # writes its own shards to a temp dir
    .venv/bin/python -m benchmarks.bench_dataloader --images fast,stock  # tensor image path vs stock processor
    .venv/bin/python -m benchmarks.bench_dataloader --shards 'out/train/*.tar' --batch-size 32 --workers 0,2,4

Prints samples/s and batches/s of one epoch per worker setting and image path (first batch timed apart: it
includes worker start and shuffle-buffer fill), then training steps/s of ``ContrastiveModule.training_step`` (LoRA,
backward, AdamW) on real batches from the same loader, and which of the two limits training. Image paths: ``fast``
is ``InputBuilder``'s default (``mmembed.backbone.pixels``), ``stock`` the transformers PIL processor per item.
With several paths, their loader epochs alternate (fast, stock, stock, fast, ...) and each figure is the median, so
background load on a shared machine lands on both. Loader and model are timed one after the other, so on a
machine with few cores the loader's workers and the model do not compete here as they would in training.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def write_bench_shards(root: Path, per_dataset: int = 128, per_shard: int = 32) -> int:
    """Two datasets like the synthetic world's: 256px scenes (i2t) and 512x384 pages (t2vd), 2 negatives each."""
    from PIL import Image, ImageDraw

    from mmembed.data.schema import Sample, Side
    from mmembed.data.writing import write_shards

    def scene(i: int) -> Image.Image:
        img = Image.new("RGB", (256, 256), ("white", "gray", "beige")[i % 3])
        d = ImageDraw.Draw(img)
        for k in range(1 + i % 4):
            x, y = (37 * (i + k)) % 200, (53 * (i + 2 * k)) % 200
            d.ellipse([x, y, x + 40, y + 40], fill=("red", "green", "blue", "purple")[k])
        return img

    def page(i: int) -> Image.Image:
        img = Image.new("RGB", (512, 384), "white")
        d = ImageDraw.Draw(img)
        for line in range(18):
            d.text((20, 15 + 20 * line), f"Report {i} line {line}: revenue {i * 7 + line} growth {line % 5} percent",
                   fill="black")
        return img

    def natural():
        for i in range(per_dataset):
            sid = f"bench_nat/{i:05d}"
            yield Sample(id=sid, dataset="bench_nat", task="i2t", meta_task="classification",
                         query=Side(image="query.png", instruction="Represent the given image for classification."),
                         positive=Side(text=f"{1 + i % 4} circles"),
                         negatives=[Side(text=f"{1 + (i + k) % 4} squares") for k in (1, 2)]), {"query.png": scene(i)}

    def documents():
        for i in range(per_dataset):
            sid = f"bench_doc/{i:05d}"
            yield Sample(id=sid, dataset="bench_doc", task="t2vd", meta_task="visdoc",
                         query=Side(text=f"What was the revenue in report {i}?",
                                    instruction="Retrieve relevant visual documents based on a given query."),
                         positive=Side(image="pos.png", kind="document"),
                         negatives=[Side(image=f"neg{k}.png", kind="document") for k in range(2)]), {
                "pos.png": page(i), "neg0.png": page(i + 1), "neg1.png": page(i + 2)}

    write_shards(natural(), str(root / "bench_nat-%06d.tar"), maxcount=per_shard, png_compress_level=1)
    write_shards(documents(), str(root / "bench_doc-%06d.tar"), maxcount=per_shard, png_compress_level=1)
    return 2 * per_dataset


def bench_loader(shards: str, builder, workers: int, batch_size: int, negatives: int, batches: int) -> dict:
    """One epoch of ``batches + 1`` batches through ``ContrastiveDataModule``; the first batch is timed apart."""
    from mmembed.datamodules import ContrastiveDataModule

    dm = ContrastiveDataModule(shards, batch_size=batch_size, num_hard_negatives=negatives, num_workers=workers,
                               samples_per_epoch=(batches + 1) * batch_size, shuffle_buffer=64,
                               input_builder=builder)
    dm.setup("fit")
    t0 = time.perf_counter()
    it = iter(dm.train_dataloader())
    first = next(it)
    t1, c1 = time.perf_counter(), time.process_time()
    n = sum(1 for _ in it)
    t2, c2 = time.perf_counter(), time.process_time()
    # Without workers the whole pipeline runs in this process, so its CPU time is the loader's cost, which other
    # processes on a shared machine hardly stretch (wall time they do).
    cpu = n / max(c2 - c1, 1e-9) if workers == 0 else None
    return {"workers": workers, "first_s": t1 - t0, "batches": n, "batches_s": n / (t2 - t1),
            "samples_s": n * batch_size / (t2 - t1), "batches_per_cpu_s": cpu, "example": first}


def bench_model(backbone_name: str, vtc_factor: int, batches: list[dict], steps: int) -> tuple[float, float]:
    """Training steps/s of ``ContrastiveModule`` (LoRA) on loader batches (``benchmarks.common.TrainStep``).

    Returns:
        ``(steps per wall second, steps per CPU second of this process)``.
    """
    from benchmarks.common import TrainStep

    step = TrainStep(backbone_name, vtc_factor)
    step(batches[0])  # warm-up (allocations, LoRA init paths)
    t, c = time.perf_counter(), time.process_time()
    for i in range(steps):
        step(batches[i % len(batches)])
    return steps / (time.perf_counter() - t), steps / max(time.process_time() - c, 1e-9)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print the closing line; returns the measured figures (for tests)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", help="shard spec (brace/glob/dir); default: write bench shards to a temp dir")
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--vtc-factor", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-hard-negatives", type=int, default=2)
    p.add_argument("--batches", type=int, default=12, help="timed batches per worker setting")
    p.add_argument("--workers", default="0,2", help="comma-separated DataLoader worker counts")
    p.add_argument("--images", default="fast", help="comma-separated image paths to time: fast, stock")
    p.add_argument("--reps", type=int, default=1, help="loader epochs per (path, workers), median reported")
    p.add_argument("--steps", type=int, default=6, help="timed training steps")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the model step and of a loader without workers (workers use one each)")
    args = p.parse_args(argv)
    paths = [x.strip() for x in args.images.split(",") if x.strip()]
    if not paths or set(paths) - {"fast", "stock"}:
        raise SystemExit(f"--images takes a comma-separated list of fast, stock; got {args.images!r}")
    if args.reps < 1:
        raise SystemExit(f"--reps must be >= 1, got {args.reps}")

    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, paths)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, paths: list[str]) -> dict:
    import torch

    from mmembed.backbone import build_input_builder

    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if shards is None:
            t = time.perf_counter()
            n = write_bench_shards(Path(tmp))
            shards = str(Path(tmp) / "*.tar")
            print(f"wrote {n} samples ({len(list(Path(tmp).glob('*.tar')))} shards) in {time.perf_counter() - t:.1f}s")
        builders = {path: build_input_builder(args.backbone, args.vtc_factor, fast_images=path == "fast")
                    for path in paths}
        print(f"backbone={args.backbone} vtc_factor={args.vtc_factor} batch_size={args.batch_size} "
              f"hard negatives={args.num_hard_negatives} cpus={os.cpu_count()} torch threads={torch.get_num_threads()}")
        results: dict[str, list[dict]] = {path: [] for path in paths}
        for w in (int(x) for x in args.workers.split(",")):
            runs: dict[str, list[dict]] = {path: [] for path in paths}
            for rep in range(args.reps):
                for path in paths if rep % 2 == 0 else paths[::-1]:
                    runs[path].append(bench_loader(shards, builders[path], w, args.batch_size,
                                                   args.num_hard_negatives, args.batches))
            for path in paths:
                r = dict(runs[path][0])
                r["batches_s"] = statistics.median(x["batches_s"] for x in runs[path])
                r["samples_s"] = statistics.median(x["samples_s"] for x in runs[path])
                if w == 0:
                    r["batches_per_cpu_s"] = statistics.median(x["batches_per_cpu_s"] for x in runs[path])
                results[path].append(r)
                print(f"loader  images={path:5s} workers={w}: {r['samples_s']:8.1f} samples/s  "
                      f"{r['batches_s']:6.2f} batches/s  (first batch {r['first_s']:.2f}s, {r['batches']} timed "
                      f"batches, median of {args.reps})" + (f", {r['batches_per_cpu_s']:.2f} batches per CPU-second"
                                                            if w == 0 else ""))
        examples = [r["example"] for r in results[paths[0]]]
        ex = examples[0]
        print(f"batch   query {tuple(ex['query']['input_ids'].shape)}, candidate "
              f"{tuple(ex['candidate']['input_ids'].shape)}, tiles q/c "
              f"{int(ex['query']['num_tiles'].sum())}/{int(ex['candidate']['num_tiles'].sum())} ({ex['dataset']})")
        steps_s, steps_cpu = bench_model(args.backbone, args.vtc_factor, examples, args.steps)
        print(f"model   {steps_s:6.2f} steps/s  ({steps_s * args.batch_size:.1f} samples/s, {steps_cpu:.2f} steps per "
              f"CPU-second) ContrastiveModule.training_step + AdamW, LoRA, {torch.get_num_threads()} thread(s)")
        out = {"steps_s": steps_s, "steps_per_cpu_s": steps_cpu, "loader": {}, "loader_per_cpu_s": {}}
        for path in reversed(paths):  # the first path (the default: fast) gives the closing line
            own = [r for r in results[path] if r["workers"] == 0]
            if own:
                cpu = own[0]["batches_per_cpu_s"]
                out["loader_per_cpu_s"][path] = cpu
                print(f"=> images={path}, CPU time: one loader process gives {cpu:.2f} batches per CPU-second "
                      f"against {steps_cpu:.2f} steps per CPU-second ({cpu / steps_cpu:.2f}x)")
        for path in reversed(paths):
            best = max(results[path], key=lambda r: r["batches_s"])
            out["loader"][path] = best["batches_s"]
            verdict = "the loader" if best["batches_s"] < steps_s else "the model"
            print(f"=> images={path}: with {best['workers']} workers the loader gives {best['batches_s']:.2f} "
                  f"batches/s against {steps_s:.2f} steps/s ({best['batches_s'] / steps_s:.2f}x): {verdict} "
                  f"limits training")
        return out


if __name__ == "__main__":
    main()
