"""Matryoshka: the truncation rule, the multi-dimension InfoNCE, ``Embedder.encode(truncate_dim=...)``, the module."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmembed.losses.infonce import InfoNCELoss, info_nce
from mmembed.matryoshka import truncate_embeddings


def test_truncation_cuts_and_renormalises_tensors_and_arrays():
    x = torch.tensor([[3.0, 4.0, 12.0], [0.0, -2.0, 5.0]])
    got = truncate_embeddings(x, 2)
    assert torch.allclose(got, torch.tensor([[0.6, 0.8], [0.0, -1.0]]))
    assert torch.equal(truncate_embeddings(x, 2, normalize=False), x[:, :2])
    arr = truncate_embeddings(x.numpy(), 2)
    assert isinstance(arr, np.ndarray) and arr.dtype == np.float32 and np.allclose(arr, got.numpy())
    assert truncate_embeddings(x, None) is x
    for bad in (0, 4, True, 2.0):
        with pytest.raises(ValueError, match=r"\[1, 3\]"):
            truncate_embeddings(x, bad)


def _unit(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def test_matryoshka_infonce_is_the_weighted_sum_over_truncated_dimensions():
    torch.manual_seed(0)
    q, pos, negs = _unit(6, 16), _unit(6, 16), _unit(6, 2, 16)
    q.requires_grad_(True)
    plain = InfoNCELoss(temperature=0.05)(q, pos, negs)
    assert plain.matryoshka_losses == {}
    assert torch.equal(plain.loss, info_nce(q, pos, negs, temperature=0.05).loss)  # off = today's loss, exactly

    out = InfoNCELoss(temperature=0.05, matryoshka_dims=[4, 8], matryoshka_weights=[0.5, 2.0])(q, pos, negs)
    by_hand = {d: info_nce(F.normalize(q[:, :d], dim=-1), F.normalize(pos[:, :d], dim=-1),
                           F.normalize(negs[..., :d], dim=-1), temperature=0.05).loss for d in (4, 8)}
    assert torch.allclose(out.loss, plain.loss + 0.5 * by_hand[4] + 2.0 * by_hand[8], atol=1e-12)
    assert set(out.matryoshka_losses) == {4, 8}
    assert torch.allclose(out.matryoshka_losses[4], by_hand[4], atol=1e-12)
    assert torch.equal(out.logits, plain.logits)  # accuracy / logits are the full dimension's
    # The truncated terms reach the leading coordinates only: the tail's gradient is the plain loss's.
    (g_plain,) = torch.autograd.grad(plain.loss, q)
    (g_mrl,) = torch.autograd.grad(out.loss, q)
    assert torch.allclose(g_mrl[:, 8:], g_plain[:, 8:], atol=1e-12)
    assert not torch.allclose(g_mrl[:, :8], g_plain[:, :8])


def test_matryoshka_settings_are_checked():
    with pytest.raises(ValueError, match="one non-negative weight per dim"):
        InfoNCELoss(matryoshka_dims=[4, 8], matryoshka_weights=[1.0])
    with pytest.raises(ValueError, match="distinct positive integers"):
        InfoNCELoss(matryoshka_dims=[8, 8])
    with pytest.raises(ValueError, match="list only smaller dimensions"):
        InfoNCELoss(matryoshka_dims=[16])(_unit(2, 16), _unit(2, 16))


def test_embedder_truncate_dim(tiny_embedder, images):
    inputs = ["a red circle", images[0], {"text": "a caption", "image": images[1]}]
    full = tiny_embedder.encode(inputs, role="candidate")
    cut = tiny_embedder.encode(inputs, role="candidate", truncate_dim=16)
    assert cut.shape == (3, 16) and torch.allclose(cut.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert torch.allclose(cut, F.normalize(full[:, :16], dim=-1), atol=1e-6)
    raw = tiny_embedder.encode(inputs, role="candidate", normalize_embeddings=False)
    raw_cut = tiny_embedder.encode(inputs, role="candidate", normalize_embeddings=False, truncate_dim=16)
    assert torch.allclose(raw_cut, raw[:, :16], atol=1e-6)
    single = tiny_embedder.encode("a red circle", truncate_dim=8, convert_to_numpy=True)
    assert single.shape == (8,)
    with pytest.raises(ValueError, match=r"truncate_dim=65 is outside \[1, 64\]"):
        tiny_embedder.encode("x", truncate_dim=65)


def _fit(module, batch, steps: int):
    import lightning as L
    from torch.utils.data import DataLoader

    start = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, DataLoader([batch] * steps, batch_size=None))
    return {n: p.detach() - start[n] for n, p in module.named_parameters() if p.requires_grad}


def _module(dtype=None, **kw):
    from mmembed.backbone import build_backbone
    from mmembed.modules import ContrastiveModule

    bb = build_backbone("tiny", vtc_factor=2, seed=0, finetune={"mode": "lora", "lora_r": 4, "lora_dropout": 0.0},
                        dtype=dtype)
    return ContrastiveModule(bb, loss=InfoNCELoss(temperature=0.05, matryoshka_dims=[16, 32]), **kw)


def test_contrastive_module_trains_and_logs_each_dimension():
    from .scripts.ddp_contrastive import make_batch

    module = _module(optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    _fit(module, make_batch([0, 1]), 1)
    metrics = module.trainer.callback_metrics
    assert {"train/loss_dim16", "train/loss_dim32"} <= set(metrics)
    assert metrics["train/loss"] > metrics["train/loss_dim16"] > 0  # the total holds every dimension's term


def test_matryoshka_loss_under_gradcache_gives_the_plain_step():
    from .scripts.ddp_contrastive import make_batch

    batch = make_batch([0, 1, 2, 3])
    sgd = lambda p: torch.optim.SGD(p, lr=1.0)  # noqa: E731
    plain = _fit(_module(torch.float64, optimizer=sgd, gradient_clip_val=None), batch, 1)
    cached = _fit(_module(torch.float64, optimizer=sgd, gradcache_chunk_size=2, gradient_clip_val=None), batch, 1)
    assert max((plain[k] - cached[k]).abs().max().item() for k in plain) < 1e-6
    assert max(v.abs().max().item() for v in plain.values()) > 1e-4
