"""Contrastive training-step throughput and peak memory of VTC (s=2) against native InternVL3 (s=1) (paper Table 9).

Issue: print training-step throughput (samples/s) and peak memory for VTC vs native on the mini preset in one run
(paper Table 9: 2.3x faster at 2B scale); goal on CPU >= 1.8x.

One step = ``ContrastiveModule.training_step`` (embed a batch of queries and of their positive candidates, InfoNCE
over in-batch negatives, temperature 0.03, paper Table 14), backward, AdamW step, with LoRA r=16 on the LLM (the
stage-2 recipe); see ``benchmarks.common.TrainStep``.
Both models start from the same preset weights and the same LoRA init, and differ only in ``vtc_factor``.
Batches are built before timing: in training, data loading runs in DataLoader workers beside the step.

Data: the image-candidate tasks of the stage-2 data (paper Table 2; VTC changes nothing for text candidates).
Like ``datamodules/contrastive.py`` (and the paper's in-domain in-batch negatives), every batch holds ONE task and
tasks are mixed across batches by weight, so each task's step is timed on its own batch, and a mix's throughput is
that of the weighted stream of such batches: ``batch / sum_t(w_t * step_t)``, per repetition. ``mixed`` weights
all tasks by their Table 2 sample counts; ``natural`` and ``document`` keep the tasks of one candidate kind.

Peak memory: the memory above the level right before a step, at its highest during the step. On CPU that is the
kernel's peak resident set (``VmHWM``; tracemalloc misses torch's allocations) minus the resident set before the
step, each step measured from a reset (freed heap returned with ``malloc_trim``, ``VmHWM`` restarted through
``/proc/self/clear_refs``): in this process after the timing by default, or with ``--memory subprocess`` in a fresh
process per (factor, task), which also shows the resident set of one model alone. On CUDA:
``torch.cuda.max_memory_allocated`` minus ``memory_allocated``. One step runs at half the batch and one at the full
batch; the two peaks give a per-sample slope, from which the largest batch fitting a memory budget is extrapolated
linearly (cheap, approximate). A mix's peak is its worst task's, its max batch the smallest of its tasks'.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_vtc_train                               # mini, CPU defaults
    .venv/bin/python -m benchmarks.bench_vtc_train --mixes mixed --memory off    # throughput of the default mix
    .venv/bin/python -m benchmarks.bench_vtc_train --mini-shape 2b-proportional
    .venv/bin/python -m benchmarks.bench_vtc_train --mini-shape 2b-proportional --in-tower 0,1   # + in-tower
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
from dataclasses import dataclass

import torch

from benchmarks.common import (
    LORA,
    REFERENCE_PRESET,
    REPO_ROOT,
    Timings,
    TrainStep,
    Variant,
    add_common_args,
    add_variant_args,
    benchmark_session,
    check_common_args,
    check_variant_args,
    count_image_tokens,
    device_description,
    document_pages,
    gib,
    log,
    mib,
    natural_images,
    print_shape_table,
    print_table,
    ratio_line,
    run_interleaved,
    tile_side,
    total_memory_bytes,
)
from mmembed.memory import read_peak, reset_peak

GOAL = 1.8  # from the issue: training-step samples/s of VTC over native on CPU
CHILD_TAG = "MEMORY_JSON "


@dataclass(frozen=True)
class Task:
    """An image-candidate task of the stage-2 data.

    Attributes:
        name: task code as in paper Table 2.
        query: ``text``, ``image`` or ``image+text``.
        kind: candidate kind, ``natural`` or ``document``.
        dataset: dataset whose instructions (paper Tables 11-12) the task uses.
        millions: samples of this task in the stage-2 data (paper Table 2): its default weight.
    """

    name: str
    query: str
    kind: str
    dataset: str
    millions: float


TASKS = {t.name: t for t in (
    Task("I->I", "image", "natural", "ImageNet-1K_i2i", 1.3),
    Task("T->I", "text", "natural", "MSCOCO_t2i", 5.3),
    Task("IT->I", "image+text", "natural", "CIRR", 5.3),
    Task("T->VD", "text", "document", "VisRAG", 1.6),
)}
MIXES = {
    "mixed": tuple(TASKS),
    "natural": tuple(n for n, t in TASKS.items() if t.kind == "natural"),
    "document": tuple(n for n, t in TASKS.items() if t.kind == "document"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(parser, reps=3)
    add_variant_args(parser)
    parser.add_argument("--batch-size", type=int, default=4, help="samples (query + positive candidate) per step")
    parser.add_argument("--mixes", default="mixed,natural,document",
                        help=f"comma-separated task mixes to report, out of {sorted(MIXES)}")
    parser.add_argument("--weights", default=",".join(f"{n}={t.millions:g}" for n, t in TASKS.items()),
                        help="task weights of the mixes (default: stage-2 sample counts in millions, paper Table 2)")
    parser.add_argument("--memory", default="inprocess", choices=["inprocess", "subprocess", "off"],
                        help="peak-memory measurement: in this process after the timing (allocator trimmed and peak "
                             "counter reset before each step), one fresh process per (factor, task), or none")
    parser.add_argument("--mem-jobs", type=int, default=0,
                        help="memory processes run at once (0: one per CPU core on CPU, 1 on CUDA)")
    parser.add_argument("--mem-budget-gib", type=float, default=None,
                        help="budget for the max-batch estimate (default: the device's total memory)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)  # "S:TASK", internal
    args = parser.parse_args(argv)
    check_common_args(args)
    check_variant_args(args)
    args.mix_list = [m.strip() for m in args.mixes.split(",") if m.strip()]
    unknown = [m for m in args.mix_list if m not in MIXES]
    if unknown or not args.mix_list:
        raise SystemExit(f"--mixes: unknown {unknown}; choose from {sorted(MIXES)}")
    try:
        args.weight = {k.strip(): float(v) for k, v in (kv.split("=") for kv in args.weights.split(",") if kv)}
    except ValueError:
        raise SystemExit(f"--weights must look like 'T->I=5.3,T->VD=1.6', got {args.weights!r}") from None
    if set(args.weight) - set(TASKS) or any(w < 0 for w in args.weight.values()):
        raise SystemExit(f"--weights: tasks must be among {list(TASKS)} with weights >= 0, got {args.weights!r}")
    for mix in args.mix_list:
        if sum(args.weight.get(t, 0.0) for t in MIXES[mix]) <= 0:
            raise SystemExit(f"--weights gives every task of mix {mix!r} weight 0; give one of {MIXES[mix]} a weight")
    args.task_list = [t for t in TASKS if args.weight.get(t, 0.0) > 0 and any(t in MIXES[m] for m in args.mix_list)]
    if args.batch_size < 2:
        raise SystemExit(f"--batch-size must be >= 2 (got {args.batch_size}): InfoNCE needs in-batch negatives")
    return args


def mix_weights(args: argparse.Namespace, mix: str) -> dict[str, float]:
    """Normalised weights of the tasks a mix draws its batches from."""
    w = {t: args.weight.get(t, 0.0) for t in MIXES[mix] if args.weight.get(t, 0.0) > 0}
    total = sum(w.values())
    return {t: v / total for t, v in w.items()}


# ------------------------------------------------------------------------------------------------------- batches
def make_samples(preset: str, task_name: str, batch_size: int, seed: int) -> tuple[list, list]:
    """Queries and positive candidates (``Item`` s) for one batch of one task, with the paper's instructions."""
    from mmembed import Item
    from mmembed.data.synth import scenes
    from mmembed.prompts.embedding import instructions_for

    task = TASKS[task_name]
    rng = random.Random(f"{seed}:{task_name}")
    side = tile_side(preset)
    q_instr, c_instr = instructions_for(task.dataset)
    if task.kind == "document":
        # Twice the tile side: 2 x 2 tiles + a thumbnail, like the paper's 896 px VisDoc pages.
        pages = document_pages(rng, batch_size, 2 * side)
        return ([Item(text=q, instruction=q_instr) for _, q in pages],
                [Item(image=p, instruction=c_instr, kind="document") for p, _ in pages])
    queries, cands = [], []
    for image, scene in natural_images(rng, batch_size, side):
        if task.query == "text":
            query = Item(text=scenes.long_caption(scene), instruction=q_instr)
        elif task.query == "image":  # a re-rendered near duplicate, like NIGHTS / ImageNet i2i
            query = Item(image=scenes.render(scenes.rejitter(scene, rng), side=side), instruction=q_instr)
        else:  # composed retrieval: reference image + edit text; the positive shows the edited scene
            edited, edit = scenes.edit_scene(scene, rng)
            query, image = Item(image=image, text=edit, instruction=q_instr), scenes.render(edited, side=side)
        queries.append(query)
        cands.append(Item(image=image, instruction=c_instr, kind="natural"))
    return queries, cands


