"""``mmembed-index``: build a saved index from a corpus, and search it.

Examples::

    mmembed-index build --model out/stage3/model --corpus data/visdoc/arxivqa --out idx/arxivqa
    mmembed-index build --model tiny --corpus 'data/synth/train/*.tar' --out idx/synth --kind hnsw
    mmembed-index build --model M --corpus C --out idx/small --truncate-dim 256 --precision binary   # 32 B/vector
    torchrun --nproc-per-node 4 -m mmembed.index.cli build ...     # ranks share the chunks; rank 0 writes
    mmembed-index search --index idx/arxivqa --text "revenue growth in 2021" -k 10
    mmembed-index search --index idx/synth --image query.png --instruction "Find a similar everyday image."

An interrupted build resumes from its finished chunks when run again with the same arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmembed-index", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="encode a corpus and save the index")
    b.add_argument("--model", required=True, help="preset name (e.g. tiny) or local model folder")
    b.add_argument("--corpus", required=True, help="shards (.tar / folder / glob), a BEIR folder or a .parquet")
    b.add_argument("--out", required=True, help="index folder to write")
    b.add_argument("--image-root", default=None, help="folder image paths in a parquet corpus are relative to")
    b.add_argument("--kind", choices=("flat", "ivf", "hnsw"), default="flat",
                   help="flat = exact inner product; ivf / hnsw = approximate (faiss)")
    b.add_argument("--nlist", type=int, default=None, help="IVF clusters (default 4*sqrt(N))")
    b.add_argument("--nprobe", type=int, default=16, help="IVF clusters searched per query")
    b.add_argument("--hnsw-m", type=int, default=32, help="HNSW links per node")
    b.add_argument("--ef-search", type=int, default=128, help="HNSW search beam width")
    b.add_argument("--truncate-dim", type=int, default=None,
                   help="keep the first D coordinates, re-normalised (Matryoshka); search cuts queries alike")
    b.add_argument("--precision", choices=("float32", "int8", "binary"), default="float32",
                   help="int8 = 1 byte / dimension, binary = 1 bit / dimension (flat, faiss)")
    b.add_argument("--rescore", type=int, default=4,
                   help="int8 / binary: re-score RESCORE*k candidates with the float vectors (0 = off)")
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--chunk-size", type=int, default=1024, help="items per resumable chunk")
    b.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    b.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    b.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    b.add_argument("--keep-chunks", action="store_true", help="keep OUT/chunks after the index is written")
    s = sub.add_parser("search", help="search a saved index with a text and/or image query")
    s.add_argument("--index", required=True, help="index folder")
    s.add_argument("--text", default=None, help="query text")
    s.add_argument("--image", default=None, help="query image file")
    s.add_argument("--instruction", default=None, help="task instruction for the query (paper Tables 11-12)")
    s.add_argument("--kind", choices=("natural", "document"), default="natural", help="the query image's kind")
    s.add_argument("-k", type=int, default=10, help="hits to show")
    s.add_argument("--model", default=None, help="model to encode the query (default: the one in index.json)")
    s.add_argument("--device", default=None)
    s.add_argument("--json", action="store_true", help="print the hits as JSON lines")
    return parser


def _build(args: argparse.Namespace) -> int:
    import torch

    from mmembed.embedder import Embedder
    from mmembed.index import build_index, load_corpus

    if args.precision != "float32" and args.kind != "flat":
        raise ValueError(f"--precision {args.precision} searches compact codes exhaustively; use --kind flat")
    corpus = load_corpus(args.corpus, image_root=args.image_root)
    if len(corpus) == 0:
        raise SystemExit(f"mmembed-index: {args.corpus} holds no corpus entries (skipped: {corpus.skipped})")
    device = args.device
    if device is None and torch.cuda.is_available() and args.world_size > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', args.rank)) % torch.cuda.device_count()}"
    embedder = Embedder.from_pretrained(args.model, device=device)
    model = str(os.path.abspath(args.model)) if os.path.isdir(args.model) else args.model
    _check_codes(args, embedder.embed_dim)  # before encoding the corpus, not after
    index = build_index(embedder, corpus, args.out, kind=args.kind, model=model, batch_size=args.batch_size,
                        chunk_size=args.chunk_size, rank=args.rank, world_size=args.world_size,
                        keep_chunks=args.keep_chunks, nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m,
                        ef_search=args.ef_search, truncate_dim=args.truncate_dim, precision=args.precision,
                        rescore=args.rescore)
    if index is not None:
        print(f"wrote {index} to {args.out}" + (f" (skipped: {corpus.skipped})" if corpus.skipped else ""))
    return 0


def _check_codes(args: argparse.Namespace, embed_dim: int) -> None:
    from mmembed.matryoshka import check_truncate_dim

    dim = embed_dim if args.truncate_dim is None else check_truncate_dim(args.truncate_dim, embed_dim, "--truncate-dim")
    if args.precision == "binary" and dim % 8:
        raise ValueError(f"--precision binary needs a dimension divisible by 8, got {dim}; set --truncate-dim")
    if args.rescore < 0:
        raise ValueError(f"--rescore must be >= 0, got {args.rescore}")


def _search(args: argparse.Namespace) -> int:
    from mmembed.index import Index

    if args.text is None and args.image is None:
        raise SystemExit("mmembed-index search: give --text and/or --image")
    if args.image is not None and not os.path.isfile(args.image):
        raise SystemExit(f"mmembed-index search: image file not found: {args.image}")
    index = Index.load(args.index)
    model = args.model or index.info.get("model")
    if not model:
        raise SystemExit(f"{args.index}/index.json names no model; pass --model")
    from pathlib import Path

    from mmembed.embedder import Embedder
    from mmembed.index.integrity import check_model
    from mmembed.types import Item

    embedder = Embedder.from_pretrained(model, device=args.device)
    check_model(index, embedder)  # queries from other weights would rank the corpus by noise, silently
    item = Item(text=args.text, image=Path(args.image) if args.image else None, instruction=args.instruction,
                kind=args.kind)
    hits = index.search(embedder.encode(item, role="query"), k=args.k).hits(0)
    if args.json:
        for h in hits:
            print(json.dumps(h, ensure_ascii=False))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"top {args.k} of {len(index)} ({index.kind})")
    for col in ("rank", "score", "id", "text / image"):
        table.add_column(col, justify="right" if col in ("rank", "score") else "left")
    for h in hits:
        what = h.get("text") or h.get("image") or ""
        table.add_row(str(h["rank"]), f"{h['score']:.4f}", h["id"], what[:80])
    Console().print(table)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mmembed.logs import quiet_logs

    quiet_logs(lightning=False)  # faiss' loader lines and bitsandbytes' kernel warning dropped
    try:
        return _build(args) if args.command == "build" else _search(args)
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise SystemExit(f"mmembed-index {args.command}: {err}") from None


if __name__ == "__main__":
    sys.exit(main())
