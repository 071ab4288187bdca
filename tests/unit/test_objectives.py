"""ITM pairs by in-batch swap and the masked-token / masked-patch losses, on hand-built batches."""
import math

import pytest
import torch

from vlmtrain.models.common.objectives import itm_pairs, masked_patch_loss, masked_token_loss


def test_itm_labels_match_the_swaps_and_negatives_never_pair_with_themselves():
    g = torch.Generator().manual_seed(0)
    negatives, total = 0, 0
    for _ in range(200):
        partner, labels = itm_pairs(16, 0.3, g)
        own = partner == torch.arange(16)
        assert torch.equal(labels, own.long())
        negatives += int((~own).sum())
        total += 16
    assert abs(negatives / total - 0.3) < 0.03
    partner, labels = itm_pairs(6, 1.0, g)
    assert (labels == 0).all() and (partner != torch.arange(6)).all()
    partner, labels = itm_pairs(6, 0.0, g)
    assert torch.equal(partner, torch.arange(6)) and (labels == 1).all()
    partner, labels = itm_pairs(1, 1.0, g)  # nothing to swap with
    assert partner.tolist() == [0] and labels.tolist() == [1]


def test_hard_negatives_follow_the_similarity_and_exclude_the_positive():
    similarity = torch.full((4, 4), -30.0)
    hardest = torch.tensor([2, 0, 3, 1])
    similarity[torch.arange(4), hardest] = 10.0
    similarity.fill_diagonal_(50.0)  # the positive is the most similar, and is never drawn
    partner, labels = itm_pairs(4, 1.0, torch.Generator().manual_seed(1), similarity=similarity)
    assert torch.equal(partner, hardest) and (labels == 0).all()
    # A row whose softmax is all on the positive falls back to a uniform other caption.
    lone = torch.full((3, 3), -1e4).fill_diagonal_(0.0)
    partner, _ = itm_pairs(3, 1.0, torch.Generator().manual_seed(2), similarity=lone)
    assert (partner != torch.arange(3)).all()
    with pytest.raises(ValueError, match="similarity"):
        itm_pairs(3, 0.5, similarity=torch.zeros(2, 2))


def test_masked_token_loss_counts_only_labelled_positions():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = math.log(3.0)  # p(2) = 3/6 at position 0
    logits[0, 2] = torch.tensor([5.0, -7.0, 1.0, 0.0])  # unlabelled: must not count
    labels = torch.tensor([[2, 1, -100]])
    expected = (-math.log(0.5) - math.log(1 / 4)) / 2
    assert masked_token_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    empty = torch.zeros(2, 5, requires_grad=True)
    loss = masked_token_loss(empty, torch.full((2,), -100))
    loss.backward()
    assert loss.item() == 0.0 and empty.grad is not None


@pytest.mark.parametrize("kind, expected", [("mse", (4.0 + 1.0) / 2), ("l1", (2.0 + 1.0) / 2)])
def test_masked_patch_loss_averages_over_masked_patches_only(kind, expected):
    target = torch.zeros(1, 3, 2)
    prediction = torch.tensor([[[2.0, 2.0], [100.0, -100.0], [1.0, -1.0]]])
    mask = torch.tensor([[True, False, True]])  # patch 1 is visible: its huge error must not count
    assert masked_patch_loss(prediction, target, mask, kind).item() == pytest.approx(expected)
    none = masked_patch_loss(prediction, target, torch.zeros(1, 3, dtype=torch.bool), kind)
    assert none.item() == 0.0
    with pytest.raises(ValueError, match="kind"):
        masked_patch_loss(prediction, target, mask, "huber")