@dataclass
class Batch:
    """A ``ContrastiveDataModule``-style batch (``query``, ``candidate``, ``num_negatives``) and its size."""

    data: dict
    size: int


def build_batch(builder, queries: list, cands: list, device: torch.device) -> Batch:
    return Batch({"query": builder(queries, "query").to(device), "candidate": builder(cands, "candidate").to(device),
                  "num_negatives": 0}, len(queries))


# ---------------------------------------------------------------------------------------------------------- step
class Trainer:
    """One ``ContrastiveModule`` with LoRA and its optimiser (``benchmarks.common.TrainStep``) plus its inputs."""

    def __init__(self, preset: str, key: int | str, device: torch.device, dtype: torch.dtype, seed: int) -> None:
        v = Variant.parse(key)
        self.train_step = TrainStep(preset, v.factor, device, dtype, seed, in_tower_layer=v.in_tower)
        self.builder = self.train_step.backbone.input_builder

    def step(self, batch: Batch) -> float:
        return self.train_step(batch.data)

    @property
    def image_token_id(self) -> int:
        return self.train_step.backbone.config.image_token_id


# -------------------------------------------------------------------------------------------------------- memory
def measure_step_memory(trainer: Trainer, batches: list[Batch], device: torch.device) -> dict:
    """Peak memory above the pre-step level for one step on each batch (in order), each measured from a reset."""
    baselines, peaks = [], []
    for b in batches:
        if device.type == "cuda":  # cached blocks of the previous step would hide this step's allocations
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        baselines.append(reset_peak(device))
        trainer.step(b)
        peaks.append(read_peak(device) - baselines[-1])
    return {"baseline": baselines[-1], "sizes": [b.size for b in batches], "peaks": peaks}


