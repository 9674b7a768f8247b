"""Evaluation shared out over 2 CPU processes (gloo) gives the single-process embeddings and metrics, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from mmembed import Embedder, Item
from mmembed.eval.distributed import ShardedEncoder
from mmembed.eval.mmeb import evaluate_mmeb
from mmembed.eval.visdoc import evaluate_visdoc
from tests.conftest import make_image
from tests.test_eval_runners import mmeb_data, visdoc_data  # noqa: F401  (fixtures)


def _items() -> list[Item]:
    # Mixed lengths and kinds, 7 items: 2 ranks x batch 2 leaves one rank a short last batch.
    return [Item(text="a red circle " * k) for k in (1, 5, 2)] + [
        Item(image=make_image(color=c, seed=i), kind=kind) for i, (c, kind) in
        enumerate([("red", "natural"), ("blue", "document"), ("green", "natural"), ("red", "document")])]


def _evaluate(encoder, mmeb_root: Path, visdoc_folder: Path) -> dict:
    m = evaluate_mmeb(encoder, {"GQA": mmeb_root / "GQA.parquet", "MSCOCO_t2i": mmeb_root / "MSCOCO_t2i.parquet"},
                      batch_size=2)
    v = evaluate_visdoc(encoder, {"ViDoRe_tatdqa": visdoc_folder}, None, k=5, batch_size=2)
    return {"mmeb": {n: s.score for n, s in m.sets.items()}, "visdoc": {n: s.score for n, s in v.sets.items()},
            "emb": encoder.encode(_items(), role="candidate", batch_size=2)}


def _worker(rank: int, world: int, store: str, mmeb_root: Path, visdoc_folder: Path, out: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        enc = ShardedEncoder(Embedder.from_pretrained("tiny", vtc_factor=2, device="cpu"))
        torch.save(_evaluate(enc, mmeb_root, visdoc_folder), out / f"rank{rank}.pt")
        dist.barrier()  # no rank tears the gloo group down under another (see tests/test_ddp_loss.py)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_give_the_single_process_results(mmeb_data, visdoc_data, tmp_path):  # noqa: F811
    (mmeb_root, _), (visdoc_folder, _, _) = mmeb_data, visdoc_data
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), mmeb_root, visdoc_folder, tmp_path), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same kernels reduce in the same order
    try:
        single = _evaluate(Embedder.from_pretrained("tiny", vtc_factor=2, device="cpu"), mmeb_root, visdoc_folder)
    finally:
        torch.set_num_threads(threads)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["mmeb"] == single["mmeb"] and got["visdoc"] == single["visdoc"]
        assert torch.equal(got["emb"], single["emb"])


def test_without_a_process_group_it_is_the_wrapped_encoder(tiny_embedder):
    enc = ShardedEncoder(tiny_embedder)
    items = _items()[:3]
    assert torch.equal(enc.encode(items, batch_size=2), tiny_embedder.encode(items, batch_size=2))
    assert enc.embed_dim == tiny_embedder.embed_dim
