"""Shared helpers for the VTC benchmarks: devices, interleaved timing, synthetic inputs, model shapes, tables.

Timing discipline: the machines these run on are shared (other test suites may run at the same time), so the two
models are never timed in separate phases. Each repetition runs every configuration once, the VTC and native runs
of one configuration back to back, and the order reverses every repetition (A B, B A, A B, ...). Throughputs are
medians over repetitions; a VTC/native ratio is the median of the per-repetition ratios, so load that changes
between repetitions cancels out of it. CPU runs default to one thread (see ``setup_device``), and on CPU every
ratio is also given in process CPU time, which other processes hardly stretch.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from mmembed.backbone.presets import PRESETS, preset_config
from mmembed.backbone.vtc import tokens_per_tile

REPO_ROOT = Path(__file__).resolve().parents[1]

# Shapes for ``--mini-shape``: ``preset`` builds ``mini`` as ``mmembed/backbone/presets.py`` defines it,
# ``2b-proportional`` the ``mini_2b_proportional`` preset defined there (InternVL3-2B's proportions at CPU size).
MINI_SHAPES: dict[str, str] = {"preset": "mini", "2b-proportional": "mini_2b_proportional"}
REFERENCE_PRESET = "internvl3_2b"


# ------------------------------------------------------------------------------------------------------ arguments
def add_common_args(parser: argparse.ArgumentParser, reps: int, warmup: int = 1) -> None:
    """Flags both benchmarks share (preset, shape, repetitions, threads, device, dtype, seed)."""
    parser.add_argument("--preset", default="mini", help="backbone preset (random init, seeded)")
    parser.add_argument("--mini-shape", default="preset", choices=sorted(MINI_SHAPES),
                        help="shape used for --preset mini: 'preset' (presets.py) or an alternative, see common.py")
    parser.add_argument("--reps", type=int, default=reps, help="timed repetitions per configuration (median)")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed repetitions before timing")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads; default 1 on CPU (see setup_device), torch's default on CUDA")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA if available")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="auto: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--seed", type=int, default=0, help="init seed for weights and synthetic inputs")


def check_common_args(args: argparse.Namespace) -> None:
    """Validate settings that depend on each other, with errors that say what to change."""
    if args.reps < 1:
        raise SystemExit(f"--reps must be >= 1 (got {args.reps}); the median needs at least one timed repetition")
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be >= 0 (got {args.warmup})")
    if args.mini_shape != "preset" and args.preset != "mini":
        raise SystemExit(f"--mini-shape {args.mini_shape} only applies to --preset mini (got --preset {args.preset})")


def add_variant_args(parser: argparse.ArgumentParser) -> None:
    """``--in-tower``: the VTC benchmarks' extra configurations beside native and VTC."""
    parser.add_argument("--in-tower", default="",
                        help="comma-separated vision blocks k: also run VTC + in-tower compression after block k "
                             "(0 = patch embeddings, L = last layer; mmembed/backbone/vtc.py) beside native and VTC")


def check_variant_args(args: argparse.Namespace) -> None:
    """Validate ``--in-tower`` against the preset's vision depth; sets ``args.variants`` (VTC, native, in-tower)."""
    layers = _config(resolve_preset(args.preset, args.mini_shape)).vision_config.num_hidden_layers
    try:
        blocks = [int(k) for k in args.in_tower.split(",") if k.strip()]
    except ValueError:
        raise SystemExit(f"--in-tower {args.in_tower!r}: give comma-separated block indices 0..{layers}") from None
    if any(not 0 <= k <= layers for k in blocks) or len(set(blocks)) != len(blocks):
        raise SystemExit(f"--in-tower {args.in_tower!r}: distinct block indices 0..{layers} (this preset's vision "
                         f"tower has {layers} layers)")
    args.variants = [VTC, NATIVE, *(Variant(2, k) for k in blocks)]  # VTC first, as before


