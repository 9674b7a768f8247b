"""``mmembed-eval``: score a model on MMEB-format or VisDoc-format data and print the table.

Examples::

    mmembed-data synth --out data/synth --size ci
    mmembed-eval mmeb   --model tiny --data data/synth --out out/eval/mmeb
    mmembed-eval visdoc --model /models/my-embedder --data data/synth --out out/eval/visdoc --k 5
    mmembed-eval mmeb   --model /models/my-embedder --reranker /models/my-reranker --rerank-top 5 \
                        --data data/synth --out out/eval/mmeb_er
    mmembed-eval judge  --judge /models/stage1 --data data/synth/instruct/judge_heldout.json --out out/eval/judge

``--model`` is a preset name (random weights: a smoke test of the pipeline) or a local folder written by
``Embedder.save_pretrained`` / a stock ``InternVL3-*-hf`` folder. Scores are x100, like the paper's tables.
With ``--reranker`` (a folder written by ``Reranker.save_pretrained``) the benchmark runs twice, embedder alone (E,
files in ``<out>/E``) and with each query's top ``--rerank-top`` candidates re-ordered by the reranker (E+R, files in
``<out>/E+R``), embedding every item once, and a side-by-side table is printed.

``--devices N`` runs the evaluation in N processes (``torch.multiprocessing`` spawn; gloo on CPU, NCCL with one GPU
per process on CUDA): every ``encode`` call is shared out batch by batch (``mmembed.eval.distributed``), every rank
scores the gathered embeddings, rank 0 prints and writes the files -- the same run files and scores as one process.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mmembed.cli_args import add_model_arguments, check_device, embedder_from_args
from mmembed.errors import run_cli
from mmembed.eval.results import BenchmarkResult
from mmembed.eval.suites import VISDOC_GROUP_TITLES


def _names(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmembed-eval", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="benchmark", required=True)
    common = argparse.ArgumentParser(add_help=False)
    add_model_arguments(common)
    common.add_argument("--data", required=True, type=Path, help="data folder (or a synthetic-world root)")
    common.add_argument("--out", required=True, type=Path, help="output folder for run files, metrics.json, plot")
    common.add_argument("--batch-size", type=int, default=16)
    common.add_argument("--devices", type=int, default=1,
                        help="processes to share the embedding over (gloo on CPU, one GPU each on CUDA)")
    common.add_argument("--max-queries", type=int, default=None, help="only the first N queries of every set")
    common.add_argument("--run-depth", type=int, default=100, help="candidates per query in the run files")
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    common.add_argument("--reranker", default=None, help="reranker folder (or preset): also report E+R")
    common.add_argument("--rerank-top", type=int, default=5, help="candidates per query the reranker re-orders")
    common.add_argument("--rerank-mode", choices=("pointwise", "listwise"), default="pointwise",
                        help="pointwise P(Yes) per candidate (paper) or one listwise prompt")
    common.add_argument("--rerank-batch-size", type=int, default=8, help="reranker prompts per forward")
    mmeb = sub.add_parser("mmeb", parents=[common], help="MMEB: Precision@1 over each query's own candidates")
    mmeb.add_argument("--image-root", type=Path, default=None, help="folder the parquet image paths are relative to")
    mmeb.add_argument("--version", choices=("v2", "v1"), default="v2", help="MMEB parquet columns")
    mmeb.add_argument("--subsets", default=None, help="comma-separated subset names (default: all)")
    mmeb.add_argument("--instructions", choices=("paper", "file"), default="paper",
                      help="paper: Tables 11-12 instructions as in training (default); file: the parquet's own")
    xmodal = sub.add_parser("xmodal", parents=[common],
                            help="Table 5: text-image retrieval (Hit@1 both ways) and SugarCrepe (accuracy)")
    xmodal.add_argument("--sets", default=None, help="comma-separated set names from sets.json (default: all)")
    visdoc = sub.add_parser("visdoc", parents=[common], help="VisDoc: NDCG@k over the whole corpus")
    visdoc.add_argument("--k", type=int, default=5, help="NDCG / recall cut-off")
    visdoc.add_argument("--sets", default=None, help="comma-separated set names (default: all)")
    judge = sub.add_parser("judge", help="a judge MLLM on relevance questions with known answers (the synthetic "
                           "world's instruct/judge_heldout.json): accuracy, AUC, recall of planted false negatives")
    judge.add_argument("--judge", required=True, help="judge folder (a kit stage-1 folder or any local "
                       "image-text-to-text checkpoint) or a kit preset (random weights)")
    judge.add_argument("--data", required=True, type=Path, help="records with a 'judge' field (LLaVA JSON)")
    judge.add_argument("--out", required=True, type=Path, help="output folder for metrics.json")
    judge.add_argument("--image-root", type=Path, default=None, help="image folder (default: the file's folder)")
    judge.add_argument("--batch-size", type=int, default=8)
    judge.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    judge.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def result_table(result: BenchmarkResult) -> Table:
    """A rich table: one row per set, then the group, split and overall means."""
    titles = VISDOC_GROUP_TITLES if result.benchmark == "visdoc" else {}
    table = Table(title=f"{result.benchmark.upper()} ({result.mode}) - {result.metric} x100")
    for col, justify in (("set", "left"), ("group", "left"), ("split", "left"), ("queries", "right"),
                         ("candidates", "right"), ("score", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for name, s in result.sets.items():
        table.add_row(name, titles.get(s.group, s.group), (s.split or "-").upper(), str(s.num_queries),
                      str(s.num_candidates), f"{s.score:.1f}")
    table.add_section()
    for group, value in result.groups.items():
        table.add_row(f"[b]{titles.get(group, group)}[/b]", "", "", "", "", f"{value:.1f}")
    # Skip the split rows when they repeat the groups (sets grouped by split only, as the synthetic VisDoc sets).
    splits = result.splits if set(result.splits) != set(result.groups) else {}
    for split, value in splits.items():
        table.add_row(f"[b]{split.upper()}[/b]", "", "", "", "", f"{value:.1f}")
    table.add_row("[b]overall[/b]", "", "", "", "", f"[b]{result.overall:.1f} ± {result.overall_stderr:.1f}[/b]")
    table.caption = (f"± = standard error over the {result.num_queries} queries (binomial for P@1, SD/sqrt(n) "
                     "for NDCG)")
    return table


def side_by_side_table(e: BenchmarkResult, er: BenchmarkResult) -> Table:
    """E and E+R scores per set, group and overall, with the difference."""
    titles = VISDOC_GROUP_TITLES if e.benchmark == "visdoc" else {}
    table = Table(title=f"{e.benchmark.upper()} - {e.metric} x100: embedder (E) vs embedder + reranker (E+R)")
    for col, justify in (("set", "left"), ("E", "right"), ("E+R", "right"), ("delta", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]

    def row(name: str, a: float, b: float, bold: bool = False) -> None:
        cells = [name, f"{a:.1f}", f"{b:.1f}", f"{b - a:+.1f}"]
        table.add_row(*(f"[b]{c}[/b]" for c in cells) if bold else cells)

    for name, s in e.sets.items():
        row(name, s.score, er.sets[name].score)
    table.add_section()
    for group, value in e.groups.items():
        row(titles.get(group, group), value, er.groups[group], bold=True)
    row("overall", e.overall, er.overall, bold=True)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.benchmark == "judge":
        return run_cli(lambda: _evaluate_judge(args), prog="mmembed-eval", debug=args.debug)
    if args.rerank_top < 1:
        build_parser().error(f"--rerank-top must be >= 1, got {args.rerank_top}")
    if args.devices < 1:
        build_parser().error(f"--devices must be >= 1, got {args.devices}")
    if args.devices > 1 and args.reranker is not None:
        build_parser().error("--devices > 1 shares out the embedder only; run E+R (--reranker) with --devices 1")
    return run_cli(lambda: _evaluate(args), prog="mmembed-eval", debug=args.debug)


def _evaluate_judge(args: argparse.Namespace) -> int:
    import json

    if not args.data.is_file():
        raise FileNotFoundError(f"--data {args.data} is not a file; the synthetic world writes "
                                "<world>/instruct/judge_heldout.json (mmembed-data synth --out <world>)")
    from mmembed.judge import Judge
    from mmembed.judge.evaluate import evaluate_judge

    check_device(args.device)

    metrics = evaluate_judge(Judge.from_pretrained(args.judge, device=args.device), args.data, args.image_root,
                             batch_size=args.batch_size)
    metrics = {"judge": str(args.judge), "data": str(args.data), **metrics}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    table = Table(title=f"judge on {metrics['pairs']} questions with known answers")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("accuracy", "majority_accuracy", "yes_rate", "true_yes_rate", "auc", "fn_yes_recall",
                "fn_yes_precision", "false_negative_pairs"):
        value = metrics.get(key)
        table.add_row(key, "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value))
    for rel, acc in metrics["accuracy_by_relation"].items():
        table.add_row(f"accuracy: {rel}", "-" if acc is None else f"{acc:.4g}")
    console = Console()
    console.print(table)
    console.print(f"metrics: {args.out / 'metrics.json'}")
    return 0


def _check_names(args: argparse.Namespace) -> None:
    """Unknown ``--subsets`` / ``--sets`` fail here, before the model is loaded (the runners check again)."""
    if args.benchmark == "mmeb" and args.subsets:
        from mmembed.eval.mmeb import resolve_mmeb_subsets

        have, option, names = resolve_mmeb_subsets(args.data)[0], "--subsets", _names(args.subsets)
    elif args.benchmark == "visdoc" and args.sets:
        from mmembed.eval.visdoc import resolve_visdoc_sets

        have, option, names = resolve_visdoc_sets(args.data)[0], "--sets", _names(args.sets)
    else:
        return
    unknown = [n for n in names or [] if n not in have]
    if unknown:
        raise ValueError(f"{option}: {unknown} not in {args.data} (have {sorted(have)})")


def _evaluate(args: argparse.Namespace) -> int:
    if not args.data.exists():  # before the model loads: a wrong path should not cost the load
        raise FileNotFoundError(f"--data {args.data} does not exist; point at a benchmark folder "
                                "(e.g. the synthetic world from `mmembed-data synth --out data/synth`)")
    _check_names(args)
    if args.devices > 1:
        return _spawn(args)
    return _evaluate_on(args, embedder_from_args(args), args.out)  # heavy imports only now the arguments are valid


def _spawn(args: argparse.Namespace) -> int:
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.spawn(_rank_main, args=(args, f"{tmp}/rendezvous"), nprocs=args.devices, join=True)
        except mp.ProcessExitedException as exn:  # a rank already printed its one-line error
            raise RuntimeError(f"--devices {args.devices}: rank {exn.error_index} failed (exit code "
                               f"{exn.exit_code}); see its message above") from None
    return 0


def _rank_main(rank: int, args: argparse.Namespace, init_file: str) -> None:
    """One process of ``--devices N``: join the group, shard every encode, score; rank 0 prints and writes."""
    import torch.distributed as dist

    from mmembed.errors import USER_ERRORS, one_line
    from mmembed.eval.distributed import ShardedEncoder, init_rank

    try:
        device = init_rank(rank, args.devices, init_file, args.device)
        try:
            encoder = ShardedEncoder(embedder_from_args(args, device=device))
            _evaluate_on(args, encoder, args.out if rank == 0 else None, quiet=rank != 0)
            # Every rank done before any tears the group down: a gloo rank whose peer closed its connections first
            # can abort (SIGABRT, "terminate called without an active exception"). Only on success: after an error
            # the other ranks may never reach the barrier.
            dist.barrier()
        finally:
            dist.destroy_process_group()
    except USER_ERRORS as exn:
        if args.debug:
            raise
        print(f"mmembed-eval: error (rank {rank}): {one_line(exn)} (--debug shows the traceback)", file=sys.stderr)
        sys.exit(2)


def _evaluate_on(args: argparse.Namespace, embedder, out: Path | None, quiet: bool = False) -> int:
    """Run the benchmark with ``embedder``; files under ``out`` (``None``: write nothing), tables unless quiet."""
    console = Console(quiet=quiet)
    extra = {"model": str(args.model), "data": str(args.data)}
    if args.devices > 1:
        extra["devices"] = args.devices
    if args.benchmark == "mmeb":
        from mmembed.eval.mmeb import evaluate_mmeb

        run = evaluate_mmeb
        kwargs = dict(subsets=args.data, image_root=args.image_root, version=args.version,
                      names=_names(args.subsets), instructions=args.instructions)
    elif args.benchmark == "xmodal":
        from mmembed.eval.xmodal import evaluate_xmodal

        if args.reranker is not None:
            raise ValueError("--reranker: Table 5 (xmodal) reports the embedder alone; drop --reranker")
        result = evaluate_xmodal(embedder, args.data, out, batch_size=args.batch_size, names=_names(args.sets),
                                 max_queries=args.max_queries, extra=extra)
        console.print(result_table(result))
        console.print(f"metrics: {result.metrics_file}   plot: {result.plot_file}")
        return 0
    else:
        from mmembed.eval.visdoc import evaluate_visdoc

        run = evaluate_visdoc
        kwargs = dict(sets=args.data, k=args.k, names=_names(args.sets))
    kwargs.update(batch_size=args.batch_size, run_depth=args.run_depth, max_queries=args.max_queries, extra=extra)
    if args.reranker is None:
        result = run(embedder, out_dir=out, **kwargs)
    else:
        from mmembed.eval.results import evaluate_two_stage
        from mmembed.reranker import Reranker

        reranker = Reranker.from_pretrained(args.reranker, mode=args.rerank_mode, batch_size=args.rerank_batch_size,
                                            device=args.device)
        extra.update(reranker=str(args.reranker), rerank_top=args.rerank_top, rerank_mode=args.rerank_mode)
        e, result = evaluate_two_stage(run, embedder, reranker, args.out, rerank_k=args.rerank_top, **kwargs)
        console.print(result_table(e))
        console.print(result_table(result))
        console.print(side_by_side_table(e, result))
        console.print(f"E metrics: {e.metrics_file}   E+R metrics: {result.metrics_file}")
        return 0
    console.print(result_table(result))
    console.print(f"metrics: {result.metrics_file}   plot: {result.plot_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
