"""Latency, throughput, FLOP accounting and training throughput at real size: VTC (s=2) vs native (s=1), Tables 6/9.

Follows the paper's latency protocol (Table 6: InternVL3-2B, batch 1, bf16; natural images at 448 px and VisDoc
pages of 896 x 896, i.e. 2 x 2 tiles + thumbnail) and its training comparison (Table 9: step throughput at the
largest batch that fits), with random-init presets of the published shapes (``mmembed.backbone.presets``). Both
factors of a preset hold the same weights (the compression is parameter-free) and are measured in one run.

Per preset and factor:

- batch-1 latency of an MMEB query (image + instruction), an MMEB candidate (image), a VisDoc query (text) and a
  VisDoc candidate (4-tile page): ``VTCBackbone.embed`` on inputs built beforehand, warmed up, CUDA-synchronised,
  median of ``--latency-reps``; the preprocessing (``InputBuilder``, CPU) is timed apart;
- batched throughput of each kind at ``--batch-size`` and the model FLOPs per item computed from the config (vision
  tower per tile + projector + LLM per token + causal attention), as achieved TFLOP/s and as a fraction of the
  device's peak bf16 FLOP/s (``--peak-tflops``; known for a few GPU names);
- training: ``ContrastiveModule.training_step`` + AdamW with LoRA r=16 (``benchmarks.common.TrainStep``) on
  MMEB-style image/image batches, batch doubled from ``--train-batch`` until it runs out of memory (or reaches
  ``--train-max-batch``); samples/s and peak memory at the largest batch that fitted;
- options: ``--compile`` (``torch.compile`` of the embedding forward), ``--cuda-graphs`` (batch-1 latency through
  ``torch.compile(mode="reduce-overhead")``, which captures CUDA graphs), ``--sort-by-length`` (a mixed corpus
  batched in input order vs sorted by length);
- the projected time of a full MMEB + VisDoc evaluation from the measured throughputs (item counts: see
  ``eval_item_counts``).

Run on a GPU machine from the repository root::

    python -m benchmarks.bench_gpu_latency                                       # internvl3_2b, bf16, SDPA
    python -m benchmarks.bench_gpu_latency --presets internvl3_1b,internvl3_2b,internvl3_8b --compile --cuda-graphs
    python -m benchmarks.bench_gpu_latency --presets tiny --device cpu --latency-reps 3   # CPU smoke run (tests)
    python -m benchmarks.bench_gpu_latency --in-tower 6,12            # + VTC with in-tower compression (issue 27)

``--in-tower K,..`` adds VTC + in-tower compression after vision block K (``mmembed/backbone/vtc.py``) as further
configurations beside native and VTC, same weights; its rows and ``RATIO`` lines are keyed ``2@K``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import (
    TrainStep,
    Variant,
    device_description,
    document_pages,
    log,
    natural_images,
    print_table,
    setup_device,
    synchronize,
    tile_side,
)

KINDS = ("mmeb_query", "mmeb_candidate", "visdoc_query", "visdoc_candidate")
# Dense bf16 tensor-core peaks from the vendors' data sheets (SXM parts); anything else: pass --peak-tflops.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
# Goals from issue 15 (one H100/H200, InternVL3-2B).
GOAL_QUERY_MS = 8.0
GOAL_FLOP_FRACTION = 0.5
GOAL_TRAIN_RATIO = 2.3
GOAL_EVAL_MIN = 30.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--presets", default="internvl3_2b",
                   help="comma-separated presets (random init); internvl3_8b is skipped when it cannot fit")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--attn", default="sdpa", help="attention implementation: sdpa, flash_attention_2 or eager")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default 1 on CPU)")
    p.add_argument("--latency-reps", type=int, default=50, help="timed batch-1 calls per kind (median)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls before each timing")
    p.add_argument("--batch-size", type=int, default=32, help="batch of the throughput measurement")
    p.add_argument("--throughput-reps", type=int, default=5, help="timed batches per kind (median)")
    p.add_argument("--train-batch", type=int, default=8, help="first training batch; doubled until out of memory")
    p.add_argument("--train-max-batch", type=int, default=None,
                   help="stop doubling here (default 1024 on CUDA, --train-batch on CPU, where nothing runs out)")
    p.add_argument("--train-steps", type=int, default=5, help="timed training steps at the largest batch")
    p.add_argument("--train-presets", default=None,
                   help="presets whose training step is measured (default: internvl3_2b if listed, else the first)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in the training step")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd embedding forwards")
    p.add_argument("--cuda-graphs", action="store_true", help="also time batch 1 with CUDA graphs (reduce-overhead)")
    p.add_argument("--sort-by-length", action="store_true",
                   help="also time a mixed-length corpus batched in input order vs sorted by length")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak bf16 dense TFLOP/s (default: from the GPU name for H100/H200/A100)")
    p.add_argument("--counts", default=None,
                   help="JSON {kind: items} for the evaluation projection instead of the defaults (eval_item_counts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--in-tower", default="",
                   help="comma-separated vision blocks k: also measure VTC + in-tower compression after block k")
    p.add_argument("--json", default=None, help="also write all figures to this JSON file")
    args = p.parse_args(argv)
    args.preset_list = [x.strip() for x in args.presets.split(",") if x.strip()]
    try:
        blocks = [int(k) for k in args.in_tower.split(",") if k.strip()]
    except ValueError:
        raise SystemExit(f"--in-tower {args.in_tower!r}: give comma-separated vision block indices") from None
    # Results are keyed by variant: 2 (VTC), 1 (native), "2@k" (in-tower); a bad k fails when the model is built.
    args.factors = [2, 1, *(Variant(2, k).key for k in blocks)]
    if not args.preset_list:
        raise SystemExit("--presets is empty; e.g. --presets internvl3_2b")
    for name in ("latency_reps", "batch_size", "throughput_reps", "train_batch", "train_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.train_presets is None:
        args.train_list = ["internvl3_2b"] if "internvl3_2b" in args.preset_list else args.preset_list[:1]
    else:
        args.train_list = [x.strip() for x in args.train_presets.split(",") if x.strip()]
    return args


# ---------------------------------------------------------------------------------------------------------- items
def make_items(preset: str, n: int, seed: int) -> dict[str, list]:
    """``n`` items of each kind, with the paper's instructions (Tables 11-12)."""
    from mmembed import Item
    from mmembed.prompts.embedding import instructions_for

    rng = random.Random(seed)
    side = tile_side(preset)
    q_instr, _ = instructions_for("MSCOCO_i2t")
    _, c_instr = instructions_for("MSCOCO_t2i")
    vq, vc = instructions_for("VisRAG")
    nat = natural_images(rng, 2 * n, side)
    pages = document_pages(rng, n, 2 * side)  # 2 x 2 tiles + thumbnail, the paper's 896 px pages at 448 px tiles
    return {
        "mmeb_query": [Item(image=im, instruction=q_instr) for im, _ in nat[:n]],
        "mmeb_candidate": [Item(image=im, instruction=c_instr, kind="natural") for im, _ in nat[n:]],
        "visdoc_query": [Item(text=q, instruction=vq) for _, q in pages],
        "visdoc_candidate": [Item(image=p, instruction=vc, kind="document") for p, _ in pages],
    }