# ------------------------------------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """One model configuration of a benchmark run: compression factor and optional in-tower block.

    Attributes:
        factor: VTC factor (1 = native InternVL3, 2 = paper).
        in_tower: vision block after which the tower downsamples (``None``: VTC between tower and connector).
    """

    factor: int
    in_tower: int | None = None

    @property
    def key(self) -> int | str:
        """Results key: the factor for native / VTC (as the benchmarks always keyed them), ``"2@k"`` for in-tower."""
        return self.factor if self.in_tower is None else f"{self.factor}@{self.in_tower}"

    @property
    def label(self) -> str:
        if self.in_tower is not None:
            return f"{self.factor} + in-tower k={self.in_tower}"
        return f"{self.factor} ({'VTC' if self.factor > 1 else 'native'})"

    @classmethod
    def parse(cls, key: str) -> Variant:
        """The variant of a ``key`` string (``"1"``, ``"2"``, ``"2@1"``)."""
        factor, _, k = str(key).partition("@")
        return cls(int(factor), int(k) if k else None)


NATIVE, VTC = Variant(1), Variant(2)


# -------------------------------------------------------------------------------------------------------- devices
def setup_device(device: str, dtype: str, threads: int | None) -> tuple[torch.device, torch.dtype]:
    """Resolve ``auto`` device and dtype and set the thread count.

    CPU runs default to one thread. On a machine shared with other jobs, a multi-threaded CPU kernel waits at every
    barrier for whichever of its threads was descheduled, so wall time then measures scheduler stalls (about the
    same number per call for either model) rather than work, and the VTC/native ratio collapses towards 1. One
    thread measures the work. On a dedicated machine pass ``--threads`` with the core count.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device; use --device cpu or auto")
    dev = torch.device(device)
    if threads is None and dev.type == "cpu":
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    return dev, getattr(torch, dtype)


