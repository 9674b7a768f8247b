"""Gradient caching gives the gradients of direct backpropagation, dropout included."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmembed.losses import gradcache_step, info_nce, split_batch

B, N_NEG, D_IN = 6, 1, 10


def _model(dropout: float = 0.3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 4))


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, D_IN, generator=g), torch.randn(B * (1 + N_NEG), D_IN, generator=g)


def _loss(q: torch.Tensor, c: torch.Tensor):
    return info_nce(q, c[:B], c[B:].reshape(B, N_NEG, -1), temperature=0.05)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("chunk_size", [1, 2, B, B * (1 + N_NEG)])
def test_equals_direct_backprop_with_dropout(chunk_size):
    xq, xc = _inputs()

    # Reference: the same chunks encoded with a graph, in the same order, from the same seed.
    ref_model = _model()
    torch.manual_seed(42)
    q = torch.cat([F.normalize(ref_model(x), dim=-1) for x in xq.split(chunk_size)])
    c = torch.cat([F.normalize(ref_model(x), dim=-1) for x in xc.split(chunk_size)])
    ref_loss = _loss(q, c).loss
    ref_loss.backward()
    after_ref = torch.rand(1)

    model = _model()
    torch.manual_seed(42)
    out = gradcache_step(lambda x: F.normalize(model(x), dim=-1), [xq, xc], _loss, chunk_size=chunk_size)
    after_cached = torch.rand(1)

    assert out.loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    assert not out.loss.requires_grad
    assert out.embeddings[0].shape == (B, 4) and out.embeddings[1].shape == (B * (1 + N_NEG), 4)
    assert out.loss_output.accuracy is not None  # the loss's own output comes back
    for k, grad in _grads(model).items():
        assert torch.allclose(grad, ref_model.get_parameter(k).grad, atol=1e-6), k
    # the replay does not consume the caller's random stream
    assert after_cached.item() == after_ref.item()


def test_full_batch_chunk_equals_plain_forward():
    # With one chunk per tower, the reference is the ordinary (non-cached) training step.
    xq, xc = _inputs()
    ref_model = _model()
    torch.manual_seed(7)
    ref_loss = _loss(F.normalize(ref_model(xq), dim=-1), F.normalize(ref_model(xc), dim=-1)).loss
    ref_loss.backward()
    model = _model()
    torch.manual_seed(7)
    out = gradcache_step(lambda x: F.normalize(model(x), dim=-1), [xq, xc], _loss, chunk_size=len(xc))
    assert out.loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    for k, grad in _grads(model).items():
        assert torch.allclose(grad, ref_model.get_parameter(k).grad, atol=1e-6), k


def test_dropout_is_active_so_the_rng_replay_matters():
    model = _model(dropout=0.5).train()
    x = _inputs()[0]
    assert not torch.allclose(model(x), model(x))


class DictEncoder(nn.Module):
    """Token-bag text features plus per-item sums of tile features (0..n tiles per item)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.tok = nn.Embedding(20, 4)
        self.tile = nn.Linear(3, 4)

    def forward(self, batch: dict) -> torch.Tensor:
        text = (self.tok(batch["input_ids"]) * batch["attention_mask"][..., None]).sum(1)
        owner = torch.repeat_interleave(torch.arange(len(batch["num_tiles"])), torch.as_tensor(batch["num_tiles"]))
        tiles = torch.zeros_like(text).index_add(0, owner, self.tile(batch["pixel_values"]))
        return F.normalize(text + tiles, dim=-1)


def _dict_batch(num_tiles: list[int], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    b = len(num_tiles)
    return {
        "input_ids": torch.randint(0, 20, (b, 5), generator=g),
        "attention_mask": torch.ones(b, 5, dtype=torch.long),
        "pixel_values": torch.randn(sum(num_tiles), 3, generator=g),
        "num_tiles": num_tiles,
        "task": "t2i",
    }


@pytest.mark.parametrize("chunk_size", [1, 2, 4])
def test_dict_batches_with_variable_tiles(chunk_size):
    queries = _dict_batch([1, 0, 3, 2], seed=4)
    cands = _dict_batch([2, 1, 0, 1], seed=5)

    def loss_fn(q, c):
        return info_nce(q, c, temperature=0.1)

    ref = DictEncoder()
    ref_loss = loss_fn(ref(queries), ref(cands)).loss
    ref_loss.backward()
    model = DictEncoder()
    out = gradcache_step(model, [queries, cands], loss_fn, chunk_size=chunk_size)
    assert out.loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    for k, grad in _grads(model).items():
        assert torch.allclose(grad, ref.get_parameter(k).grad, atol=1e-6), k


def test_split_batch_follows_num_tiles():
    batch = _dict_batch([2, 0, 1, 3], seed=0)
    chunks = split_batch(batch, 2)
    assert [c["num_tiles"] for c in chunks] == [[2, 0], [1, 3]]
    assert torch.equal(chunks[0]["pixel_values"], batch["pixel_values"][:2])
    assert torch.equal(chunks[1]["pixel_values"], batch["pixel_values"][2:6])
    assert torch.equal(chunks[1]["input_ids"], batch["input_ids"][2:])
    assert all(c["task"] == "t2i" for c in chunks)  # non-per-item values are copied

    no_tiles = {k: v for k, v in batch.items() if k != "num_tiles"}
    with pytest.raises(ValueError, match="num_tiles"):
        split_batch(no_tiles, 2)  # 6 tile rows for 4 items cannot be assigned
    bad = dict(batch, num_tiles=[2, 0, 1, 1])
    with pytest.raises(ValueError, match="sums to"):
        split_batch(bad, 2)
    assert [len(c) for c in split_batch(torch.zeros(5, 2), 2)] == [2, 2, 1]


def test_prebuilt_chunks_backward_fn_and_no_sync():
    xq, xc = _inputs()
    model = _model(dropout=0.0)
    calls = {"backward": 0, "no_sync": 0}

    def backward(t: torch.Tensor) -> None:
        calls["backward"] += 1
        t.backward()

    @contextlib.contextmanager
    def no_sync():
        calls["no_sync"] += 1
        yield

    towers = [list(xq.split(4)), list(xc.split(5))]  # 2 + 3 chunks, built by the caller
    gradcache_step(
        lambda x: F.normalize(model(x), dim=-1), towers, _loss, chunk_size=None, backward_fn=backward, no_sync=no_sync
    )
    assert calls == {"backward": 5, "no_sync": 4}  # every chunk but the last skips the gradient all-reduce
