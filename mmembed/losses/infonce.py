"""InfoNCE with in-batch and hard negatives gathered across ranks (paper §3.1, eq. 2).

Every query is scored against the *global* candidate pool: the positives of all queries on all ranks plus all
their hard negatives. Query ``i`` of rank ``r`` has as target the global index of its own positive.

Gradient arithmetic across ranks (why the result is exact under DDP)
--------------------------------------------------------------------
Let rank ``r`` hold ``B_r`` queries, ``B = sum_r B_r`` and ``W`` the world size. Each rank computes

    L_r = (W / B) * sum_{i on r} l_i        (l_i: cross-entropy of query i against the global pool)

so that ``(1/W) * sum_r L_r = (1/B) * sum_i l_i = L`` is the loss of one process on the concatenated batch
(with equal ``B_r`` this is just the local mean).

Candidates are gathered with :class:`_AllGatherWithGrad`, whose backward all-reduces (sums) the gradient of the
gathered tensor over ranks and hands every rank the rows it contributed. So after ``L_r.backward()`` on every
rank, the gradient reaching rank ``r``'s local embeddings is ``sum_{r'} dL_{r'}/d emb_r``: the contributions of
*all* ranks' losses, including other ranks' queries scoring our candidates. Queries are local, and ``l_i``
depends on query ``i`` only, so they need nothing extra. The parameter gradient rank ``r`` computes is
therefore ``g_r = sum_{r'} dL_{r'}/d emb_r * d emb_r/d theta`` and DDP's average gives
``(1/W) sum_r g_r = d/d theta [(1/W) sum_{r'} L_{r'}] = dL/d theta``: exactly one process on the global batch.
``tests/test_ddp_loss.py`` checks this to 1e-6, with equal and unequal per-rank batch sizes.

We write the autograd function ourselves rather than use ``torch.distributed.nn.functional.all_gather`` because
that one is deprecated in recent torch (``FutureWarning``) and requires equal shapes on every rank; ours pads
to the largest rank, so the last, smaller batch of an epoch or ranks with different numbers of hard negatives
still work.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mmembed.matryoshka import truncate_embeddings

IdsLike = Tensor | Sequence[int | str] | Sequence[Sequence[int | str]]


@dataclass
class InfoNCEOutput:
    """Result of :func:`info_nce`.

    Attributes:
        loss: Scalar to backpropagate. Averaging it over ranks (what DDP does to gradients and
            ``self.log(..., sync_dist=True)`` does to logs) gives the global-batch mean.
        logits: (B_local, C_global) similarities divided by the temperature; masked entries are ``-inf``.
        targets: (B_local,) global index of each query's positive in the candidate axis of ``logits``.
        accuracy: Fraction of local queries whose top-scoring candidate is their positive (detached).
        num_negatives: Candidates per query minus one (before duplicate masking).
        matryoshka_losses: With Matryoshka training, the (undetached, unweighted) loss at each truncated
            dimension, keyed by dimension; ``loss`` then includes their weighted sum. Empty otherwise.
    """

    loss: Tensor
    logits: Tensor
    targets: Tensor
    accuracy: Tensor
    num_negatives: int
    matryoshka_losses: dict[int, Tensor] = field(default_factory=dict)


def stable_hash(value: int | str) -> int:
    """Map an id to a signed 64-bit int that is identical in every process.

    Python's ``hash()`` of a ``str`` is salted per process (``PYTHONHASHSEED``), so two ranks would disagree on
    the ids they gather; an unkeyed blake2b digest does not. Ints are kept as they are.
    """
    if isinstance(value, bool):
        raise TypeError("ids must be int or str, got bool")
    if isinstance(value, int):
        return value
    digest = hashlib.blake2b(str(value).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def ids_to_tensor(ids: IdsLike, device: torch.device | str | None = None) -> Tensor:
    """Turn ints / strings (flat or nested, e.g. (B, n) negative ids) into an int64 tensor of the same shape."""
    if isinstance(ids, Tensor):
        if ids.is_floating_point():
            raise TypeError("id tensors must be integer-typed")
        return ids.to(device=device, dtype=torch.long)

    def convert(x):
        if isinstance(x, (list, tuple)):
            return [convert(v) for v in x]
        return stable_hash(x)

    return torch.tensor(convert(list(ids)), dtype=torch.long, device=device)


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    if x.shape[0] == rows:
        return x.contiguous()
    out = x.new_zeros((rows, *x.shape[1:]))
    out[: x.shape[0]] = x
    return out


def _gather_sizes(n: int, device: torch.device, group: dist.ProcessGroup | None) -> list[int]:
    world, _ = _world(group)
    local = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(out, local, group=group)
    return [int(t.item()) for t in out]


def _all_gather_rows_nograd(x: Tensor, sizes: list[int], group: dist.ProcessGroup | None) -> Tensor:
    """Concatenate every rank's ``x`` (row counts ``sizes``) without autograd; pads to the largest rank."""
    padded = _pad_rows(x, max(sizes))
    buf = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(buf, padded, group=group)
    return torch.cat([b[:s] for b, s in zip(buf, sizes)])


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather of variable-length row blocks whose backward sums gradients over ranks (see module doc)."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], rank: int, group: dist.ProcessGroup | None) -> Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _all_gather_rows_nograd(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Every rank's loss may depend on our rows, so the full gradient of our rows is the sum over ranks.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None, None