def device_description(device: torch.device) -> str:
    """Human-readable device name: GPU model, or CPU model with thread count."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"cuda: {props.name} ({props.total_memory / 2**30:.1f} GiB)"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings cover the work itself and not only its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------------- timing
@dataclass
class Timings:
    """Wall-clock and process CPU seconds per repetition for each configuration, measured interleaved."""

    seconds: dict[str, list[float]]
    cpu_seconds: dict[str, list[float]]

    def median(self, key) -> float:
        return statistics.median(self.seconds[key])

    def spread(self, key) -> float:
        """(max - min) / median of the wall times: how much the repetitions disagree (background load, caches)."""
        xs = self.seconds[key]
        return (max(xs) - min(xs)) / statistics.median(xs)

    def ratio(self, slow, fast, cpu: bool = False) -> float:
        """Median over repetitions of ``time(slow) / time(fast)``, each pair taken in the same repetition.

        Pairing keeps the two runs that are compared close in time, so a load change between repetitions cancels
        instead of landing on one side only.
        """
        data = self.cpu_seconds if cpu else self.seconds
        return statistics.median(a / b for a, b in zip(data[slow], data[fast]))


def run_interleaved(fns: Mapping[str, Callable[[], object]], reps: int, warmup: int, device: torch.device,
                    progress: Callable[[str], None] | None = None) -> Timings:
    """Time every function once per repetition, reversing the order each repetition; returns all timings.

    Put the configurations that will be compared next to each other in ``fns``: they then run back to back.

    Args:
        fns: configuration name -> zero-argument callable doing one unit of work.
        reps: timed repetitions.
        warmup: untimed repetitions first (allocator, thread pools, lazily built kernels).
        device: synchronised around each call.
        progress: called with a short status line after each repetition.
    """
    names = list(fns)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(warmup + reps):
        # Reversing every repetition cancels first-vs-second position effects (cache state, load changes).
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[name]()
            synchronize(device)
            if rep >= warmup:
                seconds[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
        if progress is not None:
            what = "warm-up" if rep < warmup else "rep"
            idx = rep + 1 if rep < warmup else rep - warmup + 1
            progress(f"{what} {idx}/{warmup if rep < warmup else reps} done")
    return Timings(seconds, cpu)


def ratio_line(label: str, timings: Timings, slow, fast, goal: float | None, device: torch.device) -> str:
    """One greppable line: ``RATIO <label>: VTC/native = 1.93x (goal >= 1.2x: met) ...``.

    The ratio is the paired per-repetition median of wall times (see ``Timings.ratio``). On CPU the same ratio of
    process CPU time is appended: other processes on the machine stretch wall time but hardly the CPU time this
    process itself spends, so it is a cross-check that is less sensitive to background load.
    """
    ratio = timings.ratio(slow, fast)
    verdict = "" if goal is None else f" (goal >= {goal:g}x: {'met' if ratio >= goal else 'NOT met'})"
    extra = "" if device.type == "cuda" else f" [CPU-time ratio {timings.ratio(slow, fast, cpu=True):.2f}x]"
    return f"RATIO {label}: VTC/native = {ratio:.2f}x{verdict}{extra}"


# --------------------------------------------------------------------------------------------------------- output
def console() -> Console:
    """A console that does not wrap tables at 80 columns when output is piped to a file or captured in a test."""
    return Console(width=None if sys.stdout.isatty() else 200, soft_wrap=False, highlight=False)


def print_table(title: str, header: list[str], rows: list[list[str]], caption: str | None = None) -> None:
    table = Table(title=title, caption=caption, caption_justify="left")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console().print(table)


def log(msg: str) -> None:
    """Progress on stderr, so stdout holds only the results."""
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------- shapes
def resolve_preset(preset: str, mini_shape: str) -> str:
    """Preset name for ``build_backbone``: the preset itself, or the ``mini`` shape chosen by ``--mini-shape``."""
    return MINI_SHAPES[mini_shape] if preset == "mini" else preset


@contextmanager
def benchmark_session(args: argparse.Namespace) -> Iterator[tuple[str, torch.device, torch.dtype]]:
    """Device, dtype and preset name for one run, set up from the common flags and undone afterwards.

    ``main()`` is also called from tests in a shared interpreter, so the thread count is restored on the way out.

    Yields:
        ``(preset name to build, device, dtype)``.
    """
    threads = torch.get_num_threads()
    try:
        device, dtype = setup_device(args.device, args.dtype, args.threads)
        yield resolve_preset(args.preset, args.mini_shape), device, dtype
    finally:
        torch.set_num_threads(threads)


def _config(preset: str):
    # Vocabulary and image-token id do not change any count below; the offline tokenizer is not needed for them.
    return preset_config(preset, vocab_size=PRESETS[preset].tokenizer_vocab, image_token_id=0)


def _first(x) -> int:
    return int(x[0] if isinstance(x, list | tuple) else x)


def analytic_gflops(preset: str) -> dict[str, float]:
    """Forward multiply-add FLOPs (x2) of one 448px-style tile, from the config alone.

    Returns:
        ``vision_tile``: vision tower (patch embedding, attention and MLP over all patches + CLS) for one tile;
        ``llm_token``: LLM projections and MLP per token (attention scores excluded, they depend on length);
        ``llm_attn_token_per_pos``: attention scores + weighted sum per token per position of context;
        ``native_tokens``: visual tokens per tile without compression.
    """
    cfg = _config(preset)
    v, t = cfg.vision_config, cfg.text_config
    c, inter, layers = v.hidden_size, v.intermediate_size, v.num_hidden_layers
    patch, side = _first(v.patch_size), _first(v.image_size)
    n = (side // patch) ** 2 + 1
    vision = 2 * (4 * c * c + 2 * c * inter) * n * layers + 4 * n * n * c * layers + 2 * 3 * patch * patch * c * (n - 1)
    d, heads, kv = t.hidden_size, t.num_attention_heads, t.num_key_value_heads
    hd = getattr(t, "head_dim", None) or d // heads
    per_layer = d * heads * hd * 2 + 2 * d * kv * hd + 3 * d * t.intermediate_size
    return {
        "vision_tile": vision / 1e9,
        "llm_token": 2 * per_layer * t.num_hidden_layers / 1e9,
        "llm_attn_token_per_pos": 4 * heads * hd * t.num_hidden_layers / 1e9,
        "native_tokens": tokens_per_tile(cfg, 1),
    }


def vision_tile_gflops(preset: str, factor: int = 1, in_tower: int | None = None) -> float:
    """Forward GFLOPs of the vision tower on one tile, with in-tower compression after block ``in_tower``.

    Layers after block ``k`` run on ``1 + N / factor**2`` tokens (CLS + pooled patches) instead of ``1 + N``; the
    pooling itself (an average) is negligible and left out, like norms and softmax.
    """
    cfg = _config(preset)
    v = cfg.vision_config
    c, inter, layers = v.hidden_size, v.intermediate_size, v.num_hidden_layers
    patch, side = _first(v.patch_size), _first(v.image_size)
    patches = (side // patch) ** 2
    total = 2 * 3 * patch * patch * c * patches
    for layer in range(1, layers + 1):
        n = patches + 1 if in_tower is None or layer <= in_tower else patches // factor**2 + 1
        total += 2 * (4 * c * c + 2 * c * inter) * n + 4 * n * n * c
    return total / 1e9


def item_gflops(preset: str, variant: Variant, tiles: float, seq_len: float) -> float:
    """Forward GFLOPs of one item: vision tower per tile (``vision_tile_gflops``), projector per visual token, LLM
    per token (projections + MLP) and causal attention over ``seq_len`` (multiply-adds x 2)."""
    f = analytic_gflops(preset)
    cfg = _config(preset)
    c, d = cfg.vision_config.hidden_size, cfg.text_config.hidden_size
    # The projector runs on pixel-shuffled tokens (4C wide): LayerNorm, Linear(4C -> D), GELU, Linear(D -> D).
    projector = 2 * tokens_per_tile(cfg, variant.factor) * (4 * c * d + d * d) / 1e9
    attention = f["llm_attn_token_per_pos"] * seq_len * (seq_len + 1) / 2
    vision = vision_tile_gflops(preset, variant.factor, variant.in_tower)
    return tiles * (vision + projector) + seq_len * f["llm_token"] + attention


def flop_ratio_line(label: str, achieved: float, flop_ratio: float, goal: float | None = 0.85,
                    achieved_cpu: float | None = None) -> str:
    """``FLOPS <label>: achieved 2.10x of a 2.25x FLOP ratio = 93% (goal >= 85%: met) [CPU time: 2.04x = 91%]``.

    ``achieved`` is the wall-clock speed-up (paired median, ``Timings.ratio``); on CPU pass the CPU-time one too, the
    figure other processes on a shared machine hardly move.
    """
    frac = achieved / flop_ratio
    verdict = "" if goal is None else f" (goal >= {goal:.0%}: {'met' if frac >= goal else 'NOT met'})"
    cpu = "" if achieved_cpu is None else f" [CPU time: {achieved_cpu:.2f}x = {achieved_cpu / flop_ratio:.0%}]"
    return f"FLOPS {label}: achieved {achieved:.2f}x of a {flop_ratio:.2f}x FLOP ratio = {frac:.0%}{verdict}{cpu}"


def print_shape_table(presets: list[str]) -> None:
    """Analytic proportions that decide how much VTC can save, for the benchmarked shape and InternVL3-2B."""
    rows = []
    for p in presets:
        f = analytic_gflops(p)
        llm_native_tile = f["llm_token"] * f["native_tokens"]
        rows.append([p, f"{f['vision_tile']:.3g}", f"{llm_native_tile:.3g}",
                     f"{f['vision_tile'] / (f['vision_tile'] + llm_native_tile):.0%}",
                     f"{f['llm_attn_token_per_pos'] / f['llm_token'] * 1000:.3g}"])
    print_table(
        "Shape proportions (analytic forward GFLOPs per tile, from the configs)",
        ["preset", "vision GFLOP/tile", "LLM GFLOP/native tile", "vision share of a native tile",
         "LLM attn/linear per 1k ctx"],
        rows,
        caption="VTC shrinks only the LLM part (and its attention, quadratically); the vision tower runs on every "
                "tile regardless. A larger vision share means a smaller VTC speed-up.",
    )


# ---------------------------------------------------------------------------------------------- synthetic inputs
def tile_side(preset: str) -> int:
    """Tile edge in pixels for a preset (448 for the InternVL shapes, smaller for ``tiny``)."""
    return _first(_config(preset).vision_config.image_size)


def natural_images(rng: random.Random, n: int, side: int) -> list:
    """``n`` rendered scenes of ``side`` x ``side`` pixels (one tile each), with their scene descriptions.

    Returns:
        list of ``(image, scene)`` pairs; ``scene`` is a ``mmembed.data.synth.scenes.Scene``.
    """
    from mmembed.data.synth import scenes

    out = []
    for _ in range(n):
        scene = scenes.random_scene(rng)
        out.append((scenes.render(scene, side=side), scene))
    return out


def document_pages(rng: random.Random, n: int, side: int) -> list:
    """``n`` report pages resized to ``side`` x ``side`` pixels, each with one question it answers.

    Pages are drawn at the generator's own page size (its layout needs room) and then resized, as the paper resized
    VisDoc pages to 896 x 896 for its latency comparison (Table 6).

    Returns:
        list of ``(image, question_text)`` pairs.
    """
    from mmembed.data.synth import documents

    taken: set[str] = set()
    out = []
    for i in range(n):
        company = documents.make_company(rng, taken)
        page_type = documents.PAGE_TYPES[i % len(documents.PAGE_TYPES)]
        qs = [q for q in documents.questions(company) if q.page_type == page_type]
        page = documents.render_page(company, page_type).resize((side, side), Image.Resampling.BICUBIC)
        out.append((page, rng.choice(qs).text))
    return out


def count_image_tokens(input_ids: torch.Tensor, image_token_id: int) -> list[int]:
    """Visual (``<IMG_CONTEXT>``) tokens per row of a built batch: what the LLM actually receives."""
    return (input_ids == image_token_id).sum(dim=1).tolist()


# ------------------------------------------------------------------------------------------------- training step
TEMPERATURE = 0.03  # paper Table 14
LEARNING_RATE = 2e-4  # paper Table 14, maximum learning rate of stages 2 and 3
LORA = {"mode": "lora", "lora_r": 16}  # paper §5 / Table 10: LoRA rank 16 on the LLM


class TrainStep:
    """One training step of the library's ``ContrastiveModule``, as Lightning's automatic optimisation runs it.

    ``module.training_step(batch)`` (embed queries and candidates, InfoNCE over in-batch + hard negatives), then
    backward, the optimiser from ``module.configure_optimizers()`` (AdamW), and ``zero_grad``. Why not a
    ``lightning.Trainer``: the benchmarks time single steps of several models interleaved; a Trainer owns its loop
    and cannot hand back control between steps. ``self.log`` inside ``training_step`` is a no-op without a Trainer.

    Args:
        preset: backbone preset (random init, seeded).
        vtc_factor: compression factor.
        device, dtype: where to run; a dtype other than float32 runs under autocast with fp32 master weights
            (Lightning's ``bf16-mixed``: AdamW on bf16 weights would lose updates).
        seed: weights and LoRA init (the same seed gives identical models for every factor).
        finetune: ``FinetuneConfig`` fields (default: LoRA r=16 on the LLM, the stage-2 recipe).
        gradient_checkpointing: recompute activations in backward (memory for time).
        in_tower_layer: in-tower compression after this vision block (``None``: off).
    """

    def __init__(self, preset: str, vtc_factor: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0, finetune: dict | None = None,
                 gradient_checkpointing: bool = False, in_tower_layer: int | None = None) -> None:
        from functools import partial

        from mmembed.backbone import build_backbone
        from mmembed.losses.infonce import InfoNCELoss
        from mmembed.modules.contrastive import ContrastiveModule

        ft = dict(finetune or LORA)
        if gradient_checkpointing:
            ft["gradient_checkpointing"] = True
        # peft draws the LoRA A matrices from the global RNG: seeding it makes every factor's adapters identical
        # too (in a forked RNG state, so the caller's random stream is left as it was).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            backbone = build_backbone(preset, vtc_factor, finetune=ft, seed=seed, in_tower_layer=in_tower_layer)
        self.device = torch.device(device)
        self.module = ContrastiveModule(backbone, loss=InfoNCELoss(temperature=TEMPERATURE, gather=False),
                                        optimizer=partial(torch.optim.AdamW, lr=LEARNING_RATE))
        self.module.to(self.device).train()
        self.optimizer = self.module.configure_optimizers()
        self.dtype = dtype

    @property
    def backbone(self):
        return self.module.backbone

    def __call__(self, batch: dict) -> float:
        """One step on a ``ContrastiveDataModule``-style batch (``query``, ``candidate``, ``num_negatives``)."""
        import warnings

        autocast = self.dtype != torch.float32
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer attached: logging is skipped
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=autocast):
                loss = self.module.training_step(batch, 0)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


# ---------------------------------------------------------------------------------------------------------- memory
def total_memory_bytes(device: torch.device) -> int:
    """Memory the device has: GPU memory on CUDA, physical RAM on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot tell the machine's memory; pass --mem-budget-gib")


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.0f} MiB"
