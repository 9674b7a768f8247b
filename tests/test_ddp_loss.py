"""Two gloo processes under DDP give the loss and gradients of one process on the concatenated batch.

Each rank encodes its share of a global batch with a seeded ``nn.Linear`` wrapped in ``DistributedDataParallel``,
computes the gathered InfoNCE and backpropagates (directly, or through gradient caching with ``no_sync``); DDP
averages the gradients. Rank 0 saves the averaged loss and gradients, which must equal (1e-6) a single process
computing the plain loss on the whole batch. Everything runs in float64, so float32 rounding of differently
shaped matmuls (chunks vs. whole batch) cannot hide or fake a difference: a real error is orders of magnitude
above the tolerance.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from mmembed.losses import gather_rows, gradcache_step, info_nce

D_IN, D_OUT, TAU = 8, 4, 0.05

# name -> (per-rank batch sizes, hard negatives per query, mask duplicates, gradcache chunk size or None)
SCENARIOS = {
    "in_batch": ((3, 3), 0, False, None),
    "hard_negs": ((3, 3), 2, False, None),
    "uneven_hard_negs": ((2, 4), 2, False, None),
    "masked_string_ids": ((3, 3), 2, True, None),
    "gradcache_hard_negs": ((3, 3), 2, False, 2),
    "gradcache_uneven_masked": ((2, 4), 2, True, 2),
}


def _data(sizes: tuple[int, int], n: int):
    g = torch.Generator().manual_seed(1234 + sum(sizes) + n)
    b = sum(sizes)
    xq = torch.randn(b, D_IN, generator=g, dtype=torch.float64)
    xp = torch.randn(b, D_IN, generator=g, dtype=torch.float64)
    xn = torch.randn(b, n, D_IN, generator=g, dtype=torch.float64)
    # duplicates across ranks: items 0 (rank 0) and 4 (rank 1) share a positive; a negative of item 1 is item 5's
    pos_ids = [f"item{i}" for i in range(b)]
    pos_ids[4] = "item0"
    neg_ids = [[f"neg{i}_{j}" for j in range(n)] for i in range(b)]
    if n:
        neg_ids[1][0] = "item5"
    return xq, xp, xn, pos_ids, neg_ids


def _model() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(D_IN, D_OUT).double()


def _loss_fn(pos_ids, neg_ids, mask: bool):
    def loss_fn(q: torch.Tensor, c: torch.Tensor):
        b = q.shape[0]
        kwargs = {"mask_duplicates": True, "pos_ids": pos_ids, "neg_ids": neg_ids} if mask else {}
        return info_nce(q, c[:b], c[b:].reshape(b, -1, D_OUT), temperature=TAU, **kwargs)

    return loss_fn


def _loss(model: nn.Module, xq, xp, xn, pos_ids, neg_ids, mask: bool):
    b, n = xq.shape[0], xn.shape[1]
    # One forward for all inputs, so DDP sees exactly one forward per backward.
    emb = F.normalize(model(torch.cat([xq, xp, xn.reshape(b * n, D_IN)])), dim=-1)
    return _loss_fn(pos_ids, neg_ids, mask)(emb[:b], emb[b:]).loss


def _gradcache_loss(model: nn.parallel.DistributedDataParallel, xq, xp, xn, pos_ids, neg_ids, mask, chunk):
    towers = [xq, torch.cat([xp, xn.reshape(-1, D_IN)])]
    out = gradcache_step(
        lambda x: F.normalize(model(x), dim=-1),
        towers,
        _loss_fn(pos_ids, neg_ids, mask),
        chunk_size=chunk,
        no_sync=model.no_sync,
    )
    return out.loss


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for name, (sizes, n, mask, chunk) in SCENARIOS.items():
            xq, xp, xn, pos_ids, neg_ids = _data(sizes, n)
            lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
            local = (xq[lo:hi], xp[lo:hi], xn[lo:hi], pos_ids[lo:hi], neg_ids[lo:hi], mask)
            model = nn.parallel.DistributedDataParallel(_model())
            if chunk is None:
                loss = _loss(model, *local)
                loss.backward()
            else:
                loss = _gradcache_loss(model, *local, chunk)
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            mean_loss /= world
            results[name] = {
                "loss": mean_loss.item(),
                "grads": {k: p.grad.clone() for k, p in model.module.named_parameters()},
            }
        # gather_rows: ranks contribute 1 and 2 rows; every rank computes sum(w * gathered), so each row's
        # gradient is world * w (summed over ranks) for the rows it contributed.
        x = torch.full((rank + 1, 2), float(rank), requires_grad=True)  # float32 on purpose: dtype-agnostic
        gathered, sizes = gather_rows(x)
        w = torch.arange(6.0).reshape(3, 2)
        (gathered * w).sum().backward()
        results["gather_rows"] = {"values": gathered.detach(), "sizes": sizes, "grad": x.grad, "rank": rank}
        torch.save(results, Path(out_dir) / f"ddp{rank}.pt")
        # Both ranks finish their collectives before either tears the group down: a rank that leaves first closes
        # its gloo connections under the other's background threads, which then abort ("terminate called without an
        # active exception", SIGABRT) -- seen about once in eight runs on the 2-core machines.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"ddp{r}.pt") for r in range(2)]


@pytest.mark.e2e
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_equal_one_process(ddp_results, name):
    sizes, n, mask, _ = SCENARIOS[name]
    xq, xp, xn, pos_ids, neg_ids = _data(sizes, n)
    model = _model()
    loss = _loss(model, xq, xp, xn, pos_ids, neg_ids, mask)
    loss.backward()
    got = ddp_results[0][name]
    assert got["loss"] == pytest.approx(loss.item(), abs=1e-6)
    for k, p in model.named_parameters():
        assert torch.allclose(got["grads"][k], p.grad, atol=1e-6), (name, k, (got["grads"][k] - p.grad).abs().max())


def test_masking_changes_the_loss():
    # Guards the masked scenario against silently comparing two unmasked computations.
    xq, xp, xn, pos_ids, neg_ids = _data((3, 3), 2)
    model = _model()
    with torch.no_grad():
        assert _loss(model, xq, xp, xn, pos_ids, neg_ids, True) != _loss(model, xq, xp, xn, pos_ids, neg_ids, False)


@pytest.mark.e2e
def test_gather_rows_concatenates_uneven_blocks_and_sums_gradients(ddp_results):
    w = torch.arange(6.0).reshape(3, 2)
    for res in ddp_results:
        assert res["gather_rows"]["sizes"] == [1, 2]
        assert res["gather_rows"]["values"].tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    assert torch.equal(ddp_results[0]["gather_rows"]["grad"], 2 * w[:1])
    assert torch.equal(ddp_results[1]["gather_rows"]["grad"], 2 * w[1:])
