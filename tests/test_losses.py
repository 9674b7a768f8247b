"""InfoNCE and reranker losses on inputs small enough to work out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmembed.losses import (
    InfoNCELoss,
    answer_logits,
    ids_to_tensor,
    info_nce,
    listwise_rerank_loss,
    next_token_loss,
    pointwise_rerank_loss,
    pointwise_scores,
    stable_hash,
)

E = math.e

# Two unit queries and their positives; hard negatives at 0.6/0.8 so every dot product is a round number.
Q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
POS = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
NEGS = torch.tensor([[[0.6, 0.8]], [[0.8, 0.6]]])  # (B=2, n=1, D=2)


def test_in_batch_only_by_hand():
    out = info_nce(Q, POS, temperature=1.0)
    # logits = [[1, 0], [0, 1]] -> each query: -log(e / (e + 1)) = log(1 + 1/e)
    assert out.loss.item() == pytest.approx(math.log(1 + 1 / E), abs=1e-6)
    assert out.targets.tolist() == [0, 1]
    assert out.num_negatives == 1
    assert out.accuracy.item() == 1.0


def test_temperature_scales_logits():
    out = info_nce(Q, POS, temperature=0.5)
    # logits = [[2, 0], [0, 2]] -> log(1 + e^-2)
    assert out.loss.item() == pytest.approx(math.log(1 + E**-2), abs=1e-6)
    assert torch.allclose(out.logits, torch.tensor([[2.0, 0.0], [0.0, 2.0]]))


def test_hard_negatives_by_hand():
    out = info_nce(Q, POS, NEGS, temperature=1.0)
    # candidates [pos0, pos1, neg0, neg1]; q0 -> [1, 0, .6, .8], q1 -> [0, 1, .8, .6]
    expected = math.log(E + 1 + E**0.6 + E**0.8) - 1
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.logits.shape == (2, 4)
    assert out.num_negatives == 3
    # targets point at the positives whatever the number of negatives
    assert out.targets.tolist() == info_nce(Q, POS, temperature=1.0).targets.tolist() == [0, 1]


@pytest.mark.parametrize("n", [0, 1, 3])
def test_matches_reference_with_gradients(n):
    g = torch.Generator().manual_seed(n)
    q = F.normalize(torch.randn(5, 8, generator=g), dim=-1).requires_grad_()
    p = F.normalize(torch.randn(5, 8, generator=g), dim=-1).requires_grad_()
    negs = F.normalize(torch.randn(5, n, 8, generator=g), dim=-1).requires_grad_()
    out = info_nce(q, p, negs if n else None, temperature=0.03)
    out.loss.backward()
    got = [t.grad.clone() for t in (q, p)] + ([negs.grad.clone()] if n else [])

    ref_q, ref_p, ref_n = (t.detach().clone().requires_grad_() for t in (q, p, negs))
    cands = torch.cat([ref_p, ref_n.reshape(-1, 8)])
    ref = F.cross_entropy(ref_q @ cands.T / 0.03, torch.arange(5))
    ref.backward()
    assert out.loss.item() == pytest.approx(ref.item(), abs=1e-6)
    for a, b in zip(got, [ref_q.grad, ref_p.grad] + ([ref_n.grad] if n else [])):
        assert torch.allclose(a, b, atol=1e-6)


def test_empty_hard_negative_tensor_equals_none():
    a = info_nce(Q, POS, torch.zeros(2, 0, 2), temperature=1.0)
    b = info_nce(Q, POS, None, temperature=1.0)
    assert a.loss.item() == b.loss.item() and a.num_negatives == b.num_negatives == 1


def test_duplicate_positives_masked_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    pos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    # logits: q0 [1, 0, .8]; q1 [0, 1, .6]; q2 [.6, .8, .96]
    plain = (
        (math.log(E + 1 + E**0.8) - 1) + (math.log(1 + E + E**0.6) - 1) + (math.log(E**0.6 + E**0.8 + E**0.96) - 0.96)
    ) / 3
    # positives 0 and 1 are the same item (id 7): each is removed from the other's denominator
    masked = (
        (math.log(E + E**0.8) - 1) + (math.log(E + E**0.6) - 1) + (math.log(E**0.6 + E**0.8 + E**0.96) - 0.96)
    ) / 3
    assert info_nce(q, pos, temperature=1.0).loss.item() == pytest.approx(plain, abs=1e-6)
    out = info_nce(q, pos, temperature=1.0, mask_duplicates=True, pos_ids=[7, 7, 9])
    assert out.loss.item() == pytest.approx(masked, abs=1e-6)
    assert out.logits[0, 1] == float("-inf") and out.logits[1, 0] == float("-inf")
    # string ids behave like ints
    same = info_nce(q, pos, temperature=1.0, mask_duplicates=True, pos_ids=["cat", "cat", "dog"])
    assert same.loss.item() == pytest.approx(masked, abs=1e-6)


def test_duplicate_negative_masked_only_for_its_query():
    # negative of q0 has id 2 = id of q1's positive: masked for q1 only
    out = info_nce(Q, POS, NEGS, temperature=1.0, mask_duplicates=True, pos_ids=[1, 2], neg_ids=[[2], [5]])
    loss0 = math.log(E + 1 + E**0.6 + E**0.8) - 1
    loss1 = math.log(1 + E + E**0.6) - 1
    assert out.loss.item() == pytest.approx((loss0 + loss1) / 2, abs=1e-6)
    assert torch.isinf(out.logits).tolist() == [[False, False, False, False], [False, False, True, False]]


def test_mask_duplicates_needs_ids():
    with pytest.raises(ValueError, match="pos_ids"):
        info_nce(Q, POS, mask_duplicates=True)


def test_stable_hash_is_process_independent():
    # A fixed value: Python's salted hash() changes between processes (PYTHONHASHSEED); ranks must agree.
    assert stable_hash("synth_cls/000012") == 2035182604114562854
    assert stable_hash(5) == 5
    assert ids_to_tensor([["a", "b"], ["c", "a"]]).shape == (2, 2)
    assert ids_to_tensor(["a", "a"]).unique().numel() == 1


def test_float32_logits_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    p = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = info_nce(q, p)
    assert out.logits.dtype == torch.float32
    assert out.loss.item() == pytest.approx(info_nce(q, p).loss.item(), abs=1e-6)


def test_module_wrapper():
    loss = InfoNCELoss(temperature=1.0, mask_duplicates=True)
    out = loss(Q, POS, NEGS, pos_ids=[1, 2], neg_ids=[[2], [5]])
    ref = info_nce(Q, POS, NEGS, temperature=1.0, mask_duplicates=True, pos_ids=[1, 2], neg_ids=[[2], [5]])
    assert out.loss.item() == ref.loss.item()
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(temperature=0.0)


# ---------------------------------------------------------------- reranker


def test_pointwise_two_way_and_full_vocab_by_hand():
    yes, no = 2, 3
    logits = torch.tensor([[0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    labels = torch.tensor([1, 0])
    # two-way: row0 CE(Yes | no=0, yes=2) = log(1 + e^-2); row1 CE(No | 1, 1) = log 2
    two_way = pointwise_rerank_loss(logits, labels, yes, no)
    assert two_way.item() == pytest.approx((math.log(1 + E**-2) + math.log(2)) / 2, abs=1e-6)
    # full vocabulary: row0 -2 + log(3 + e^2); row1 -1 + log(2 + 2e)
    full = pointwise_rerank_loss(logits, labels, yes, no, full_vocab=True, reduction="none")
    assert full.tolist() == pytest.approx([math.log(3 + E**2) - 2, math.log(2 + 2 * E) - 1], abs=1e-6)
    summed = pointwise_rerank_loss(logits, labels, yes, no, reduction="sum")
    assert summed.item() == pytest.approx(math.log(1 + E**-2) + math.log(2), abs=1e-6)
    assert pointwise_scores(logits, yes, no).tolist() == pytest.approx([E**2 / (1 + E**2), 0.5], abs=1e-6)


def test_listwise_by_hand():
    ids = [5, 6, 7]  # tokens "1", "2", "3"
    logits = torch.zeros(1, 8)
    logits[0, 5], logits[0, 6] = 1.0, 2.0
    target = torch.tensor([1])  # the positive is candidate (2)
    assert listwise_rerank_loss(logits, target, ids).item() == pytest.approx(math.log(E + E**2 + 1) - 2, abs=1e-6)
    # a 2-candidate list: token "3" is not a valid answer
    short = listwise_rerank_loss(logits, target, ids, num_candidates=torch.tensor([2]))
    assert short.item() == pytest.approx(math.log(E + E**2) - 2, abs=1e-6)
    full = listwise_rerank_loss(logits, target, ids, full_vocab=True)
    assert full.item() == pytest.approx(math.log(6 + E + E**2) - 2, abs=1e-6)
    with pytest.raises(ValueError):
        listwise_rerank_loss(logits, torch.tensor([2]), ids, num_candidates=torch.tensor([2]))


def test_answer_logits_left_and_right_padding():
    logits = torch.arange(2 * 3 * 1, dtype=torch.float32).reshape(2, 3, 1)
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])  # left-padded row, right-padded row
    assert answer_logits(logits, mask)[:, 0].tolist() == [2.0, 4.0]
    assert answer_logits(logits)[:, 0].tolist() == [2.0, 5.0]


def test_next_token_loss_by_hand_and_against_transformers():
    # position 0 predicts label[1] = 1 with logits (0, ln 3): p = 3/4; position 1 predicts label[2] = 0 at (0, 0)
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[-100, 1, 0]])
    expected = (math.log(4 / 3) + math.log(2)) / 2
    assert next_token_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)
    assert next_token_loss(logits, labels, num_items=4).item() == pytest.approx(expected * 2 / 4, abs=1e-6)
    assert next_token_loss(logits, torch.full((1, 3), -100)).item() == 0.0

    from transformers.loss.loss_utils import ForCausalLMLoss

    g = torch.Generator().manual_seed(0)
    big = torch.randn(2, 7, 11, generator=g)
    lab = torch.randint(0, 11, (2, 7), generator=g)
    lab[:, :3] = -100
    ref = ForCausalLMLoss(big, lab, vocab_size=11)
    assert next_token_loss(big, lab).item() == pytest.approx(ref.item(), abs=1e-6)