def gather_rows(
    x: Tensor, *, with_grad: bool = True, group: dist.ProcessGroup | None = None
) -> tuple[Tensor, list[int]]:
    """Concatenate ``x`` from all ranks along dim 0 (row counts may differ between ranks).

    Args:
        x: (n_local, ...) tensor; shapes after dim 0 and dtype must match on all ranks.
        with_grad: Make the result differentiable, gradients summed over ranks in backward.
        group: Process group; ``None`` is the default group.

    Returns:
        The (sum of n_r, ...) tensor in rank order, and the list of per-rank row counts. Without an initialised
        process group (or world size 1) this is ``x`` itself and ``[n_local]``.
    """
    world, rank = _world(group)
    if world == 1:
        return x, [x.shape[0]]
    sizes = _gather_sizes(x.shape[0], x.device, group)
    if with_grad and x.requires_grad:
        return _AllGatherWithGrad.apply(x, sizes, rank, group), sizes
    return _all_gather_rows_nograd(x.detach(), sizes, group), sizes


def info_nce(
    q: Tensor,
    pos: Tensor,
    hard_negs: Tensor | None = None,
    temperature: float | Tensor = 0.03,
    gather: bool = True,
    mask_duplicates: bool = False,
    pos_ids: IdsLike | None = None,
    neg_ids: IdsLike | None = None,
    group: dist.ProcessGroup | None = None,
) -> InfoNCEOutput:
    """InfoNCE of eq. 2 with all positives and hard negatives of the global batch as candidates.

    Candidate order along the logits' second axis: the positives of rank 0, rank 1, ..., then the flattened
    hard negatives of rank 0 (query-major: query 0's n negatives, then query 1's, ...), rank 1, ...
    Similarities are computed in (at least) float32 outside autocast, because with tau = 0.03 bf16 logits (~33 at
    most) would only keep ~0.1 of resolution.

    Args:
        q: (B, D) L2-normalised query embeddings.
        pos: (B, D) embeddings of each query's positive.
        hard_negs: (B, n, D) per-query hard negatives; ``None`` or n = 0 means in-batch negatives only.
        temperature: tau in eq. 2 (paper Table 14: 0.03); a float or a scalar tensor (learnable is fine).
        gather: Gather candidates across ranks when ``torch.distributed`` is initialised with world size > 1.
        mask_duplicates: Remove from each query's denominator every candidate whose id equals the id of the
            query's positive (another row's positive that is the same item, or a negative that duplicates it).
            The query's own positive is never masked.
        pos_ids: (B,) ids of the positives (ints, or strings hashed with :func:`stable_hash`); required when
            ``mask_duplicates``.
        neg_ids: (B, n) ids of the hard negatives. ``None`` means they are unknown and never masked.
        group: Process group for the gather.

    Returns:
        :class:`InfoNCEOutput`.
    """
    if q.ndim != 2 or pos.shape != q.shape:
        raise ValueError(f"q and pos must both be (B, D); got {tuple(q.shape)} and {tuple(pos.shape)}")
    if not isinstance(temperature, Tensor) and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b, d = q.shape
    if hard_negs is None:
        hard_negs = pos.new_zeros((b, 0, d))
    if hard_negs.ndim != 3 or hard_negs.shape[0] != b or hard_negs.shape[2] != d:
        raise ValueError(f"hard_negs must be (B={b}, n, D={d}); got {tuple(hard_negs.shape)}")
    n = hard_negs.shape[1]

    world, rank = _world(group) if gather else (1, 0)
    gather_group = group if world > 1 else None
    # One gather for positives and negatives together: [pos (B_r rows); negs (B_r * n_r rows)] per rank.
    local_cands = torch.cat([pos, hard_negs.reshape(b * n, d)])
    if world > 1:
        counts = torch.tensor([b, b * n], dtype=torch.long, device=q.device)
        count_list = [torch.empty_like(counts) for _ in range(world)]
        dist.all_gather(count_list, counts, group=gather_group)
        pos_sizes = [int(c[0]) for c in count_list]
        neg_sizes = [int(c[1]) for c in count_list]
        sizes = [p + m for p, m in zip(pos_sizes, neg_sizes)]
        if local_cands.requires_grad:
            everything = _AllGatherWithGrad.apply(local_cands, sizes, rank, gather_group)
        else:
            everything = _all_gather_rows_nograd(local_cands, sizes, gather_group)
        cands = _reorder(everything, pos_sizes, neg_sizes)
    else:
        pos_sizes, neg_sizes = [b], [b * n]
        cands = local_cands
    b_global = sum(pos_sizes)
    targets = torch.arange(b, device=q.device) + sum(pos_sizes[:rank])

    dtype = torch.promote_types(torch.promote_types(q.dtype, cands.dtype), torch.float32)  # float64 stays
    with torch.autocast(device_type=q.device.type, enabled=False):
        logits = (q.to(dtype) @ cands.to(dtype).T) / temperature

    if mask_duplicates:
        if pos_ids is None:
            raise ValueError("mask_duplicates=True needs pos_ids (one id per positive)")
        logits = logits.masked_fill(
            _duplicate_mask(pos_ids, neg_ids, b, n, targets, q.device, pos_sizes, neg_sizes, world, gather_group),
            float("-inf"),
        )

    # sum * W / B_global: see the module docstring; equals the local mean when ranks hold equal batches.
    loss = F.cross_entropy(logits, targets, reduction="sum") * (world / b_global)
    with torch.no_grad():
        accuracy = (logits.argmax(dim=-1) == targets).float().mean() if b else logits.new_zeros(())
    return InfoNCEOutput(loss, logits, targets, accuracy, int(cands.shape[0]) - 1)