def half_and_full(trainer: Trainer, preset: str, task: str, batch_size: int, seed: int,
                  device: torch.device) -> list[Batch]:
    queries, cands = make_samples(preset, task, batch_size, seed)
    half = batch_size // 2
    return [build_batch(trainer.builder, queries[:half], cands[:half], device),
            build_batch(trainer.builder, queries, cands, device)]


def memory_child(args: argparse.Namespace, name: str, device: torch.device, dtype: torch.dtype) -> None:
    """In a fresh process: step memory for one (factor, task) at half and full batch; prints one JSON line."""
    key_text, task = args.memory_child.split(":", 1)
    key = Variant.parse(key_text).key
    trainer = Trainer(name, key, device, dtype, args.seed)
    result = measure_step_memory(trainer, half_and_full(trainer, name, task, args.batch_size, args.seed, device),
                                 device)
    print(CHILD_TAG + json.dumps({"s": key, "task": task, **result}), flush=True)


def run_memory_children(args: argparse.Namespace, argv: list[str], device: torch.device) -> list[dict]:
    """One subprocess per (factor, task); returns their JSON results (failures reported, not raised)."""
    configs = [(v.key, task) for task in args.task_list for v in args.variants]
    jobs = args.mem_jobs or (1 if device.type == "cuda" else min(len(configs), os.cpu_count() or 1))
    threads = max(1, torch.get_num_threads() // jobs)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))

    def run(cfg: tuple[int, str]) -> dict:
        cmd = [sys.executable, "-m", "benchmarks.bench_vtc_train", *argv, "--threads", str(threads),
               "--memory-child", f"{cfg[0]}:{cfg[1]}"]
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            if line.startswith(CHILD_TAG):
                return json.loads(line[len(CHILD_TAG):])
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"s": cfg[0], "task": cfg[1], "error": f"exit {proc.returncode}: {' | '.join(tail)}"}

    log(f"measuring peak memory: {len(configs)} fresh processes, {jobs} at a time, {threads} thread(s) each")
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(run, configs))


def memory_fit(r: dict, budget: int) -> dict:
    """Step peak at the full batch, per-sample slope and the linear estimate of the largest batch within budget."""
    (n1, n2), (p1, p2) = r["sizes"], r["peaks"]
    slope = (p2 - p1) / (n2 - n1) if n2 > n1 else float("nan")
    max_batch = math.floor((budget - r["baseline"] - (p2 - slope * n2)) / slope) if slope > 0 else None
    return {"peak": p2, "slope": slope, "max_batch": max_batch}


