"""Input checks and score arithmetic shared by the metrics modules (not public API).

The membrane, instance and semantic metrics all take label arrays from callers, refuse what
they cannot score with a `ValueError` that says why, and form ratios with the same 0/0 rule;
those pieces live here so that each rule is written once. Use the public functions of
`biounet.metrics` instead of these.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray


def _ratio(num: float, den: float) -> float:
    """``num / den`` with ``0 / 0 = 1``: every caller has ``num = 0`` whenever ``den = 0``, and
    then there was nothing to get wrong (e.g. precision with no predictions)."""
    return float(num) / float(den) if den > 0 else 1.0


def _harmonic(a: float, b: float) -> float:
    """F-score of two scores in [0, 1]; 0 if both are 0."""
    return 2.0 * a * b / (a + b) if a + b > 0 else 0.0


def _true_membrane(true_membrane: ArrayLike) -> NDArray[np.bool_]:
    """A true membrane map as a boolean (H, W) array, True = membrane."""
    arr = np.asarray(true_membrane)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"true_membrane must be a non-empty 2-D array, got shape {arr.shape}")
    if arr.dtype != bool:
        # 0/255 ISBI label images have the opposite polarity: refuse rather than guess.
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(
                "true_membrane must be boolean or 0/1 with True = membrane; for ISBI label "
                "images (0 = membrane, 255 = cell) pass `labels == 0`"
            )
        arr = arr.astype(bool)
    return arr


def _pred_membrane(pred_membrane: ArrayLike, shape: tuple[int, ...]) -> tuple[NDArray, bool]:
    """Return the prediction as float64 membrane probability and whether it was boolean."""
    arr = np.asarray(pred_membrane)
    if arr.shape != shape:
        raise ValueError(f"prediction shape {arr.shape} differs from truth shape {shape}")
    if arr.dtype == bool:
        return arr.astype(np.float64), True
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"prediction must be boolean or numeric, got dtype {arr.dtype}")
    prob = arr.astype(np.float64)
    if not np.isfinite(prob).all() or prob.min() < 0.0 or prob.max() > 1.0:
        raise ValueError("prediction must be a membrane probability in [0, 1] (True = membrane)")
    return prob, False


def _label_image(labels: ArrayLike, name: str) -> NDArray:
    """A non-negative integer label image (booleans become 0/1)."""
    arr = np.asarray(labels)
    if arr.ndim < 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty array")
    if arr.dtype == bool:
        arr = arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be an integer label image, got dtype {arr.dtype}")
    if arr.min() < 0:
        raise ValueError(f"{name} must not contain negative labels")
    return arr


def _consecutive(labels: NDArray) -> tuple[NDArray[np.int64], int]:
    """Relabel to 0 (background) and 1..N, keeping 0 as 0; returns (labels, N)."""
    ids, inverse = np.unique(labels.ravel(), return_inverse=True)
    inverse = inverse.astype(np.int64)
    if ids[0] != 0:
        inverse += 1
    return inverse.reshape(labels.shape), int(ids.size - (ids[0] == 0))
