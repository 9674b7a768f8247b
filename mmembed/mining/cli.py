"""``python -m mmembed.mining.cli``: mine hard negatives into new shards (paper §3.3 Stage 2; Table 8 baseline).

Examples::

    # Stage 2 Global-HNM: 2 negatives from filtered ranks 50-100 of every sub-dataset
    python -m mmembed.mining.cli --model out/stage2-warmup/model --shards data/synth/train --out data/mined/hnm
    # Table 8 rule-based baseline: the top 12 once the ground truth is removed
    python -m mmembed.mining.cli --model out/stage2/model --shards data/synth/train --out data/mined/rule \\
        --strategy rule --k 12
    # several GPUs: one process per rank (torchrun sets RANK / WORLD_SIZE); rank 0 merges and writes
    torchrun --nproc-per-node 4 -m mmembed.mining.cli --model ... --shards ... --out ...

The next stage's data config points at ``OUT/shards``; ``OUT/summary.json`` has the per-dataset statistics.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from mmembed.cli_args import add_model_arguments, embedder_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mmembed.mining.cli", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--shards", required=True, nargs="+", help="input shards: directory, glob or brace pattern")
    parser.add_argument("--out", required=True, help="output folder (shards/, manifest.jsonl, summary.json)")
    parser.add_argument("--strategy", choices=("window", "rule"), default="window")
    parser.add_argument("--window", type=int, nargs=2, default=(50, 100), metavar=("START", "END"),
                        help="0-based half-open rank window of the window strategy")
    parser.add_argument("--n", type=int, default=2, help="negatives per query (window strategy)")
    parser.add_argument("--k", type=int, default=None, help="top-K negatives per query (rule strategy; default n)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per output shard")
    parser.add_argument("--backend", choices=("exact", "faiss"), default="exact")
    parser.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    parser.add_argument("--corpus-index", default=None,
                        help="saved index of these shards' positives (mmembed-index build): reuse its vectors")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mmembed.logs import quiet_logs

    quiet_logs(lightning=False)  # faiss' loader lines and bitsandbytes' kernel warning dropped
    from mmembed.errors import run_cli

    return run_cli(lambda: _mine(args), prog="python -m mmembed.mining.cli", debug=args.debug)


def _mine(args: argparse.Namespace) -> int:
    from mmembed.data.reading import expand_urls

    expand_urls(args.shards)  # before the model loads: names a spec that matches nothing
    # Heavy imports (torch, transformers) only once the arguments are known to be valid.
    import torch

    from mmembed.mining.mine import mine_hard_negatives

    device = args.device
    if device is None and torch.cuda.is_available() and args.world_size > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', args.rank)) % torch.cuda.device_count()}"
    embedder = embedder_from_args(args, device=device)
    summary = mine_hard_negatives(
        embedder, args.shards, args.out, strategy=args.strategy, window=tuple(args.window), n=args.n, k=args.k,
        seed=args.seed, batch_size=args.batch_size, maxcount=args.maxcount, world_size=args.world_size,
        rank=args.rank, backend=args.backend, corpus_index=args.corpus_index)
    if summary is None:  # a rank other than 0: its embeddings are written, rank 0 finishes the job
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"hard-negative mining ({summary.strategy}) - {summary.queries_per_s:.1f} queries/s")
    for col in ("dataset", "queries", "corpus", "ranks (mean)", "clamped", "false neg. picked", "share"):
        table.add_column(col, justify="left" if col == "dataset" else "right")
    for name, s in summary.datasets.items():
        fn = "-" if s.false_negatives_picked is None else f"{s.false_negatives_picked}/{s.false_negatives_planted}"
        share = "-" if s.false_negative_share is None else f"{100 * s.false_negative_share:.1f}%"
        table.add_row(name, str(s.queries), str(s.corpus_size), f"{s.rank_min}-{s.rank_max} ({s.rank_mean:.1f})",
                      str(s.clamped_queries), fn, share)
    console = Console()
    console.print(table)
    console.print(summary.false_negative_line())
    console.print(f"shards: {summary.out_dir}/shards   manifest: {summary.manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