def print_memory(args: argparse.Namespace, results: list[dict], budget: int, device: torch.device) -> None:
    what = "max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM)"
    rows, fits = [], {}
    for r in results:
        label = Variant.parse(r["s"]).label
        if "error" in r:
            rows.append([r["task"], label, "failed", "", "", "", r["error"][:80]])
            continue
        fit = fits[r["task"], r["s"]] = memory_fit(r, budget)
        (n1, n2), (p1, p2) = r["sizes"], r["peaks"]
        rows.append([r["task"], label, mib(r["baseline"]), f"{mib(p1)} @ {n1}", f"{mib(p2)} @ {n2}",
                     mib(fit["slope"]) if fit["slope"] > 0 else "n/a",
                     str(fit["max_batch"]) if fit["max_batch"] is not None else "n/a"])
    print_table(
        f"Peak memory of one training step ({what} above the level right before the step; "
        f"{'fresh process per row' if args.memory == 'subprocess' else 'measured in the timing process'})",
        ["task", "s", "before step (process)", "step peak @ half batch", "step peak @ batch", "per sample",
         f"est. max batch in {gib(budget)}"],
        rows,
        caption="est. max batch: linear fit through the two step peaks, extrapolated to the budget; approximate "
                "(a step's memory is dominated by activations, which grow linearly with the batch).",
    )
    for mix in args.mix_list:
        tasks = list(mix_weights(args, mix))
        keys = [v.key for v in args.variants]
        per = {s: [fits.get((t, s)) for t in tasks] for s in keys}
        if any(f is None for fs in per.values() for f in fs):
            continue
        peak = {s: max(f["peak"] for f in per[s]) for s in keys}
        line = (f"MEMORY {mix}: worst-task step peak native/VTC = {peak[1] / peak[2]:.2f}x "
                f"({mib(peak[1])} vs {mib(peak[2])})")
        if all(f["max_batch"] for fs in per.values() for f in fs):
            mb = {s: min(f["max_batch"] for f in per[s]) for s in keys}
            line += f"; est. max batch in {gib(budget)}: VTC {mb[2]} vs native {mb[1]} ({mb[2] / mb[1]:.2f}x)"
        print(line)
        for v in args.variants:
            if v.in_tower is not None:
                print(f"MEMORY {mix}, in-tower k={v.in_tower}: worst-task step peak native/variant = "
                      f"{peak[1] / peak[v.key]:.2f}x ({mib(peak[1])} vs {mib(peak[v.key])})")


# ---------------------------------------------------------------------------------------------------------- main
def mix_timings(args: argparse.Namespace, timings: Timings) -> Timings:
    """Per-repetition seconds per step of each mix's weighted stream of one-task batches, from the task timings."""
    wall, cpu = {}, {}
    for mix in args.mix_list:
        w = mix_weights(args, mix)
        for s in (v.key for v in args.variants):
            wall[mix, s] = [sum(w[t] * timings.seconds[t, s][i] for t in w) for i in range(args.reps)]
            cpu[mix, s] = [sum(w[t] * timings.cpu_seconds[t, s][i] for t in w) for i in range(args.reps)]
    return Timings(wall, cpu)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the tables and ratio lines; returns the measured numbers (for tests)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    start = time.perf_counter()
    with benchmark_session(args) as (name, device, dtype):
        if args.memory_child:
            memory_child(args, name, device, dtype)
            return {}
        results = run(args, argv, name, device, dtype)
    print(f"wall time of the benchmark (after imports): {time.perf_counter() - start:.0f} s")
    return results