def role_of(kind: str) -> str:
    return "query" if kind.endswith("query") else "candidate"


# ---------------------------------------------------------------------------------------------------------- FLOPs
def item_gflops(preset: str, vtc_factor: int | str, tiles: int, seq_len: int) -> float:
    """Forward GFLOPs of one item from the config: vision tower per tile, projector per visual token, LLM per token
    (projections + MLP) and causal attention over ``seq_len`` (multiply-adds x 2; norms and softmax left out).
    ``vtc_factor`` is a variant key (``2``, ``1`` or ``"2@k"`` for in-tower); see ``benchmarks.common.item_gflops``."""
    from benchmarks.common import item_gflops as variant_gflops

    return variant_gflops(preset, Variant.parse(vtc_factor), tiles, seq_len)


def label(s: int | str) -> str:
    return Variant.parse(s).label


def peak_tflops(args: argparse.Namespace, device: torch.device) -> tuple[float | None, str]:
    if args.peak_tflops:
        return args.peak_tflops, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak known for a CPU; pass --peak-tflops"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value, f"{key} data-sheet dense bf16 peak"
    return None, f"no peak known for {name!r}; pass --peak-tflops"


def eval_item_counts(path: str | None) -> tuple[dict[str, int], str]:
    """Items embedded by a full MMEB (image part) + VisDoc evaluation, for the projection.

    Defaults (an estimate, said so in the output): MMEB has 36 image subsets (``mmembed.eval.suites``), each
    evaluated on 1,000 queries ranked against 1,000 candidates; counted as 1,000 image queries and 1,000 image
    candidates per subset (an upper bound: many candidate lists are text labels, cheaper than images). VisDoc has 24
    sets; counted as 500 text queries and 1,000 pages per set. Pass ``--counts`` with real counts to replace them.
    """
    from mmembed.eval.suites import MMEB_SUBSETS, VISDOC_SETS

    if path:
        counts = json.loads(Path(path).read_text())
        bad = set(counts) - set(KINDS)
        if bad:
            raise SystemExit(f"--counts: unknown kinds {sorted(bad)}; use {list(KINDS)}")
        return {k: int(counts.get(k, 0)) for k in KINDS}, f"from {path}"
    m, v = len(MMEB_SUBSETS), len(VISDOC_SETS)
    return ({"mmeb_query": 1000 * m, "mmeb_candidate": 1000 * m, "visdoc_query": 500 * v,
             "visdoc_candidate": 1000 * v},
            f"estimate: {m} MMEB subsets x (1000 image queries + 1000 image candidates), {v} VisDoc sets x "
            f"(500 text queries + 1000 pages); pass --counts for real ones")


