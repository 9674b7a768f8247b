"""Is the loader the bottleneck? ContrastiveDataModule throughput next to the model's training step rate.

    .venv/bin/python benchmarks/bench_dataloader.py                      # writes its own shards to a temp dir
    .venv/bin/python benchmarks/bench_dataloader.py --shards 'out/train/*.tar' --batch-size 32 --workers 0,2,4

Prints samples/s and batches/s of one epoch per worker setting (first batch timed apart: it includes worker start
and shuffle-buffer fill), then forward + backward steps/s of the backbone (LoRA) on real batches from the same
loader with a plain InfoNCE, and which of the two limits training. The two are timed one after the other, so on
a machine with few cores the loader's workers and the model do not compete here as they would in training.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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
    from datamodules import ContrastiveDataModule

    dm = ContrastiveDataModule(shards, batch_size=batch_size, num_hard_negatives=negatives, num_workers=workers,
                               samples_per_epoch=(batches + 1) * batch_size, shuffle_buffer=64,
                               input_builder=builder)
    dm.setup("fit")
    t0 = time.perf_counter()
    it = iter(dm.train_dataloader())
    first = next(it)
    t1 = time.perf_counter()
    n = sum(1 for _ in it)
    t2 = time.perf_counter()
    return {"workers": workers, "first_s": t1 - t0, "batches": n, "batches_s": n / (t2 - t1),
            "samples_s": n * batch_size / (t2 - t1), "example": first}


def bench_model(backbone_name: str, vtc_factor: int, batches: list[dict], steps: int) -> float:
    import torch
    import torch.nn.functional as F

    from mmembed.backbone import build_backbone

    model = build_backbone(backbone_name, vtc_factor=vtc_factor, finetune={"mode": "lora"}).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch: dict) -> None:
        q = model.embed(**batch["query"])
        c = model.embed(**batch["candidate"])
        b = q.shape[0]
        loss = F.cross_entropy(q @ c[:b].T / 0.03, torch.arange(b))
        opt.zero_grad()
        loss.backward()
        opt.step()

    step(batches[0])  # warm-up (allocations, LoRA init paths)
    t = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    return steps / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", help="shard spec (brace/glob/dir); default: write bench shards to a temp dir")
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--vtc-factor", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-hard-negatives", type=int, default=2)
    p.add_argument("--batches", type=int, default=12, help="timed batches per worker setting")
    p.add_argument("--workers", default="0,2", help="comma-separated DataLoader worker counts")
    p.add_argument("--steps", type=int, default=6, help="timed training steps")
    args = p.parse_args(argv)

    import torch

    from mmembed.backbone import build_input_builder

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if shards is None:
            t = time.perf_counter()
            n = write_bench_shards(Path(tmp))
            shards = str(Path(tmp) / "*.tar")
            print(f"wrote {n} samples ({len(list(Path(tmp).glob('*.tar')))} shards) in {time.perf_counter() - t:.1f}s")
        builder = build_input_builder(args.backbone, args.vtc_factor)
        print(f"backbone={args.backbone} vtc_factor={args.vtc_factor} batch_size={args.batch_size} "
              f"hard negatives={args.num_hard_negatives} cpus={os.cpu_count()} torch threads={torch.get_num_threads()}")
        results = []
        for w in (int(x) for x in args.workers.split(",")):
            r = bench_loader(shards, builder, w, args.batch_size, args.num_hard_negatives, args.batches)
            results.append(r)
            print(f"loader  workers={w}: {r['samples_s']:8.1f} samples/s  {r['batches_s']:6.2f} batches/s  "
                  f"(first batch {r['first_s']:.2f}s, {r['batches']} timed batches)")
        examples = [r["example"] for r in results]
        ex = examples[0]
        print(f"batch   query {tuple(ex['query']['input_ids'].shape)}, candidate "
              f"{tuple(ex['candidate']['input_ids'].shape)}, tiles q/c "
              f"{int(ex['query']['num_tiles'].sum())}/{int(ex['candidate']['num_tiles'].sum())} ({ex['dataset']})")
        steps_s = bench_model(args.backbone, args.vtc_factor, examples, args.steps)
        print(f"model   {steps_s:6.2f} steps/s  ({steps_s * args.batch_size:.1f} samples/s) forward+backward, LoRA")
        best = max(results, key=lambda r: r["batches_s"])
        verdict = "the loader" if best["batches_s"] < steps_s else "the model"
        print(f"=> with {best['workers']} workers the loader gives {best['batches_s']:.2f} batches/s against "
              f"{steps_s:.2f} steps/s: {verdict} limits training")


if __name__ == "__main__":
    main()