def run(args: argparse.Namespace, argv: list[str], name: str, device: torch.device, dtype: torch.dtype) -> dict:
    mode = "bf16 autocast, fp32 weights" if dtype != torch.float32 else "float32"
    print(f"device: {device_description(device)} | {mode} | preset {name} | LoRA r={LORA['lora_r']} on the LLM")

    t0 = time.perf_counter()
    keys = [v.key for v in args.variants]
    trainers = {s: Trainer(name, s, device, dtype, args.seed) for s in keys}
    log(f"built {len(trainers)} models in {time.perf_counter() - t0:.1f} s")
    batches, stats = {}, {}
    for task in args.task_list:
        queries, cands = make_samples(name, task, args.batch_size, args.seed)
        for s, tr in trainers.items():
            b = batches[task, s] = build_batch(tr.builder, queries, cands, device)
            vis = count_image_tokens(b.data["query"]["input_ids"], tr.image_token_id) + count_image_tokens(
                b.data["candidate"]["input_ids"], tr.image_token_id)
            real = int(b.data["query"]["attention_mask"].sum() + b.data["candidate"]["attention_mask"].sum())
            stats[task, s] = (sum(vis) / b.size, real / b.size)

    # Native and VTC of one task sit next to each other, so they run back to back in every repetition.
    fns = {(task, s): (lambda t=task, s=s: trainers[s].step(batches[t, s])) for task in args.task_list
           for s in keys}
    log(f"timing {len(fns)} configurations x ({args.warmup} warm-up + {args.reps}) repetitions, interleaved")
    t0 = time.perf_counter()
    timings = run_interleaved(fns, args.reps, args.warmup, device, progress=log)
    log(f"timed in {time.perf_counter() - t0:.1f} s")
    mixes = mix_timings(args, timings)

    bs = args.batch_size
    rows, results = [], {"tokens": {}, "ratios": {}, "samples_per_s": {}}
    for task in args.task_list:
        for s in keys:
            sec = timings.median((task, s))
            vis, real = stats[task, s]
            speedup = f"{timings.ratio((task, 1), (task, s)):.2f}x" if s != 1 else ""
            rows.append([task, TASKS[task].kind, Variant.parse(s).label, f"{vis:g}", f"{real:.0f}",
                         f"{sec:.2f}", f"{bs / sec:.2f}", speedup, f"{timings.spread((task, s)):.0%}"])
            results["tokens"][task, s] = vis
    for mix in args.mix_list:
        comp = " + ".join(f"{w:.0%} {t}" for t, w in mix_weights(args, mix).items())
        for s in keys:
            sec = mixes.median((mix, s))
            speedup = f"{mixes.ratio((mix, 1), (mix, s)):.2f}x" if s != 1 else ""
            rows.append([f"mix: {mix}", comp, Variant.parse(s).label, "", "", f"{sec:.2f}",
                         f"{bs / sec:.2f}", speedup, f"{mixes.spread((mix, s)):.0%}"])
            results["samples_per_s"][mix, s] = bs / sec
    print_table(
        f"Contrastive training step, {name}: VTC (s=2) vs native (s=1)"
        f"{' and VTC + in-tower' if len(keys) > 2 else ''}; median of {args.reps} interleaved reps, "
        f"batch {bs} of one task",
        ["task / mix", "candidates", "s", "visual tok/sample", "tokens/sample (q+c)", "step s", "samples/s",
         "VTC speed-up", "spread"],
        rows,
        caption="step = embed queries + candidates, InfoNCE (in-batch negatives), backward, AdamW; batches built "
                "beforehand. A mix = weighted stream of one-task batches (step time = weighted mean of its tasks' "
                "per repetition). speed-up = median over reps of the paired native/VTC time ratio; spread = "
                "(max-min)/median over reps.",
    )
    for mix in args.mix_list:
        results["ratios"][mix] = mixes.ratio((mix, 1), (mix, 2))
        print(ratio_line(f"{mix} train samples/s", mixes, (mix, 1), (mix, 2), GOAL, device))
        for v in args.variants:
            if v.in_tower is not None:
                results["ratios"][mix, v.key] = mixes.ratio((mix, 1), (mix, v.key))
                print(ratio_line(f"{mix} train samples/s, in-tower k={v.in_tower}", mixes, (mix, 1), (mix, v.key),
                                 None, device))

    if args.memory != "off":
        t0 = time.perf_counter()
        if args.memory == "subprocess":
            del trainers, batches  # the children need the memory more than this process does
            mem = run_memory_children(args, argv, device)
        else:
            mem = [{"s": s, "task": task, **measure_step_memory(
                       trainers[s], half_and_full(trainers[s], name, task, bs, args.seed, device), device)}
                   for task in args.task_list for s in keys]
        log(f"memory measured in {time.perf_counter() - t0:.1f} s")
        budget = int(args.mem_budget_gib * 2**30) if args.mem_budget_gib else total_memory_bytes(device)
        print_memory(args, mem, budget, device)
        results["memory"] = mem
    if args.preset == "mini":
        print_shape_table([name, REFERENCE_PRESET])
    return results


if __name__ == "__main__":
    main()
