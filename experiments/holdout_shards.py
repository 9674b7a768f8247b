"""Split WebDataset shards by query into a training and a held-out part (e.g. for the reranker's ``val_shards``).

Every ``--every``-th sample of each shard (the 4th, 8th, ... by default, i.e. a quarter) goes to ``<out>/val/<shard>``
and the rest to ``<out>/train/<shard>``, with every file of a sample kept together; shard names and per-dataset
prefixes are preserved, so both parts keep every dataset. Used to measure held-out reranker accuracy on the
judge-curated (or mined) stage-3 shards::

    python experiments/holdout_shards.py '/tmp/r23/stages/judge-<hash>/shards/*.tar' /tmp/split/judge
    python experiments/run.py +exp=reranker data.train_shards='/tmp/split/judge/train/*.tar' \\
        data.val_shards='/tmp/split/judge/val/*.tar' +trainer.val_check_interval=80 ...
"""

from __future__ import annotations

import argparse
import glob
import tarfile
from pathlib import Path


def sample_key(member_name: str) -> str:
    """The WebDataset key of a tar member (its name up to the first dot)."""
    return member_name.split(".", 1)[0]


def split_shard(path: Path, out: Path, every: int = 4) -> tuple[int, int]:
    """Write ``out/train/<name>`` and ``out/val/<name>``; returns ``(train samples, held-out samples)``."""
    with tarfile.open(path) as tf:
        members = tf.getmembers()
        keys = list(dict.fromkeys(sample_key(m.name) for m in members))
        held = set(keys[every - 1 :: every])
        parts = {}
        for split in ("train", "val"):
            (out / split).mkdir(parents=True, exist_ok=True)
            parts[split] = tarfile.open(out / split / path.name, "w")
        try:
            for m in members:
                parts["val" if sample_key(m.name) in held else "train"].addfile(m, tf.extractfile(m))
        finally:
            for t in parts.values():
                t.close()
    return len(keys) - len(held), len(held)


def main(argv: list[str] | None = None) -> None:
    """Command line: ``holdout_shards.py PATTERN OUT [--every N]``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pattern", help="shard glob, e.g. '<judge stage>/shards/*.tar'")
    ap.add_argument("out", type=Path, help="output folder (gets train/ and val/)")
    ap.add_argument("--every", type=int, default=4, help="hold out every N-th sample of each shard (default 4)")
    args = ap.parse_args(argv)
    paths = sorted(glob.glob(args.pattern))
    if not paths or args.every < 2:
        raise SystemExit(f"no shard matches {args.pattern!r}" if not paths else "--every must be >= 2")
    for p in paths:
        n_train, n_val = split_shard(Path(p), args.out, args.every)
        print(f"{Path(p).name}: {n_train} train, {n_val} held out")


if __name__ == "__main__":
    main()