def _reorder(everything: Tensor, pos_sizes: list[int], neg_sizes: list[int]) -> Tensor:
    """From per-rank [pos; negs] blocks to [all positives; all negatives] (both in rank order)."""
    parts_pos, parts_neg, start = [], [], 0
    for p, m in zip(pos_sizes, neg_sizes):
        parts_pos.append(everything[start : start + p])
        parts_neg.append(everything[start + p : start + p + m])
        start += p + m
    return torch.cat(parts_pos + parts_neg)


def _duplicate_mask(
    pos_ids: IdsLike,
    neg_ids: IdsLike | None,
    b: int,
    n: int,
    targets: Tensor,
    device: torch.device,
    pos_sizes: list[int],
    neg_sizes: list[int],
    world: int,
    group: dist.ProcessGroup | None,
) -> Tensor:
    """(B, C_global) bool mask of candidates that duplicate each query's positive (own positive excluded)."""
    p_ids = ids_to_tensor(pos_ids, device).reshape(-1)
    if p_ids.numel() != b:
        raise ValueError(f"pos_ids must hold one id per query ({b}); got {p_ids.numel()}")
    # Column 1 says whether the id is known, so unknown negative ids never match anything.
    if neg_ids is None or n == 0:
        n_ids = torch.zeros((b * n, 2), dtype=torch.long, device=device)
    else:
        flat = ids_to_tensor(neg_ids, device).reshape(-1)
        if flat.numel() != b * n:
            raise ValueError(f"neg_ids must be (B={b}, n={n}); got {flat.numel()} ids")
        n_ids = torch.stack([flat, torch.ones_like(flat)], dim=1)
    local = torch.cat([torch.stack([p_ids, torch.ones_like(p_ids)], dim=1), n_ids])
    if world > 1:
        sizes = [p + m for p, m in zip(pos_sizes, neg_sizes)]
        everything = _all_gather_rows_nograd(local, sizes, group)
        cand = _reorder(everything, pos_sizes, neg_sizes)
    else:
        cand = local
    mask = (cand[None, :, 0] == p_ids[:, None]) & (cand[None, :, 1] == 1)
    mask[torch.arange(b, device=device), targets] = False
    return mask


