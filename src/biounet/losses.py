"""The paper's energy: pixel-wise softmax cross-entropy weighted by a per-pixel map (eq. 1)."""

from __future__ import annotations

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
