import math

import pytest
import torch

from biounet.errors import BiounetError
from biounet.loop import TrainConfig
from biounet.losses import segmentation_loss, soft_dice_loss, weighted_cross_entropy


def two_pixels():
    """A 1 x 2 image: pixel A of class 0 with p = (1/2, 1/2), pixel B of class 1 with
    p = (1/4, 3/4)."""
    logits = torch.tensor([[[[0.0, 0.0]], [[0.0, math.log(3.0)]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    return logits, target


def test_weighted_cross_entropy_by_hand():
    logits, target = two_pixels()
    weight = torch.tensor([[[3.0, 1.0]]])
    # (3 * -log 1/2 + 1 * -log 3/4) over 2 pixels
    expected = (3 * math.log(2) + math.log(4 / 3)) / 2
    assert weighted_cross_entropy(logits, target, weight).item() == pytest.approx(expected)


def test_soft_dice_by_hand():
    logits, target = two_pixels()
    weight = torch.ones(1, 1, 2)
    # class 0: 2 * 1/2 / ((1/2 + 1/4) + 1); class 1: 2 * 3/4 / ((1/2 + 3/4) + 1)
    expected = 1 - (1 / 1.75 + 1.5 / 2.25) / 2
    assert soft_dice_loss(logits, target, weight).item() == pytest.approx(expected, abs=1e-5)


def test_soft_dice_leaves_out_weight_zero_pixels():
    logits, target = two_pixels()
    padded_logits = torch.cat([logits, torch.tensor([[[[5.0]], [[-7.0]]]])], dim=3)
    padded_target = torch.cat([target, torch.tensor([[[1]]])], dim=2)
    weight = torch.tensor([[[1.0, 1.0, 0.0]]])
    assert soft_dice_loss(padded_logits, padded_target, weight).item() == pytest.approx(
        soft_dice_loss(logits, target, torch.ones(1, 1, 2)).item()
    )


def test_soft_dice_perfect_and_opposite():
    target = torch.tensor([[[0, 1], [1, 1]]])
    onehot = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float()
    weight = torch.ones(1, 2, 2)
    assert soft_dice_loss(40 * onehot, target, weight).item() == pytest.approx(0.0, abs=1e-5)
    assert soft_dice_loss(-40 * onehot, target, weight).item() == pytest.approx(1.0, abs=1e-5)


def test_segmentation_loss_adds_the_dice_term():
    logits, target = two_pixels()
    weight = torch.tensor([[[3.0, 1.0]]])
    ce = weighted_cross_entropy(logits, target, weight).item()
    dice = soft_dice_loss(logits, target, weight).item()
    assert segmentation_loss(logits, target, weight).item() == ce
    assert segmentation_loss(logits, target, weight, 2.0).item() == pytest.approx(ce + 2 * dice)


def test_negative_dice_weight_is_refused():
    with pytest.raises(BiounetError, match="dice weight must be >= 0"):
        TrainConfig(dice=-1.0)
