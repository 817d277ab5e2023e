"""The paper's energy: pixel-wise softmax cross-entropy weighted by a per-pixel map (eq. 1).

Optionally plus a soft Dice term (not in the paper; MONAI's DiceCELoss adds one).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def weighted_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Mean over pixels of ``w(x) * -log p_{l(x)}(x)``.

    Parameters
    ----------
    logits : Tensor, shape (B, K, h, w), float
    target : Tensor, shape (B, h, w), int64 class indices in [0, K)
    weight : Tensor, shape (B, h, w), float
        Per-pixel weights; 0 excludes a pixel (e.g. outside the image).

    Returns
    -------
    Tensor, scalar float32
        Normalised by the pixel count, not by the weight sum, so the border term of the
        weight map adds emphasis instead of being divided away.
    """
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    return (ce * weight).sum() / target.numel()


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    pool: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``1 - mean over classes of 2 |P ∩ T| / (|P| + |T|)``, with softmax probabilities as P.

    Pooled over the batch, so a tile without some class does not score that class 0 or 1 by
    itself. Pixels of weight 0 are left out; otherwise the weight map plays no part.

    Parameters
    ----------
    logits : Tensor, shape (B, K, h, w), float
    target : Tensor, shape (B, h, w), int64 class indices in [0, K)
    weight : Tensor, shape (B, h, w), float
    pool : callable, optional
        Sums a tensor over the processes of a data-parallel training (each holding a part of
        the global batch). The Dice is then the global batch's, and this process's gradient
        its own part of the global Dice's gradient.

    Returns
    -------
    Tensor, scalar float32 in [0, 1]
    """
    num_classes = logits.shape[1]
    inside = (weight > 0).unsqueeze(1).float()
    prob = torch.softmax(logits.float(), 1) * inside
    onehot = F.one_hot(target, num_classes).permute(0, 3, 1, 2).float() * inside
    dims = (0, 2, 3)
    inter = (prob * onehot).sum(dims)
    sizes = prob.sum(dims) + onehot.sum(dims)
    if pool is not None:
        # The other processes' sums enter as constants: the value is the global one, the
        # gradient flows only through this process's own pixels.
        own = torch.stack([inter, sizes])
        own = own + (pool(own.detach()) - own.detach())
        inter, sizes = own[0], own[1]
    return 1.0 - ((2 * inter + eps) / (sizes + eps)).mean()


def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, dice: float = 0.0
) -> torch.Tensor:
    """`weighted_cross_entropy`, plus ``dice`` times `soft_dice_loss` where ``dice > 0``."""
    loss = weighted_cross_entropy(logits, target, weight)
    if dice > 0:
        loss = loss + dice * soft_dice_loss(logits, target, weight)
    return loss
