"""Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup").

The contrastive loss couples every item of the batch, so the whole batch's activations normally have to live in
memory at once. Gradient caching splits the work in three passes:

1. embed every chunk under ``torch.no_grad()`` (only the (N, D) embeddings are kept);
2. compute the loss on leaf copies of the embeddings and backpropagate to them: the "cached" gradients
   dL/d emb, which are exact because the loss only sees embeddings;
3. re-embed each chunk with a graph and backpropagate ``sum(emb * cached_grad)``, whose gradient w.r.t. the
   parameters is the chunk's share of dL/d theta by the chain rule; accumulated over chunks this is the full
   gradient.

Step 3 must reproduce the embeddings of step 1 exactly, so the random state captured before each chunk of step 1
(CPU, and the current CUDA device once CUDA is initialised) is restored for its replay inside
``torch.random.fork_rng``: dropout draws the same masks, and the caller's random stream after the step is the one
step 1 left behind (the replay does not consume it). Other accelerators' generators are not captured.

Use in a LightningModule (the module decides whether to cache; nothing here is on by default)::

    def training_step(self, batch, batch_idx):          # automatic_optimization = False
        opt = self.optimizers()
        b, n = batch["query"]["input_ids"].shape[0], batch["num_negatives"]   # ContrastiveDataModule's layout
        out = gradcache_step(
            lambda chunk: self.backbone.embed(**chunk),
            [batch["query"], batch["candidate"]],         # candidate: b positives, then b * n negatives
            lambda q, c: self.loss(q, c[:b], c[b:].view(b, n, -1) if n else None).loss,
            chunk_size=self.hparams.gradcache_chunk_size,
            backward_fn=self.manual_backward,             # precision plugins scale the surrogate
            no_sync=getattr(self.trainer.strategy, "block_backward_sync", None),
        )
        opt.step(); opt.zero_grad()
        self.log("train/loss", out.loss)

DDP. ``no_sync`` wraps the forward *and* the backward of every chunk but the last: plain DDP decides at forward
time whether the next backward all-reduces, Lightning's manual optimisation decides in ``manual_backward``; either
way the last chunk's backward all-reduces the accumulated gradient once. (Without ``no_sync`` every chunk
all-reduces; by linearity the result is the same, only slower.) The last chunk must reach every trainable
parameter unless DDP runs with ``find_unused_parameters=True``, and ``loss_fn`` should own no DDP-managed
parameter (its gradient comes from a plain backward that DDP does not synchronise; the paper's temperature is a
fixed 0.03).

Chunking convention for dict batches (:func:`split_batch`): a batch of ``B`` items is a dict whose per-item
values (tensors with ``B`` rows, lists of length ``B``) are split by item; ``pixel_values`` (and
``image_flags``) hold one row per *tile* in item order, and ``num_tiles`` (length ``B``; 0 for an item without
image) says how many rows each item owns. Other values (scalars, config strings) are copied into every chunk.
Sequence padding is left untouched, so each item is encoded exactly as in the full batch. Callers with other
layouts pass pre-built chunks instead (``chunk_size=None``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

EncodeFn = Callable[[Any], Tensor]
TILE_KEYS = ("pixel_values", "image_flags")


@dataclass
class GradCacheOutput:
    """Result of :func:`gradcache_step`.

    Attributes:
        loss: The loss value, detached (gradients are already accumulated in the parameters).
        embeddings: One detached (N_t, D) tensor per tower, from the no-grad pass.
        loss_output: Whatever ``loss_fn`` returned (e.g. an ``InfoNCEOutput`` with accuracy and logits).
    """

    loss: Tensor
    embeddings: list[Tensor]
    loss_output: Any


class _RngState:
    """Random state before one chunk's first pass, replayed for its second pass."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda_device: int | None = None
        self.cuda = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.cuda_device = torch.cuda.current_device()
            self.cuda = torch.cuda.get_rng_state(self.cuda_device)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        devices = [] if self.cuda_device is None else [self.cuda_device]
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.cuda_device)
            yield


def _batch_size(batch: Mapping[str, Any], tile_keys: Sequence[str], num_tiles_key: str) -> int:
    for key in ("input_ids", num_tiles_key):
        if key in batch:
            return len(batch[key])
    for key, value in batch.items():
        if key not in tile_keys and isinstance(value, (Tensor, list, tuple)) and not _is_scalar(value):
            return len(value)
    raise ValueError(f"cannot tell the number of items of a batch with keys {sorted(batch)}; add 'input_ids'")


def _is_scalar(value: Any) -> bool:
    return isinstance(value, Tensor) and value.ndim == 0