# ---------------------------------------------------------------------------------------------------------- timing
def time_calls(fn, reps: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds of each of ``reps`` calls after ``warmup`` untimed ones, synchronised around every call."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        synchronize(device)
        t = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - t)
    return out


def set_attention(model, attn: str) -> str:
    """Switch the transformers attention implementation (all sub-models); returns what is in effect."""
    try:
        model.set_attn_implementation(attn)
    except (ValueError, ImportError, AttributeError) as e:
        log(f"attention {attn!r} not available ({str(e).splitlines()[0][:100]}); keeping the default")
    return str(getattr(model.config, "_attn_implementation", "unknown"))


def build_embedder(preset: str, s: int | str, device: torch.device, dtype: torch.dtype, attn: str, seed: int):
    from mmembed.backbone import build_backbone

    v = Variant.parse(s)
    with device:  # random init directly on the device: seconds for 8B on a GPU instead of minutes on a CPU
        backbone = build_backbone(preset, v.factor, finetune=None, dtype=dtype, seed=seed, in_tower_layer=v.in_tower)
    backbone.eval()
    in_effect = set_attention(backbone.hf_model, attn)
    return backbone, backbone.input_builder, in_effect


def fits_in_memory(preset: str, device: torch.device) -> tuple[bool, str]:
    """Whether a bf16 copy for inference plus an fp32 one for training could fit (rough: parameters only)."""
    if device.type != "cuda":
        return True, ""
    from benchmarks.common import _config

    cfg = _config(preset)
    t = cfg.text_config
    llm = t.num_hidden_layers * (4 * t.hidden_size**2 + 3 * t.hidden_size * t.intermediate_size)
    params = llm + 2 * t.vocab_size * t.hidden_size + 0.3e9
    need = params * 2 * 1.2
    free, _ = torch.cuda.mem_get_info(device)
    return need < free, f"~{need / 2**30:.0f} GiB for bf16 weights, {free / 2**30:.0f} GiB free"


