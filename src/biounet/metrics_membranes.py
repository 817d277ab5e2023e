"""ISBI 2012 membrane metrics: pixel error and the foreground-restricted Rand and V_info scores.

Convention: a membrane map is a 2-D array where ``True`` (or 1) marks membrane (cell boundary)
and ``False`` (or 0) marks cell interior. A prediction is either such a boolean map or a float
*membrane probability* in ``[0, 1]``; it is binarised as ``membrane = prob >= threshold``.
ISBI label images store the opposite (0 = membrane, 255 = cell): pass ``labels == 0``.

* `pixel_error`: fraction of wrong pixels at one threshold, and the ISBI "pixel error"
  ``1 - max F-score`` over a threshold sweep, with **cell interior as the positive class** as in
  the challenge's Fiji evaluation code (ground truth ``> 0`` there is the white cell interior).
* `rand_scores`: foreground-restricted Rand score V_rand and information-theoretic score
  V_info with their split and merge parts (Arganda-Carreras et al. 2015, Front. Neuroanat.
  9:142), each maximised over a threshold sweep. Segments are the **4-connected** components of
  the cell interior (as in the challenge code); ground-truth membrane pixels are left out, and
  predicted-membrane pixels inside the true cell interior count as single-pixel segments.
  `rand_info_scores` gives the same scores for two label images.

The warping error, the third ISBI score, is in `biounet.metrics_warping`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage
from skimage.metrics import contingency_table, variation_of_information

from biounet.metrics_common import (
    _harmonic,
    _label_image,
    _pred_membrane,
    _ratio,
    _true_membrane,
)

__all__ = ["ISBI_THRESHOLDS", "pixel_error", "rand_info_scores", "rand_scores"]

#: Membrane-probability thresholds swept by the ISBI 2012 evaluation (0.0 to 1.0 by 0.1).
ISBI_THRESHOLDS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))

# Cells are 4-connected, as in the ISBI challenge code; membrane is then 8-connected.
_CELL_STRUCTURE = ndimage.generate_binary_structure(2, 1)


def _sweep(thresholds: Sequence[float] | None, is_bool: bool) -> tuple[float, ...]:
    if thresholds is None:
        # A boolean map gives the same binarisation at every threshold in (0, 1].
        return (0.5,) if is_bool else ISBI_THRESHOLDS
    out = tuple(float(t) for t in thresholds)
    if not out:
        raise ValueError("thresholds must not be empty")
    return out


def _better(score: float, t: float, best_score: float, best_t: float) -> bool:
    """Higher score wins; ties go to the threshold nearest 0.5 so results are reproducible."""
    return score > best_score or (score == best_score and abs(t - 0.5) < abs(best_t - 0.5))


# --------------------------------------------------------------------------------------------
# pixel error


def pixel_error(
    pred_membrane: ArrayLike,
    true_membrane: ArrayLike,
    *,
    threshold: float = 0.5,
    thresholds: Sequence[float] | None = None,
) -> dict[str, float]:
    """Pixel error of a membrane prediction, plain and in the ISBI F-score form.

    Parameters
    ----------
    pred_membrane : ndarray of bool, shape (H, W), or of float in [0, 1]
        Predicted membrane map or membrane probability (True / 1 = membrane).
    true_membrane : ndarray of bool or 0/1, shape (H, W)
        Ground truth, True = membrane.
    threshold : float
        Threshold of ``pixel_error``: membrane where ``pred >= threshold``.
    thresholds : sequence of float, optional
        Sweep for the F-score. Default: `ISBI_THRESHOLDS` for probabilities, ``(0.5,)`` for a
        boolean prediction.

    Returns
    -------
    dict
        ``pixel_error`` (float): fraction of pixels whose binarised prediction differs from the
        truth. ``pixel_fscore`` (float): best F-score over the sweep, with **cell interior
        (non-membrane) as the positive class** as in the ISBI 2012 evaluation code.
        ``pixel_fscore_error`` (float): ``1 - pixel_fscore``, the challenge's "pixel error".
        ``fscore_threshold`` (float): threshold of the best F-score.
    """
    true = _true_membrane(true_membrane)
    prob, is_bool = _pred_membrane(pred_membrane, true.shape)
    wrong = np.count_nonzero((prob >= threshold) != true) / true.size

    true_cell = ~true
    n_true_cell = int(np.count_nonzero(true_cell))
    best_f, best_t = -1.0, 0.0
    for t in _sweep(thresholds, is_bool):
        pred_cell = prob < t
        tp = int(np.count_nonzero(pred_cell & true_cell))
        fp = int(np.count_nonzero(pred_cell)) - tp
        fn = n_true_cell - tp
        f = _ratio(2 * tp, 2 * tp + fp + fn)
        if _better(f, t, best_f, best_t):
            best_f, best_t = f, t
    return {
        "pixel_error": float(wrong),
        "pixel_fscore": best_f,
        "pixel_fscore_error": 1.0 - best_f,
        "fscore_threshold": best_t,
    }


# --------------------------------------------------------------------------------------------
# foreground-restricted Rand and information scores


def _entropy(counts: NDArray, n: int) -> float:
    p = counts[counts > 0] / n
    return float(-(p * np.log2(p)).sum())


def _foreground_segments(pred: NDArray, true: NDArray) -> tuple[NDArray, NDArray]:
    """Consecutive true and predicted segment ids of the true-foreground pixels.

    Predicted label 0 (boundary) inside the true foreground belongs to no cell, so each such
    pixel gets a segment of its own. Consecutive ids keep the sparse table small whatever the
    label values are.
    """
    fg = true != 0
    n = int(np.count_nonzero(fg))
    if n == 0:
        raise ValueError("true_labels has no foreground (non-zero) pixel")
    _, t = np.unique(true[fg], return_inverse=True)
    s_raw = pred[fg]
    boundary = s_raw == 0
    _, s_in = np.unique(s_raw[~boundary], return_inverse=True)
    s = np.empty(n, dtype=np.int64)
    s[~boundary] = s_in
    first_singleton = int(s_in.max()) + 1 if s_in.size else 0
    s[boundary] = first_singleton + np.arange(np.count_nonzero(boundary))
    return t, s


def _info_split_merge(
    t: NDArray, s: NDArray, table: Any, t_sizes: NDArray, s_sizes: NDArray
) -> tuple[float, float]:
    """V_info split and merge parts, I(S;T)/H(S) and I(S;T)/H(T); ``table`` is the sparse
    contingency table of ``t`` and ``s``, ``t_sizes`` and ``s_sizes`` its marginals."""
    n = t.size
    # skimage returns [H(S|T), H(T|S)].
    _, h_t_given_s = variation_of_information(t, s, table=table / n)
    h_t = _entropy(t_sizes, n)
    h_s = _entropy(s_sizes, n)
    mutual = min(max(h_t - float(h_t_given_s), 0.0), h_t, h_s)  # clip rounding error
    return _ratio(mutual, h_s), _ratio(mutual, h_t)


def rand_info_scores(pred_labels: ArrayLike, true_labels: ArrayLike) -> dict[str, float]:
    """Foreground-restricted V_rand and V_info between two segmentations.

    Pixels with true label 0 (boundary) are left out. Pixels with predicted label 0 inside the
    true foreground are each their own segment (a boundary pixel belongs to no cell), as in the
    ISBI 2012 / SNEMI3D code. With ``p_ij`` the joint distribution of predicted segment ``i``
    and true segment ``j`` over the ``n`` kept pixels, ``s_i`` and ``t_j`` its marginals::

        V_rand_split = sum p_ij^2 / sum t_j^2      V_rand_merge = sum p_ij^2 / sum s_i^2
        V_info_split = I(S;T) / H(S)               V_info_merge = I(S;T) / H(T)

    and V_rand, V_info are the harmonic means of the split and merge parts. A ratio 0/0 (a
    single segment in S or T) is 1.

    Parameters
    ----------
    pred_labels : ndarray of int, shape (H, W)
        Predicted segmentation, 0 = boundary.
    true_labels : ndarray of int, shape (H, W)
        True segmentation, 0 = boundary (ignored); must contain some non-zero pixel.

    Returns
    -------
    dict of float
        ``v_rand``, ``v_rand_split``, ``v_rand_merge``, ``v_info``, ``v_info_split``,
        ``v_info_merge``, all in [0, 1], higher is better.
    """
    true = _label_image(true_labels, "true_labels")
    pred = _label_image(pred_labels, "pred_labels")
    if pred.shape != true.shape:
        raise ValueError(f"pred_labels shape {pred.shape} differs from {true.shape}")
    t, s = _foreground_segments(pred, true)

    table = contingency_table(t, s, sparse_type="array")
    table.sum_duplicates()
    t_sizes = np.asarray(table.sum(axis=1)).ravel()
    s_sizes = np.asarray(table.sum(axis=0)).ravel()

    # Rand: the 1/n^2 normalisation cancels in the ratios.
    sum_p2 = float(table.data @ table.data)
    rand_split = sum_p2 / float(t_sizes @ t_sizes)
    rand_merge = sum_p2 / float(s_sizes @ s_sizes)
    info_split, info_merge = _info_split_merge(t, s, table, t_sizes, s_sizes)
    return {
        "v_rand": _harmonic(rand_split, rand_merge),
        "v_rand_split": rand_split,
        "v_rand_merge": rand_merge,
        "v_info": _harmonic(info_split, info_merge),
        "v_info_split": info_split,
        "v_info_merge": info_merge,
    }


def rand_scores(
    pred_membrane: ArrayLike,
    true_membrane: ArrayLike,
    *,
    thresholds: Sequence[float] | None = None,
) -> dict[str, float]:
    """ISBI 2012 foreground-restricted Rand and information scores of a membrane prediction.

    Ground-truth segments are the 4-connected components of ``~true_membrane``; predicted
    segments are the 4-connected components of ``pred < threshold`` (cell interior). The scores
    are those of `rand_info_scores`; V_rand and V_info are each maximised over the threshold
    sweep separately, as in the challenge.

    Parameters
    ----------
    pred_membrane : ndarray of bool, shape (H, W), or of float in [0, 1]
        Predicted membrane map or membrane probability (True / 1 = membrane).
    true_membrane : ndarray of bool or 0/1, shape (H, W)
        Ground truth, True = membrane; must contain some non-membrane pixel.
    thresholds : sequence of float, optional
        Membrane-probability thresholds. Default: `ISBI_THRESHOLDS` for probabilities,
        ``(0.5,)`` for a boolean prediction.

    Returns
    -------
    dict of float
        ``v_rand``, ``v_rand_split``, ``v_rand_merge``, ``rand_error`` (``1 - v_rand``) and
        ``rand_threshold`` at the threshold maximising V_rand; ``v_info``, ``v_info_split``,
        ``v_info_merge``, ``info_error`` (``1 - v_info``) and ``info_threshold`` at the
        threshold maximising V_info.
    """
    true = _true_membrane(true_membrane)
    prob, is_bool = _pred_membrane(pred_membrane, true.shape)
    true_seg, _ = ndimage.label(~true, structure=_CELL_STRUCTURE)

    best_rand: dict[str, float] = {}
    best_info: dict[str, float] = {}
    for t in _sweep(thresholds, is_bool):
        pred_seg, _ = ndimage.label(prob < t, structure=_CELL_STRUCTURE)
        sc = rand_info_scores(pred_seg, true_seg)
        if not best_rand or _better(sc["v_rand"], t, best_rand["v_rand"], best_rand["t"]):
            best_rand = {**sc, "t": t}
        if not best_info or _better(sc["v_info"], t, best_info["v_info"], best_info["t"]):
            best_info = {**sc, "t": t}
    return {
        "v_rand": best_rand["v_rand"],
        "v_rand_split": best_rand["v_rand_split"],
        "v_rand_merge": best_rand["v_rand_merge"],
        "rand_error": 1.0 - best_rand["v_rand"],
        "rand_threshold": best_rand["t"],
        "v_info": best_info["v_info"],
        "v_info_split": best_info["v_info_split"],
        "v_info_merge": best_info["v_info_merge"],
        "info_error": 1.0 - best_info["v_info"],
        "info_threshold": best_info["t"],
    }
