"""Encode throughput of VTC (s=2) against native InternVL3 (s=1) on the same weights (paper §3.2, Table 6).

Issue: for the mini preset and in one run, print visual tokens per item and the VTC / native encode-throughput ratio
for natural images and for 4-tile documents; goal on CPU >= 1.2x for natural images and >= 1.6x for documents.

Both models are built from the same preset and seed, so they hold identical weights (the compression is
parameter-free) and differ only in ``vtc_factor``. Candidates follow the paper's Table 6 setting: natural images of
one tile (448 px for InternVL shapes) and document pages of twice the tile side, which the document tiler cuts into
2 x 2 tiles plus a thumbnail, each with the paper's candidate instruction. Reported per kind and model:

- encode items/s: ``Embedder.encode`` end to end (templating, tiling, image processing, model);
- model-only items/s: ``VTCBackbone.embed`` on batches built beforehand;
- the split of the time into preprocessing, vision tower (+ compression + projector) and LLM (model minus vision).

``--in-tower 0,1`` adds VTC + in-tower compression after those vision blocks (issue 27; same weights again) to the
same interleaved run, and for every compressed configuration prints the FLOP ratio over native it should reach (from
the configs, ``benchmarks.common.item_gflops``) and the fraction of it the measured speed-up achieves.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_vtc_encode                                # mini, CPU defaults
    .venv/bin/python -m benchmarks.bench_vtc_encode --mini-shape 2b-proportional   # shape with 2B proportions
    .venv/bin/python -m benchmarks.bench_vtc_encode --mini-shape 2b-proportional --in-tower 0,1   # + in-tower
    python -m benchmarks.bench_vtc_encode --n 64 --batch-size 16                   # GPU box (bf16 by default)
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from benchmarks.common import (
    NATIVE,
    REFERENCE_PRESET,
    VTC,
    Variant,
    add_common_args,
    add_variant_args,
    benchmark_session,
    check_common_args,
    check_variant_args,
    count_image_tokens,
    device_description,
    document_pages,
    flop_ratio_line,
    item_gflops,
    log,
    natural_images,
    print_shape_table,
    print_table,
    ratio_line,
    run_interleaved,
    tile_side,
)
from mmembed.backbone.vtc import tokens_per_tile

# Targets from the issue (CPU, mini preset): encode throughput of VTC over native.
GOALS = {"natural": 1.2, "document": 1.6}
# Issue 27's goal for VTC + in-tower on natural images at 2B proportions; and >= 85% of the FLOP ratio.
IN_TOWER_GOAL = 2.0
KINDS = ("natural", "document")
# Candidate-side instructions of the paper (Tables 11-12): MSCOCO t2i for natural images, VisRAG for documents.
INSTRUCTION_SOURCE = {"natural": "MSCOCO_t2i", "document": "VisRAG"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(parser, reps=3)
    add_variant_args(parser)
    parser.add_argument("--n", type=int, default=4, help="items encoded per kind and repetition")
    parser.add_argument("--batch-size", type=int, default=4, help="Embedder.encode batch size")
    args = parser.parse_args(argv)
    check_common_args(args)
    check_variant_args(args)
    if args.n < 1 or args.batch_size < 1:
        raise SystemExit(f"--n and --batch-size must be >= 1 (got {args.n}, {args.batch_size})")
    return args


def build_items(preset: str, n: int, seed: int) -> dict:
    """``n`` natural-image and ``n`` document candidates with the paper's instructions."""
    from mmembed import Item
    from mmembed.prompts.embedding import instructions_for

    rng = random.Random(seed)
    side = tile_side(preset)
    instr = {k: instructions_for(v)[1] for k, v in INSTRUCTION_SOURCE.items()}
    return {
        "natural": [Item(image=im, instruction=instr["natural"], kind="natural")
                    for im, _ in natural_images(rng, n, side)],
        # Twice the tile side: the document policy (<= 4 tiles) then yields 2 x 2 tiles + a thumbnail, as the
        # paper's 896x896 VisDoc pages do with 448 px tiles.
        "document": [Item(image=im, instruction=instr["document"], kind="document")
                     for im, _ in document_pages(rng, n, 2 * side)],
    }


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the tables and ratio lines; returns the measured numbers (for tests)."""
    args = parse_args(argv)
    start = time.perf_counter()
    with benchmark_session(args) as (name, device, dtype):
        results = run(args, name, device, dtype)
    print(f"wall time of the benchmark (after imports): {time.perf_counter() - start:.0f} s")
    return results


def run(args: argparse.Namespace, name: str, device: torch.device, dtype: torch.dtype) -> dict:
    from mmembed import Embedder

    print(f"device: {device_description(device)} | dtype {str(dtype).removeprefix('torch.')} | preset {name}")
    variants: list[Variant] = args.variants

    t0 = time.perf_counter()
    emb = {v: Embedder.from_pretrained(name, vtc_factor=v.factor, in_tower_layer=v.in_tower, device=device,
                                       dtype=dtype, seed=args.seed) for v in variants}
    log(f"built {len(emb)} models in {time.perf_counter() - t0:.1f} s")
    identical = all(same_weights(emb[NATIVE].module, emb[v].module) for v in variants)
    items = build_items(name, args.n, args.seed)

    # Batches built once, on the device, in the order encode() uses (items of one kind cost the same, so it keeps
    # the input order), for the model-only and vision-only timings.
    batches = {}
    tokens, seq_len, tiles = {}, {}, {}
    for kind in KINDS:
        for v in variants:
            e, its = emb[v], items[kind]
            built = [e.input_builder(its[i:i + args.batch_size], "candidate").to(device)
                     for i in range(0, len(its), args.batch_size)]
            batches[kind, v] = built
            counted = [c for b in built for c in count_image_tokens(b["input_ids"], e.module.config.image_token_id)]
            declared = [e.num_visual_tokens(it) for it in its]
            if counted != declared:
                raise RuntimeError(f"{kind}, {v.label}: the batches hold {counted} visual tokens per item but "
                                   f"num_visual_tokens says {declared}")
            tokens[kind, v] = sum(counted) / len(counted)
            seq_len[kind, v] = sum(int(b["attention_mask"].sum()) for b in built) / len(its)
            tiles[kind, v] = sum(int(b["num_tiles"].sum()) for b in built) / len(its)

    def encode_fn(kind: str, v: Variant):
        return lambda: emb[v].encode(items[kind], role="candidate", batch_size=args.batch_size, show_progress=False)

    def model_fn(kind: str, v: Variant):
        return lambda: [emb[v].module.embed(**b) for b in batches[kind, v]]

    def vision_fn(kind: str, v: Variant):
        internvl, cfg = emb[v].module.internvl, emb[v].module.config
        return lambda: [internvl.get_image_features(
            pixel_values=b["pixel_values"].to(dtype), vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy) for b in batches[kind, v]]

    def prep_fn(kind: str, v: Variant):
        its = items[kind]
        return lambda: [emb[v].input_builder(its[i:i + args.batch_size], "candidate")
                        for i in range(0, len(its), args.batch_size)]

    makers = {"encode": encode_fn, "model": model_fn, "vision": vision_fn, "prep": prep_fn}
    fns = {(what, kind, v): make(kind, v) for what, make in makers.items() for kind in KINDS for v in variants}
    log(f"timing {len(fns)} configurations x ({args.warmup} warm-up + {args.reps}) repetitions, interleaved")
    t0 = time.perf_counter()
    with torch.inference_mode():
        timings = run_interleaved(fns, args.reps, args.warmup, device, progress=log)
    log(f"timed in {time.perf_counter() - t0:.1f} s")

    n = args.n
    med = {key: timings.median(key) for key in fns}
    gflops = {(kind, v): item_gflops(name, v, tiles[kind, v], seq_len[kind, v]) for kind in KINDS for v in variants}
    rows, results = [], {"tokens": {}, "tiles": {}, "ratios": {}, "items_per_s": {}, "flop_ratio": {}}
    for kind in KINDS:
        for v in variants:
            enc, model, vis, prep = (med[w, kind, v] for w in ("encode", "model", "vision", "prep"))
            llm = max(model - vis, 0.0)
            split = prep + vis + llm
            speedup = f"{timings.ratio(('encode', kind, NATIVE), ('encode', kind, v)):.2f}x" if v != NATIVE else ""
            rows.append([
                kind, v.label, f"{tiles[kind, v]:g}", f"{tokens[kind, v]:g}",
                f"{seq_len[kind, v]:.0f}", f"{gflops[kind, v]:.3g}", f"{n / enc:.2f}", speedup, f"{n / model:.2f}",
                f"{1000 * prep / n:.1f}", f"{1000 * vis / n:.1f}", f"{1000 * llm / n:.1f}",
                f"{prep / split:.0%} / {vis / split:.0%} / {llm / split:.0%}",
                f"{timings.spread(('encode', kind, v)):.0%}",
            ])
            results["tokens"][kind, v.key] = tokens[kind, v]
            results["tiles"][kind, v.key] = tiles[kind, v]
            results["items_per_s"][kind, v.key] = n / enc
    title = "VTC (s=2) vs native (s=1)" + (" and VTC + in-tower" if len(variants) > 2 else "")
    print_table(
        f"Encode throughput, {name}: {title}, same weights: {'yes' if identical else 'NO'}; "
        f"median of {args.reps} interleaved reps, {n} candidates/kind, batch {args.batch_size}",
        ["kind", "s", "tiles/item", "visual tok/item", "seq len/item", "model GFLOP/item", "encode items/s",
         "encode speed-up", "model-only items/s", "prep ms/item", "vision ms/item", "LLM ms/item",
         "time split prep/vision/LLM", "encode spread"],
        rows,
        caption="encode = Embedder.encode end to end; model-only = VTCBackbone.embed on pre-built batches; vision = "
                "vision tower + compression + projector; LLM = model-only minus vision (difference of medians); "
                "GFLOP = forward, from the config (benchmarks.common.item_gflops); speed-up = median over reps of "
                "the paired native/variant time ratio; spread = (max-min)/median over reps.",
    )
    for kind in KINDS:
        for what, label, goal in (("encode", "encode items/s", GOALS[kind]), ("model", "model-only items/s", None)):
            results["ratios"][kind, what] = timings.ratio((what, kind, NATIVE), (what, kind, VTC))
            print(ratio_line(f"{kind} {label}", timings, (what, kind, NATIVE), (what, kind, VTC), goal, device))
    for kind in KINDS:
        for v in variants:
            if v == NATIVE:
                continue
            achieved = timings.ratio(("encode", kind, NATIVE), ("encode", kind, v))
            flop_ratio = results["flop_ratio"][kind, v.key] = gflops[kind, NATIVE] / gflops[kind, v]
            if v.in_tower is not None:
                results["ratios"][kind, "encode", v.key] = achieved
                goal = IN_TOWER_GOAL if kind == "natural" else None
                print(ratio_line(f"{kind} encode items/s, in-tower k={v.in_tower}", timings,
                                 ("encode", kind, NATIVE), ("encode", kind, v), goal, device))
            cpu = None if device.type == "cuda" else timings.ratio(("encode", kind, NATIVE), ("encode", kind, v),
                                                                   cpu=True)
            print(flop_ratio_line(f"{kind} encode, {v.label}", achieved, flop_ratio, achieved_cpu=cpu))
    if args.preset == "mini":
        print_shape_table([name, REFERENCE_PRESET])
        if len(variants) > 2:
            text = {kind: seq_len[kind, NATIVE] - tokens[kind, NATIVE] for kind in KINDS}
            print_in_tower_projection(REFERENCE_PRESET, text, {kind: tiles[kind, NATIVE] for kind in KINDS})
    return results


def print_in_tower_projection(preset: str, text_tokens: dict[str, float], tiles: dict[str, float]) -> None:
    """Analytic encode FLOP ratio over native at the real preset's depth, for VTC and in-tower at several k.

    The benchmarked shape has its own (smaller) depth; a block ``k`` there corresponds to the same fraction of the
    real tower. Text tokens and tiles per item are this run's.
    """
    from benchmarks.common import _config

    layers = _config(preset).vision_config.num_hidden_layers
    blocks = sorted({0, layers // 4, layers // 2, 3 * layers // 4, layers})
    rows = []
    for v in (VTC, *(Variant(2, k) for k in blocks)):
        cells = []
        for kind in KINDS:
            per_tile = {u: tokens_per_tile(_config(preset), u.factor) for u in (NATIVE, v)}
            flops = {u: item_gflops(preset, u, tiles[kind], tiles[kind] * per_tile[u] + text_tokens[kind])
                     for u in (NATIVE, v)}
            cells.append(f"{flops[NATIVE] / flops[v]:.2f}x")
        rows.append([v.label, *cells])
    print_table(f"Encode FLOP ratio over native at {preset} (analytic, {layers} vision layers; this run's text "
                "tokens and tiles per item)", ["variant", *(f"{k} ({tiles[k]:g} tiles)" for k in KINDS)], rows,
                caption="k = the vision block after which the tower pools (0 = patch embeddings). Compare a "
                        "benchmarked k with the same fraction of this depth.")


if __name__ == "__main__":
    main()
