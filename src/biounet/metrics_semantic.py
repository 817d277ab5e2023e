"""Semantic segmentation metrics: per-class IoU (Jaccard) and Dice, per image and pooled.

Every IoU and Dice in biounet's evaluation comes from one formula, `iou_dice_from_counts`,
applied to per-class counts: the intersection ``|P & T|`` (true positives) and the size
``|P| + |T|`` (``2 TP + FP + FN``) of the predicted and true masks of each class. Counts add
over images, so pooling a dataset is summing its counts before the formula; that is what
`pool_semantic_scores` does with per-image `iou_dice` results, and what a training loop can do
with `dice_from_counts`.

A class absent from both truth and prediction (size 0) has no IoU or Dice (0/0): the array
functions give NaN there, the dict functions ``None``, and the means skip it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["dice_from_counts", "iou_dice", "iou_dice_from_counts", "pool_semantic_scores"]


def _count_array(values: ArrayLike, name: str) -> NDArray:
    """Counts as int64 (exact sums and products) or, if not integers, float64."""
    arr = np.asarray(values)
    if arr.dtype == bool or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise ValueError(f"{name} must hold numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64 if np.issubdtype(arr.dtype, np.integer) else np.float64)
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} must not be negative")
    return arr


def iou_dice_from_counts(
    intersection: ArrayLike, sizes: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per-class IoU and Dice from intersection and size counts.

    ``IoU = I / (S - I)`` and ``Dice = 2 I / S`` with ``I = |P & T|`` and ``S = |P| + |T|``;
    `dice_from_counts` documents the arguments. Integer counts are divided only at the end,
    so the result is the correctly rounded quotient of the exact counts.

    Returns
    -------
    iou, dice : ndarray of float64, shape of the inputs
        NaN where ``sizes == 0``.
    """
    inter = _count_array(intersection, "intersection")
    size = _count_array(sizes, "sizes")
    if inter.shape != size.shape:
        raise ValueError(f"intersection shape {inter.shape} differs from sizes {size.shape}")
    present = size > 0
    iou = np.full(inter.shape, np.nan)
    dice = np.full(inter.shape, np.nan)
    np.divide(inter, size - inter, out=iou, where=present)
    np.divide(2 * inter, size, out=dice, where=present)
    return iou, dice


def dice_from_counts(intersection: ArrayLike, sizes: ArrayLike) -> NDArray[np.float64]:
    """Per-class Dice ``2 |P & T| / (|P| + |T|)`` from counts, e.g. summed over images.

    Parameters
    ----------
    intersection : array_like of int or float, shape (K,)
        Per class, the number of pixels predicted and true in that class (``|P & T|``, true
        positives), summed over as many images as are pooled. Any shape works if ``sizes`` has
        the same one.
    sizes : array_like of int or float, same shape
        Per class, ``|P| + |T|``: predicted plus true pixels of that class, summed likewise
        (``2 TP + FP + FN``).

    Returns
    -------
    ndarray of float64, same shape
        Dice per class in [0, 1]; **NaN for a class with size 0** (absent from truth and
        prediction, 0/0), so ``np.nanmean`` is the mean over the classes present.

    Raises
    ------
    ValueError
        The shapes differ, or a count is negative or not a number.

    Examples
    --------
    >>> dice_from_counts([3, 0, 0], [8, 4, 0])
    array([0.75, 0.  ,  nan])
    """
    return iou_dice_from_counts(intersection, sizes)[1]


def _defined(values: NDArray[np.float64]) -> list[float | None]:
    """A float array as a list, ``None`` for NaN (JSON has no NaN)."""
    return [None if math.isnan(v) else v for v in values.tolist()]


def _mean_defined(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def _scores_from_counts(tp: ArrayLike, fp: ArrayLike, fn: ArrayLike) -> dict[str, Any]:
    """The result dict of `iou_dice` from per-class TP, FP and FN."""
    tp, fp, fn = (np.asarray(x, dtype=np.int64) for x in (tp, fp, fn))
    iou, dice = iou_dice_from_counts(tp, 2 * tp + fp + fn)
    iou_list, dice_list = _defined(iou), _defined(dice)
    return {
        "iou": iou_list,
        "dice": dice_list,
        "mean_iou": _mean_defined(iou_list),
        "mean_dice": _mean_defined(dice_list),
        "tp": tp.tolist(),
        "fp": fp.tolist(),
        "fn": fn.tolist(),
    }


def _class_counts(
    pred_classes: ArrayLike, true_classes: ArrayLike, num_classes: int
) -> tuple[NDArray, NDArray, NDArray]:
    """Per-class TP, FP and FN of a class map against the truth (see `iou_dice`)."""
    pred = np.asarray(pred_classes)
    true = np.asarray(true_classes)
    if pred.shape != true.shape:
        raise ValueError(f"pred_classes shape {pred.shape} differs from {true.shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    for name, arr in (("pred_classes", pred), ("true_classes", true)):
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise ValueError(f"{name} must be an integer array, got dtype {arr.dtype}")
    valid = true >= 0
    p = pred[valid].astype(np.int64)
    t = true[valid].astype(np.int64)
    if p.size and (p.min() < 0 or p.max() >= num_classes or t.max() >= num_classes):
        raise ValueError(f"class values must lie in [0, {num_classes})")
    confusion = np.bincount(t * num_classes + p, minlength=num_classes**2)
    confusion = confusion.reshape(num_classes, num_classes)
    tp = np.diag(confusion)
    return tp, confusion.sum(axis=0) - tp, confusion.sum(axis=1) - tp


def iou_dice(pred_classes: ArrayLike, true_classes: ArrayLike, num_classes: int) -> dict[str, Any]:
    """Per-class IoU (Jaccard) and Dice of a semantic segmentation.

    Parameters
    ----------
    pred_classes : ndarray of int, shape (...)
        Predicted class per pixel in ``[0, num_classes)``.
    true_classes : ndarray of int, same shape
        True class per pixel in ``[0, num_classes)``; negative values mean "ignore" (those
        pixels count for no class, whatever is predicted there).
    num_classes : int
        Number of classes K.

    Returns
    -------
    dict
        ``iou``, ``dice``: lists of K floats, ``None`` for a class absent from both truth and
        prediction (undefined, 0/0). ``mean_iou``, ``mean_dice``: means over the classes that
        are not ``None`` (``None`` if there is none). ``tp``, ``fp``, ``fn``: lists of K ints,
        so that images can be pooled by summing them (`pool_semantic_scores`).
    """
    return _scores_from_counts(*_class_counts(pred_classes, true_classes, num_classes))


def pool_semantic_scores(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Dataset-level IoU and Dice from per-image `iou_dice` results.

    TP, FP and FN are summed over images per class before IoU and Dice are computed, so each
    pixel weighs the same whichever image it is in (unlike a mean of per-image scores).

    Parameters
    ----------
    results : sequence of dict
        Outputs of `iou_dice`, all with the same number of classes.

    Returns
    -------
    dict
        The keys of `iou_dice`, for the summed counts.
    """
    if not results:
        raise ValueError("results must not be empty")
    sums = (np.sum([r[key] for r in results], axis=0) for key in ("tp", "fp", "fn"))
    return _scores_from_counts(*sums)