def measure_inference(args, preset: str, device: torch.device, dtype: torch.dtype, peak: float | None) -> dict:
    """Batch-1 latency and batched throughput of every kind for both factors; same weights in both."""
    n = max(args.batch_size, 1)
    items = make_items(preset, n, args.seed)
    res: dict = {"latency_ms": {}, "prep_ms": {}, "items_s": {}, "gflops": {}, "tflops": {}, "peak_fraction": {},
                 "tokens": {}, "tiles": {}, "compile_ms": {}, "graphs_ms": {}, "sorted_items_s": {}}
    for s in args.factors:
        backbone, builder, attn = build_embedder(preset, s, device, dtype, args.attn, args.seed)
        res["attention"] = attn
        for kind in KINDS:
            role = role_of(kind)
            one = builder(items[kind][:1], role).to(device)
            prep = time_calls(lambda k=kind, r=role, f=builder: f(items[k][:1], r), max(3, args.latency_reps // 5), 1,
                              torch.device("cpu"))
            with torch.inference_mode():
                lat = time_calls(lambda b=one, m=backbone: m.embed(**b), args.latency_reps, args.warmup, device)
                batch = builder(items[kind][: args.batch_size], role).to(device)
                thr = time_calls(lambda b=batch, m=backbone: m.embed(**b), args.throughput_reps, 2, device)
            seq = batch["attention_mask"].sum(1).tolist()
            tiles = batch["num_tiles"].tolist()
            flops = sum(item_gflops(preset, s, t, L) for t, L in zip(tiles, seq))  # whole batch
            sec = statistics.median(thr)
            res["latency_ms"][kind, s] = 1000 * statistics.median(lat)
            res["prep_ms"][kind, s] = 1000 * statistics.median(prep)
            res["items_s"][kind, s] = len(seq) / sec
            res["gflops"][kind, s] = flops / len(seq)
            res["tflops"][kind, s] = flops / sec / 1000
            res["peak_fraction"][kind, s] = res["tflops"][kind, s] / peak if peak else None
            res["tokens"][kind, s] = int(one["attention_mask"].sum())
            res["tiles"][kind, s] = int(one["num_tiles"].sum())
            if args.compile:
                res["compile_ms"][kind, s] = compiled_latency(backbone, one, args, device, mode="default")
            if args.cuda_graphs and device.type == "cuda":
                res["graphs_ms"][kind, s] = compiled_latency(backbone, one, args, device, mode="reduce-overhead")
        if args.sort_by_length:
            res["sorted_items_s"][s] = sorted_vs_input_order(backbone, builder, items, args, device)
        log(f"{preset} s={s}: inference measured")
        del backbone
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def compiled_latency(backbone, batch, args, device: torch.device, mode: str) -> float | str:
    """Batch-1 median latency through ``torch.compile`` (``reduce-overhead`` captures CUDA graphs); errors reported."""
    try:
        fn = torch.compile(backbone.embed, mode=mode, dynamic=False)
        with torch.inference_mode():
            lat = time_calls(lambda: fn(**batch), args.latency_reps, max(args.warmup, 3), device)
        return 1000 * statistics.median(lat)
    except Exception as e:  # a compiler failure is a result to report, not a reason to lose the other figures
        return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"


def sorted_vs_input_order(backbone, builder, items, args, device: torch.device) -> dict[str, float]:
    """Items/s of a mixed corpus (all kinds shuffled) in batches of input order vs batches sorted by length."""
    corpus = [(it, role_of(k)) for k in KINDS for it in items[k]]
    random.Random(args.seed).shuffle(corpus)
    out = {}
    for how in ("input order", "sorted by length"):
        order = list(range(len(corpus)))
        if how == "sorted by length":
            order.sort(key=lambda i: (corpus[i][1], builder.num_visual_tokens(corpus[i][0]) + len(
                corpus[i][0].text or "") // 4))
        chunks = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]
        # A batch holds one role (queries and candidates use different templates), as in evaluation.
        batches = []
        for c in chunks:
            for role in ("query", "candidate"):
                its = [corpus[i][0] for i in c if corpus[i][1] == role]
                if its:
                    batches.append(builder(its, role).to(device))
        with torch.inference_mode():
            sec = statistics.median(time_calls(lambda bs=batches: [backbone.embed(**b) for b in bs],
                                               max(1, args.throughput_reps // 2), 1, device))
        out[how] = len(corpus) / sec
    return out


# ---------------------------------------------------------------------------------------------------------- training
def measure_training(args, preset: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Per factor: the largest batch (doubling) a training step fits, its samples/s and peak memory."""
    limit = args.train_max_batch or (1024 if device.type == "cuda" else args.train_batch)
    out = {}
    for s in args.factors:
        finetune = {"mode": "lora", "lora_r": 16, "gradient_checkpointing": args.grad_ckpt}
        v = Variant.parse(s)
        with device:
            step = TrainStep(preset, v.factor, device, dtype, args.seed, finetune=finetune, in_tower_layer=v.in_tower)
        builder = step.backbone.input_builder
        best, bs = None, args.train_batch
        while bs <= limit:
            items = make_items(preset, bs, args.seed + bs)
            batch = {"query": builder(items["mmeb_query"], "query").to(device),
                     "candidate": builder(items["mmeb_candidate"], "candidate").to(device), "num_negatives": 0}
            try:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                sec = statistics.median(time_calls(lambda b=batch, f=step: f(b), args.train_steps, 1, device))
                peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
                best = {"batch": bs, "samples_s": bs / sec, "peak_bytes": peak}
                log(f"{preset} s={s}: training batch {bs}: {bs / sec:.1f} samples/s")
            except torch.OutOfMemoryError:
                log(f"{preset} s={s}: training batch {bs} ran out of memory")
                break
            finally:
                del batch
                step.optimizer.zero_grad(set_to_none=True)
            bs *= 2
        out[s] = best
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------------------- report
def fmt(x, spec: str = ".1f") -> str:
    if x is None:
        return "n/a"
    return x if isinstance(x, str) else format(x, spec)


def report(preset: str, inf: dict, train: dict | None, counts: dict, counts_note: str, peak_note: str,
           factors: list | tuple = (2, 1)) -> dict:
    rows = []
    for kind in KINDS:
        for s in factors:
            rows.append([kind, label(s), str(inf["tiles"][kind, s]),
                         str(inf["tokens"][kind, s]), fmt(inf["latency_ms"][kind, s], ".2f"),
                         fmt(inf["compile_ms"].get((kind, s)), ".2f"), fmt(inf["graphs_ms"].get((kind, s)), ".2f"),
                         fmt(inf["prep_ms"][kind, s], ".2f"), fmt(inf["items_s"][kind, s]),
                         fmt(inf["gflops"][kind, s], ".4g"), fmt(inf["tflops"][kind, s], ".3g"),
                         fmt(inf["peak_fraction"][kind, s] and 100 * inf["peak_fraction"][kind, s], ".1f")])
    print_table(
        f"{preset}: batch-1 latency and batched throughput, VTC (s=2) vs native (s=1), same weights, "
        f"attention {inf['attention']}",
        ["kind", "s", "tiles", "tokens", "batch-1 ms", "compiled ms", "CUDA graphs ms", "prep ms (CPU)", "items/s",
         "GFLOP/item", "TFLOP/s", "% of peak"],
        rows,
        caption=f"median of warmed-up, synchronised calls; items/s and TFLOP/s at the throughput batch; FLOPs from "
                f"the config (vision + projector + LLM + attention). Peak: {peak_note}.",
    )
    lines = {}
    for kind in KINDS:
        r = inf["latency_ms"][kind, 1] / inf["latency_ms"][kind, 2]
        lines[f"latency {kind}"] = r
        print(f"RATIO {preset} {kind} batch-1 latency: native/VTC = {r:.2f}x "
              f"({inf['latency_ms'][kind, 1]:.2f} vs {inf['latency_ms'][kind, 2]:.2f} ms)")
        for s in factors:
            if isinstance(s, str):  # in-tower variants
                r = lines[f"latency {kind} {s}"] = inf["latency_ms"][kind, 1] / inf["latency_ms"][kind, s]
                print(f"RATIO {preset} {kind} batch-1 latency, {label(s)}: native/variant = {r:.2f}x "
                      f"({inf['latency_ms'][kind, 1]:.2f} vs {inf['latency_ms'][kind, s]:.2f} ms)")
    goals = preset == "internvl3_2b"  # the goals are stated for the 2B model
    q = inf["latency_ms"]["mmeb_query", 2]
    if goals:
        print(f"GOAL {preset} batch-1 MMEB query (VTC) <= {GOAL_QUERY_MS:g} ms: {q:.2f} ms "
              f"({'met' if q <= GOAL_QUERY_MS else 'NOT met'})")
    frac = inf["peak_fraction"]["visdoc_candidate", 2]
    if goals and frac is not None:
        print(f"GOAL {preset} batched candidates >= {GOAL_FLOP_FRACTION:.0%} of the FLOP limit: {frac:.1%} "
              f"({'met' if frac >= GOAL_FLOP_FRACTION else 'NOT met'})")
    for s, how in inf["sorted_items_s"].items():
        print(f"SORT {preset} s={s}: mixed corpus {how['input order']:.1f} items/s in input order, "
              f"{how['sorted by length']:.1f} sorted by length ({how['sorted by length'] / how['input order']:.2f}x)")
    projection = {}
    for s in factors:
        seconds = {k: counts[k] / inf["items_s"][k, s] for k in KINDS}
        mmeb = seconds["mmeb_query"] + seconds["mmeb_candidate"]
        visdoc = seconds["visdoc_query"] + seconds["visdoc_candidate"]
        projection[s] = {"mmeb_min": mmeb / 60, "visdoc_min": visdoc / 60}
        print(f"PROJECTION {preset} s={s}: full MMEB {mmeb / 60:.1f} min + VisDoc {visdoc / 60:.1f} min of "
              f"embedding on this device at the throughput batch ({counts_note})")
    if goals:
        m = projection[2]["mmeb_min"]
        print(f"GOAL {preset} full MMEB evaluation <= {GOAL_EVAL_MIN:g} min: {m:.1f} min "
              f"({'met' if m <= GOAL_EVAL_MIN else 'NOT met'})")
    if train:
        rows = []
        for s in factors:
            t = train[s]
            rows.append([label(s), fmt(t and t["batch"], "d"),
                         fmt(t and t["samples_s"]), fmt(t and t["peak_bytes"] and t["peak_bytes"] / 2**30, ".2f")])
        print_table(f"{preset}: training step (ContrastiveModule.training_step + AdamW, LoRA r=16) at the largest "
                    f"batch that fits", ["s", "largest batch", "samples/s", "peak GiB"], rows)
        if train[1] and train[2]:
            r = train[2]["samples_s"] / train[1]["samples_s"]
            goal = f" (goal >= {GOAL_TRAIN_RATIO:g}x: {'met' if r >= GOAL_TRAIN_RATIO else 'NOT met'})" if goals else ""
            print(f"RATIO {preset} training samples/s at the largest batch: VTC/native = {r:.2f}x{goal}")
            lines["train"] = r
        for s in factors:
            if isinstance(s, str) and train[1] and train[s]:
                r = lines[f"train {s}"] = train[s]["samples_s"] / train[1]["samples_s"]
                print(f"RATIO {preset} training samples/s at the largest batch, {label(s)}: variant/native = {r:.2f}x")
    return {"ratios": lines, "projection": projection}


def _jsonable(x):
    if isinstance(x, dict):
        return {(("|".join(map(str, k))) if isinstance(k, tuple) else str(k)): _jsonable(v) for k, v in x.items()}
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print tables and RATIO / GOAL / PROJECTION lines; returns every figure (for tests)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        device, dtype = setup_device(args.device, args.dtype, args.threads)
        return run(args, device, dtype)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    start = time.perf_counter()
    peak, peak_note = peak_tflops(args, device)
    counts, counts_note = eval_item_counts(args.counts)
    print(f"device: {device_description(device)} | dtype {str(dtype).removeprefix('torch.')} | torch "
          f"{torch.__version__} | {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    results: dict = {"device": device_description(device), "dtype": str(dtype), "presets": {}}
    for preset in args.preset_list:
        ok, why = fits_in_memory(preset, device)
        if not ok:
            print(f"SKIP {preset}: does not fit ({why})")
            continue
        t0 = time.perf_counter()
        inf = measure_inference(args, preset, device, dtype, peak)
        train = measure_training(args, preset, device, dtype) if preset in args.train_list else None
        summary = report(preset, inf, train, counts, counts_note, peak_note, args.factors)
        results["presets"][preset] = {"inference": inf, "training": train, **summary}
        log(f"{preset} done in {time.perf_counter() - t0:.0f} s")
    print(f"wall time of the benchmark (after imports): {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(_jsonable(results), indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