class InfoNCELoss(nn.Module):
    """Module wrapper of :func:`info_nce` holding the settings (what a Hydra config points ``_target_`` at).

    Matryoshka training (off by default): with ``matryoshka_dims=[16, 32]`` the loss is the full-dimension InfoNCE
    plus, for each listed ``d``, ``weight_d *`` the same InfoNCE on the first ``d`` coordinates of every embedding,
    re-normalised (:func:`mmembed.matryoshka.truncate_embeddings`) -- Kusupati et al. 2022, "Matryoshka
    Representation Learning". The full dimension always keeps weight 1, so with no dims the loss is exactly the
    plain one. Logits and accuracy are the full dimension's.

    Args:
        temperature: tau (paper Table 14: 0.03).
        gather: Gather candidates across ranks.
        mask_duplicates: Mask candidates whose id equals the query's positive id (needs ``pos_ids`` in forward).
        matryoshka_dims: Truncated dimensions trained besides the full one (each smaller than the embedding).
        matryoshka_weights: One weight per entry of ``matryoshka_dims`` (default 1.0 each).
    """

    def __init__(self, temperature: float = 0.03, gather: bool = True, mask_duplicates: bool = False,
                 matryoshka_dims: Sequence[int] | None = None,
                 matryoshka_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.gather = gather
        self.mask_duplicates = mask_duplicates
        dims = [int(d) for d in (matryoshka_dims or [])]
        if any(d < 1 for d in dims) or len(set(dims)) != len(dims):
            raise ValueError(f"matryoshka_dims must be distinct positive integers, got {list(matryoshka_dims or [])}")
        weights = [1.0] * len(dims) if matryoshka_weights is None else [float(w) for w in matryoshka_weights]
        if len(weights) != len(dims) or any(w < 0 for w in weights):
            raise ValueError(f"matryoshka_weights needs one non-negative weight per dim ({len(dims)}: {dims}), got "
                             f"{list(matryoshka_weights or [])}")
        self.matryoshka_dims, self.matryoshka_weights = dims, weights

    def _one(self, q, pos, hard_negs, pos_ids, neg_ids) -> InfoNCEOutput:
        return info_nce(q, pos, hard_negs, temperature=self.temperature, gather=self.gather,
                        mask_duplicates=self.mask_duplicates, pos_ids=pos_ids, neg_ids=neg_ids)

    def forward(
        self,
        q: Tensor,
        pos: Tensor,
        hard_negs: Tensor | None = None,
        pos_ids: IdsLike | None = None,
        neg_ids: IdsLike | None = None,
    ) -> InfoNCEOutput:
        out = self._one(q, pos, hard_negs, pos_ids, neg_ids)
        full = q.shape[-1]
        for dim, weight in zip(self.matryoshka_dims, self.matryoshka_weights):
            if dim >= full:
                raise ValueError(f"matryoshka dim {dim} >= the embedding dimension {full}: list only smaller "
                                 "dimensions (the full one is always trained)")
            negs = None if hard_negs is None else truncate_embeddings(hard_negs, dim)
            part = self._one(truncate_embeddings(q, dim), truncate_embeddings(pos, dim), negs, pos_ids, neg_ids)
            out.matryoshka_losses[dim] = part.loss
            out.loss = out.loss + weight * part.loss
        return out

    def extra_repr(self) -> str:
        rep = f"temperature={self.temperature}, gather={self.gather}, mask_duplicates={self.mask_duplicates}"
        if self.matryoshka_dims:
            rep += f", matryoshka_dims={self.matryoshka_dims}, matryoshka_weights={self.matryoshka_weights}"
        return rep
