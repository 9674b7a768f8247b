"""Contrastive training-step throughput and peak memory of VTC (s=2) against native InternVL3 (s=1) (paper Table 9).

Issue: print training-step throughput (samples/s) and peak memory for VTC vs native on the mini preset in one run
(paper Table 9: 2.3x faster at 2B scale); goal on CPU >= 1.8x.

One step = embed a batch of queries and of their positive candidates, InfoNCE over in-batch negatives
(temperature 0.03, paper Table 14), backward, AdamW step, with LoRA r=16 on the LLM (the stage-2 recipe).
Both models start from the same preset weights and the same LoRA init, and differ only in ``vtc_factor``.
Batches follow the image-candidate tasks of the stage-2 data (paper Table 2; VTC changes nothing for text
candidates) and are built before timing: in training, data loading runs in DataLoader workers beside the step.

Peak memory is measured in a fresh process per configuration. On CPU: the kernel's peak resident set (``VmHWM``)
minus the resident set right before the first step (model, batches and optimizer built); a fresh process keeps
the baseline free of memory that an earlier configuration left in the allocator. One step runs at half the batch,
then one at the full batch; the two peaks give a per-sample slope, from which the largest batch fitting a memory
budget is extrapolated linearly (cheap, approximate). On CUDA: ``torch.cuda.max_memory_allocated`` likewise.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_vtc_train                               # mini, CPU defaults
    .venv/bin/python -m benchmarks.bench_vtc_train --mixes mixed --memory off    # throughput only, default mix
    .venv/bin/python -m benchmarks.bench_vtc_train --mini-shape 2b-proportional --reps 2
    python -m benchmarks.bench_vtc_train --batch-size 32                         # GPU box (bf16 autocast)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from benchmarks.common import (
    REFERENCE_PRESET,
    REPO_ROOT,
    add_common_args,
    check_common_args,
    count_image_tokens,
    device_description,
    document_pages,
    gib,
    log,
    mib,
    natural_images,
    print_shape_table,
    print_table,
    proc_status_bytes,
    ratio_line,
    resolve_preset,
    run_interleaved,
    setup_device,
    tile_side,
    total_memory_bytes,
)

GOAL = 1.8  # from the issue: training-step samples/s of VTC over native on CPU
FACTORS = (2, 1)
TEMPERATURE = 0.03  # paper Table 14
LEARNING_RATE = 2e-4  # paper Table 14, maximum learning rate of stages 2 and 3
LORA = {"mode": "lora", "lora_r": 16}  # paper §5 / Table 10: LoRA rank 16 on the LLM
CHILD_TAG = "MEMORY_JSON "


@dataclass(frozen=True)
class Task:
    """An image-candidate task of the stage-2 mix.

    Attributes:
        name: task code as in paper Table 2.
        query: ``text``, ``image`` or ``image+text``.
        kind: candidate kind, ``natural`` or ``document``.
        dataset: dataset whose instructions (paper Tables 11-12) the task uses.
        millions: samples of this task in the stage-2 data (paper Table 2), the sampling weight.
    """

    name: str
    query: str
    kind: str
    dataset: str
    millions: float


TASKS = (
    Task("I->I", "image", "natural", "ImageNet-1K_i2i", 1.3),
    Task("T->I", "text", "natural", "MSCOCO_t2i", 5.3),
    Task("IT->I", "image+text", "natural", "CIRR", 5.3),
    Task("T->VD", "text", "document", "VisRAG", 1.6),
)
MIXES = {
    "mixed": TASKS,
    "natural": tuple(t for t in TASKS if t.kind == "natural"),
    "document": tuple(t for t in TASKS if t.kind == "document"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(parser, reps=3)
    parser.add_argument("--batch-size", type=int, default=8, help="samples (query + positive candidate) per step")
    parser.add_argument("--mixes", default="mixed,natural,document",
                        help=f"comma-separated candidate mixes out of {sorted(MIXES)}; mixed follows paper Table 2")
    parser.add_argument("--memory", default="subprocess", choices=["subprocess", "off"],
                        help="peak-memory measurement: one fresh process per configuration, or none")
    parser.add_argument("--mem-jobs", type=int, default=0,
                        help="memory processes run at once (0: one per CPU core on CPU, 1 on CUDA)")
    parser.add_argument("--mem-budget-gib", type=float, default=None,
                        help="budget for the max-batch estimate (default: the device's total memory)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)  # "S:MIX", internal
    args = parser.parse_args(argv)
    check_common_args(args)
    args.mix_list = [m.strip() for m in args.mixes.split(",") if m.strip()]
    unknown = [m for m in args.mix_list if m not in MIXES]
    if unknown or not args.mix_list:
        raise SystemExit(f"--mixes: unknown {unknown}; choose from {sorted(MIXES)}")
    if args.batch_size < 2:
        raise SystemExit(f"--batch-size must be >= 2 (got {args.batch_size}): InfoNCE needs in-batch negatives")
    return args


# ------------------------------------------------------------------------------------------------------- batches
def allocate(batch_size: int, tasks: tuple[Task, ...]) -> dict[str, int]:
    """Samples per task in one batch, proportional to the Table 2 counts (largest remainder, deterministic)."""
    total = sum(t.millions for t in tasks)
    exact = [batch_size * t.millions / total for t in tasks]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(tasks)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: batch_size - sum(counts)]:
        counts[i] += 1
    return {t.name: c for t, c in zip(tasks, counts)}


def make_samples(preset: str, mix: str, batch_size: int, seed: int) -> tuple[list, list, dict[str, int]]:
    """Queries and positive candidates (``Item`` s) for one batch of a mix, shuffled so any prefix is mixed too."""
    from mmembed import Item
    from mmembed.backbone.templates import instructions_for
    from mmembed.data.synth import scenes

    rng = random.Random(f"{seed}:{mix}")
    side = tile_side(preset)
    counts = allocate(batch_size, MIXES[mix])
    pairs = []
    for task in MIXES[mix]:
        q_instr, c_instr = instructions_for(task.dataset)
        n = counts[task.name]
        if task.kind == "document":
            for page, question in document_pages(rng, n, 2 * side):
                pairs.append((Item(text=question, instruction=q_instr),
                              Item(image=page, instruction=c_instr, kind="document")))
            continue
        for image, scene in natural_images(rng, n, side):
            if task.query == "text":
                query = Item(text=scenes.long_caption(scene), instruction=q_instr)
            elif task.query == "image":  # a re-rendered near duplicate, like NIGHTS / ImageNet i2i
                query = Item(image=scenes.render(scenes.rejitter(scene, rng), side=side), instruction=q_instr)
            else:  # composed retrieval: reference image + edit text, the positive shows the edited scene
                edited, edit = scenes.edit_scene(scene, rng)
                query, image = Item(image=image, text=edit, instruction=q_instr), scenes.render(edited, side=side)
            pairs.append((query, Item(image=image, instruction=c_instr, kind="natural")))
    rng.shuffle(pairs)
    return [q for q, _ in pairs], [c for _, c in pairs], counts


@dataclass
class Batch:
    queries: dict
    candidates: dict
    size: int


def build_batches(builder, queries: list, cands: list, device: torch.device) -> Batch:
    return Batch(builder(queries, "query").to(device), builder(cands, "candidate").to(device), len(queries))


# ---------------------------------------------------------------------------------------------------------- step
class Trainer:
    """One backbone with LoRA, its AdamW optimizer and the contrastive step."""

    def __init__(self, preset: str, vtc_factor: int, device: torch.device, dtype: torch.dtype, seed: int) -> None:
        from mmembed.backbone import build_backbone, build_input_builder

        # peft draws the LoRA A matrices from the global RNG: seeding it makes both models' adapters identical too.
        torch.manual_seed(seed)
        self.backbone = build_backbone(preset, vtc_factor, finetune=LORA, seed=seed).to(device).train()
        self.builder = build_input_builder(preset, vtc_factor)
        self.params = [p for p in self.backbone.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LEARNING_RATE)
        self.device = device
        # fp32 master weights with autocast (Lightning's "bf16-mixed"): AdamW on bf16 weights would lose updates.
        self.autocast = dtype != torch.float32
        self.dtype = dtype

    def step(self, batch: Batch) -> float:
        from mmembed.losses.infonce import info_nce

        ctx = torch.autocast(self.device.type, dtype=self.dtype) if self.autocast else nullcontext()
        with ctx:
            q = self.backbone.embed(**batch.queries)
            c = self.backbone.embed(**batch.candidates)
        loss = info_nce(q, c, temperature=TEMPERATURE, gather=False).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    @property
    def image_token_id(self) -> int:
        return self.backbone.config.image_token_id


# -------------------------------------------------------------------------------------------------------- memory
def memory_child(args: argparse.Namespace) -> None:
    """In a fresh process: peak step memory for one (factor, mix) at half and full batch; prints one JSON line."""
    s_text, mix = args.memory_child.split(":", 1)
    s = int(s_text)
    device, dtype = setup_device(args.device, args.dtype, args.threads)
    name = resolve_preset(args.preset, args.mini_shape)
    trainer = Trainer(name, s, device, dtype, args.seed)
    queries, cands, _ = make_samples(name, mix, args.batch_size, args.seed)
    half = args.batch_size // 2
    batches = [build_batches(trainer.builder, queries[:half], cands[:half], device),
               build_batches(trainer.builder, queries, cands, device)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = proc_status_bytes("VmRSS")
    peaks = []
    for b in batches:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer.step(b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device) - baseline)
        else:
            # VmHWM never decreases, so after the larger second step it is that step's peak (the half-batch step's
            # peak is lower, and memory it freed is reused, not added).
            peaks.append(proc_status_bytes("VmHWM") - baseline)
    print(CHILD_TAG + json.dumps({"s": s, "mix": mix, "baseline": baseline, "sizes": [b.size for b in batches],
                                  "peaks": peaks}), flush=True)


def run_memory_children(args: argparse.Namespace, argv: list[str], device: torch.device) -> list[dict]:
    """One subprocess per (factor, mix); returns their JSON results (failures reported, not raised)."""
    configs = [(s, mix) for mix in args.mix_list for s in FACTORS]
    jobs = args.mem_jobs or (1 if device.type == "cuda" else min(len(configs), os.cpu_count() or 1))
    threads = max(1, (args.threads or torch.get_num_threads()) // jobs)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))

    def run(cfg: tuple[int, str]) -> dict:
        cmd = [sys.executable, "-m", "benchmarks.bench_vtc_train", *argv, "--threads", str(threads),
               "--memory-child", f"{cfg[0]}:{cfg[1]}"]
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            if line.startswith(CHILD_TAG):
                return json.loads(line[len(CHILD_TAG):])
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"s": cfg[0], "mix": cfg[1], "error": f"exit {proc.returncode}: {' | '.join(tail)}"}

    log(f"measuring peak memory: {len(configs)} fresh processes, {jobs} at a time, {threads} thread(s) each")
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(run, configs))


def print_memory(results: list[dict], budget: int, device: torch.device) -> None:
    what = "max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM)"
    rows, by_key = [], {}
    for r in results:
        label = f"{r['s']} ({'VTC' if r['s'] > 1 else 'native'})"
        if "error" in r:
            rows.append([r["mix"], label, "failed", "", "", "", r["error"][:80]])
            continue
        (n1, n2), (p1, p2) = r["sizes"], r["peaks"]
        slope = (p2 - p1) / (n2 - n1) if n2 > n1 else float("nan")
        intercept = p2 - slope * n2
        max_batch = math.floor((budget - r["baseline"] - intercept) / slope) if slope > 0 else None
        by_key[r["mix"], r["s"]] = (p2, max_batch)
        rows.append([r["mix"], label, mib(r["baseline"]), f"{mib(p1)} @ {n1}", f"{mib(p2)} @ {n2}",
                     mib(slope) if slope > 0 else "n/a", str(max_batch) if max_batch is not None else "n/a"])
    print_table(
        f"Peak memory of one training step ({what} minus the level before the first step; fresh process each)",
        ["mix", "s", "before step (model, batch)", "step peak @ half batch", "step peak @ batch", "per sample",
         f"est. max batch in {gib(budget)}"],
        rows,
        caption="est. max batch: linear fit through the two step peaks, extrapolated to the budget; approximate "
                "(the step's memory is dominated by activations, which grow linearly with the batch).",
    )
    for mix in dict.fromkeys(r["mix"] for r in results):
        if (mix, 1) in by_key and (mix, 2) in by_key:
            (m1, b1), (m2, b2) = by_key[mix, 1], by_key[mix, 2]
            fit = f"; est. max batch VTC/native = {b2 / b1:.2f}x" if b1 and b2 else ""
            print(f"MEMORY {mix}: step peak native/VTC = {m1 / m2:.2f}x{fit}")


# ---------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the tables and ratio lines; returns the measured numbers (for tests)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return {}
    device, dtype = setup_device(args.device, args.dtype, args.threads)
    name = resolve_preset(args.preset, args.mini_shape)
    mode = "bf16 autocast, fp32 weights" if dtype != torch.float32 else "float32"
    print(f"device: {device_description(device)} | {mode} | preset {name} | LoRA r={LORA['lora_r']} on the LLM")

    t0 = time.perf_counter()
    trainers = {s: Trainer(name, s, device, dtype, args.seed) for s in FACTORS}
    log(f"built both models in {time.perf_counter() - t0:.1f} s")
    batches, counts, stats = {}, {}, {}
    for mix in args.mix_list:
        queries, cands, counts[mix] = make_samples(name, mix, args.batch_size, args.seed)
        for s, tr in trainers.items():
            b = build_batches(tr.builder, queries, cands, device)
            batches[mix, s] = b
            vis = [sum(x) for x in zip(count_image_tokens(b.queries["input_ids"], tr.image_token_id),
                                       count_image_tokens(b.candidates["input_ids"], tr.image_token_id))]
            seq = int(b.queries["attention_mask"].sum() + b.candidates["attention_mask"].sum())
            stats[mix, s] = (sum(vis) / b.size, seq / b.size)

    fns = {(mix, s): (lambda m=mix, s=s: trainers[s].step(batches[m, s])) for mix in args.mix_list for s in FACTORS}
    log(f"timing {len(fns)} configurations x ({args.warmup} warm-up + {args.reps}) repetitions, interleaved")
    t0 = time.perf_counter()
    timings = run_interleaved(fns, args.reps, args.warmup, device, progress=log)
    log(f"timed in {time.perf_counter() - t0:.1f} s")

    rows, results = [], {"tokens": {}, "ratios": {}, "samples_per_s": {}}
    for mix in args.mix_list:
        comp = ", ".join(f"{k} {v}" for k, v in counts[mix].items() if v)
        for s in FACTORS:
            sec = timings.median((mix, s))
            vis, seq = stats[mix, s]
            rows.append([mix, comp, f"{s} ({'VTC' if s > 1 else 'native'})", f"{vis:g}", f"{seq:.0f}",
                         f"{sec:.2f}", f"{args.batch_size / sec:.2f}", f"{timings.spread((mix, s)):.0%}"])
            results["tokens"][mix, s] = vis
            results["samples_per_s"][mix, s] = args.batch_size / sec
    print_table(
        f"Contrastive training step, {name}: VTC (s=2) vs native (s=1); median of {args.reps} interleaved reps, "
        f"batch {args.batch_size}",
        ["mix", "tasks (samples)", "s", "visual tok/sample", "tokens/sample (q+c)", "step s", "samples/s", "spread"],
        rows,
        caption="step = embed queries + candidates, InfoNCE (in-batch negatives), backward, AdamW; batches built "
                "beforehand. spread = (max-min)/median over reps.",
    )
    for mix in args.mix_list:
        results["ratios"][mix] = timings.ratio((mix, 1), (mix, 2))
        print(ratio_line(f"{mix} train samples/s", timings, (mix, 1), (mix, 2), GOAL, device))

    if args.memory == "subprocess":
        del trainers, batches  # the children need the memory more than this process does
        t0 = time.perf_counter()
        mem = run_memory_children(args, argv, device)
        log(f"memory measured in {time.perf_counter() - t0:.1f} s")
        budget = int(args.mem_budget_gib * 2**30) if args.mem_budget_gib else total_memory_bytes(device)
        print_memory(mem, budget, device)
        results["memory"] = mem
    if args.preset == "mini":
        print_shape_table([name, REFERENCE_PRESET])
    return results


if __name__ == "__main__":
    main()