def split_batch(
    batch: Tensor | Sequence[Any] | Mapping[str, Any],
    chunk_size: int,
    *,
    num_tiles_key: str = "num_tiles",
    tile_keys: Sequence[str] = TILE_KEYS,
) -> list[Any]:
    """Split a batch of items into chunks of at most ``chunk_size`` items (see the module doc for dicts).

    Args:
        batch: A tensor (split on dim 0), a list/tuple of items, or a dict batch.
        chunk_size: Items per chunk (>= 1).
        num_tiles_key: Key of the per-item tile counts in a dict batch.
        tile_keys: Keys whose rows are tiles rather than items.

    Returns:
        The list of chunks, in order; concatenating their embeddings gives the batch's embeddings.

    Raises:
        ValueError: A tile-indexed value is present without ``num_tiles`` and does not have one row per item,
            or ``num_tiles`` does not add up to its rows.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if isinstance(batch, Tensor):
        return list(batch.split(chunk_size))
    if isinstance(batch, (list, tuple)):
        return [batch[i : i + chunk_size] for i in range(0, len(batch), chunk_size)]
    if not isinstance(batch, Mapping):
        raise TypeError(f"cannot split a {type(batch).__name__}; pass a tensor, a list or a dict")

    b = _batch_size(batch, tile_keys, num_tiles_key)
    tiles = batch.get(num_tiles_key)
    if tiles is not None:
        counts = [int(t) for t in tiles]
        if len(counts) != b:
            raise ValueError(f"{num_tiles_key} has {len(counts)} entries for {b} items")
    else:
        counts = None
    starts = [0]
    for c in counts or []:
        starts.append(starts[-1] + c)

    chunks = []
    for lo in range(0, b, chunk_size):
        hi = min(lo + chunk_size, b)
        chunk = {}
        for key, value in batch.items():
            if key in tile_keys and value is not None:
                if counts is None:
                    if len(value) != b:
                        raise ValueError(
                            f"'{key}' has {len(value)} rows for {b} items: pass '{num_tiles_key}' (tiles per item)"
                        )
                    chunk[key] = value[lo:hi]
                else:
                    if len(value) != starts[-1]:
                        raise ValueError(f"'{key}' has {len(value)} rows but {num_tiles_key} sums to {starts[-1]}")
                    chunk[key] = value[starts[lo] : starts[hi]]
            elif isinstance(value, (Tensor, list, tuple)) and not _is_scalar(value) and len(value) == b:
                chunk[key] = value[lo:hi]
            else:
                chunk[key] = value
        chunks.append(chunk)
    return chunks


def gradcache_step(
    encode_fn: EncodeFn | Sequence[EncodeFn],
    towers: Sequence[Any],
    loss_fn: Callable[..., Any],
    *,
    chunk_size: int | None = None,
    backward_fn: Callable[[Tensor], Any] | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> GradCacheOutput:
    """Compute ``loss_fn(*embeddings)`` and accumulate its parameter gradients chunk by chunk.

    Args:
        encode_fn: ``chunk -> (n, D) embeddings``; one callable for all towers or one per tower.
        towers: One batch per tower (e.g. ``[queries, candidates]``). With ``chunk_size`` each batch is split by
            :func:`split_batch`; with ``chunk_size=None`` each tower must already be a list of chunks.
        loss_fn: Called with one (N_t, D) embedding tensor per tower; returns a scalar tensor or an object with a
            ``.loss`` attribute. Parameters it owns get their gradients from a plain ``backward`` (no
            ``backward_fn``); with fp16 loss scaling keep such parameters out of the loss.
        chunk_size: Items per chunk, or ``None`` when ``towers`` hold chunks already.
        backward_fn: Called on each chunk's scalar surrogate ``sum(emb * cached_grad)``; pass Lightning's
            ``self.manual_backward`` so precision plugins and strategies see it. Default: ``Tensor.backward``.
        no_sync: Context manager factory that suspends gradient all-reduce (DDP ``model.no_sync`` or Lightning's
            ``strategy.block_backward_sync``); wraps every chunk but the last.

    Returns:
        :class:`GradCacheOutput` with the detached loss.
    """
    fns = list(encode_fn) if isinstance(encode_fn, Sequence) else [encode_fn] * len(towers)
    if len(fns) != len(towers):
        raise ValueError(f"got {len(fns)} encode functions for {len(towers)} towers")
    if chunk_size is None:
        chunked = [list(t) for t in towers]
    else:
        chunked = [split_batch(t, chunk_size) for t in towers]
    backward = backward_fn if backward_fn is not None else Tensor.backward

    # Pass 1: embeddings without activations, and the random state each chunk started from.
    states: list[list[_RngState]] = []
    cached: list[list[Tensor]] = []
    with torch.no_grad():
        for fn, chunks in zip(fns, chunked):
            states.append([])
            cached.append([])
            for chunk in chunks:
                states[-1].append(_RngState())
                cached[-1].append(fn(chunk))

    # Pass 2: loss on leaves; their .grad is dL/d emb.
    leaves = [torch.cat(c).detach().requires_grad_() for c in cached]
    with torch.enable_grad():
        loss_output = loss_fn(*leaves)
        loss = loss_output if isinstance(loss_output, Tensor) else loss_output.loss
        loss.backward()
    grads = [
        (leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)).split([len(c) for c in cs])
        for leaf, cs in zip(leaves, cached)
    ]

    # Pass 3: replay each chunk with a graph and push its cached gradient through the encoder.
    jobs = [(t, i) for t, chunks in enumerate(chunked) for i in range(len(chunks))]
    for j, (t, i) in enumerate(jobs):
        last = j == len(jobs) - 1
        sync_ctx = contextlib.nullcontext() if (last or no_sync is None) else no_sync()
        with sync_ctx, torch.enable_grad():
            with states[t][i].replay():
                emb = fns[t](chunked[t][i])
            surrogate = (emb * grads[t][i].to(emb.dtype)).sum()
            backward(surrogate)

    return GradCacheOutput(loss.detach(), [leaf.detach() for leaf in leaves], loss_output)
