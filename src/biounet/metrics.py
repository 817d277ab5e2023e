"""Evaluation metrics: membrane maps (ISBI 2012), semantic masks and instance label images.

All functions are pure functions of arrays and return plain dicts of Python ``int``, ``float``,
``list`` and ``None`` (never NaN), so ``json.dumps(result, allow_nan=False)`` works.

Membranes (ISBI 2012 EM segmentation challenge)
-----------------------------------------------
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
* `warping_error`: Jain et al. (2010), "Boundary learning by optimization with topological
  constraints" (CVPR). Membrane is the 8-connected foreground and cell interior the 4-connected
  background, which matches the 4-connected cells above.

Semantic masks: `iou_dice`. Instances (label images, 0 = background): `instance_scores` (matching
and AP at IoU 0.5:0.95, merges, splits, Cell Tracking Challenge SEG) and
`pool_instance_scores` (dataset-level pooling).

What comes from libraries and what is hand-written
--------------------------------------------------
* scikit-image: the sparse contingency table (``skimage.metrics.contingency_table``) and the
  conditional entropies H(S|T), H(T|S) (``skimage.metrics.variation_of_information``), which
  coincide with the ISBI definitions once predicted-boundary pixels are given singleton labels.
* scipy: connected components (``ndimage.label``) and optimal assignment
  (``optimize.linear_sum_assignment``).
* Hand-written, because no installed library has them with these definitions:
  the V_rand formula (``skimage.metrics.adapted_rand_error`` counts pixel *pairs*, ``n^2 - n``,
  where ISBI uses ``n^2``, and treats test label 0 as one segment); the V_info normalisation by
  H(S) and H(T); the pixel F-score sweep; the warping error (simple-point test and greedy warp);
  instance matching, merges, splits, SEG and pooling (written from their published definitions).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage, optimize
from skimage.metrics import contingency_table, variation_of_information

__all__ = [
    "IOU_THRESHOLDS",
    "ISBI_THRESHOLDS",
    "instance_scores",
    "iou_dice",
    "pixel_error",
    "pool_instance_scores",
    "rand_info_scores",
    "rand_scores",
    "warp_truth",
    "warping_error",
]

#: Membrane-probability thresholds swept by the ISBI 2012 evaluation (0.0 to 1.0 by 0.1).
ISBI_THRESHOLDS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
#: IoU thresholds 0.5, 0.55, ..., 0.95 of the instance metrics (DSB 2018 / stardist).
IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))

# Cells are 4-connected, as in the ISBI challenge code; membrane is then 8-connected.
_CELL_STRUCTURE = ndimage.generate_binary_structure(2, 1)


# --------------------------------------------------------------------------------------------
# helpers


def _ratio(num: float, den: float) -> float:
    """``num / den`` with ``0 / 0 = 1``: every caller has ``num = 0`` whenever ``den = 0``, and
    then there was nothing to get wrong (e.g. precision with no predictions)."""
    return float(num) / float(den) if den > 0 else 1.0


def _harmonic(a: float, b: float) -> float:
    """F-score of two scores in [0, 1]; 0 if both are 0."""
    return 2.0 * a * b / (a + b) if a + b > 0 else 0.0


def _true_membrane(true_membrane: ArrayLike) -> NDArray[np.bool_]:
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


def _label_image(labels: ArrayLike, name: str) -> NDArray:
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


# --------------------------------------------------------------------------------------------
# membranes: pixel error


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
# membranes: foreground-restricted Rand and information scores


def _entropy(counts: NDArray, n: int) -> float:
    p = counts[counts > 0] / n
    return float(-(p * np.log2(p)).sum())


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
    fg = true != 0
    n = int(np.count_nonzero(fg))
    if n == 0:
        raise ValueError("true_labels has no foreground (non-zero) pixel")

    # Consecutive labels keep the sparse table small whatever the label values are.
    _, t = np.unique(true[fg], return_inverse=True)
    s_raw = pred[fg]
    boundary = s_raw == 0
    _, s_in = np.unique(s_raw[~boundary], return_inverse=True)
    s = np.empty(n, dtype=np.int64)
    s[~boundary] = s_in
    first_singleton = int(s_in.max()) + 1 if s_in.size else 0
    s[boundary] = first_singleton + np.arange(np.count_nonzero(boundary))

    table = contingency_table(t, s, sparse_type="array")
    table.sum_duplicates()
    t_sizes = np.asarray(table.sum(axis=1)).ravel()
    s_sizes = np.asarray(table.sum(axis=0)).ravel()

    # Rand: the 1/n^2 normalisation cancels in the ratios.
    sum_p2 = float(table.data @ table.data)
    rand_split = sum_p2 / float(t_sizes @ t_sizes)
    rand_merge = sum_p2 / float(s_sizes @ s_sizes)

    # Information: skimage returns [H(S|T), H(T|S)].
    _, h_t_given_s = variation_of_information(t, s, table=table / n)
    h_t = _entropy(t_sizes, n)
    h_s = _entropy(s_sizes, n)
    mutual = min(max(h_t - float(h_t_given_s), 0.0), h_t, h_s)  # clip rounding error
    info_split = _ratio(mutual, h_s)
    info_merge = _ratio(mutual, h_t)
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


# --------------------------------------------------------------------------------------------
# membranes: warping error

# The 8 neighbours of a pixel, bit k of a neighbourhood code is neighbour k (1 = membrane).
_RING = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))


def _ring_components(
    members: list[int], adjacent: Callable[[tuple[int, int], tuple[int, int]], bool]
) -> list[set[int]]:
    """Connected components of ring positions ``members`` under the relation ``adjacent``."""
    left, comps = set(members), []
    while left:
        stack = [left.pop()]
        comp = set(stack)
        while stack:
            k = stack.pop()
            for m in [m for m in left if adjacent(_RING[k], _RING[m])]:
                left.discard(m)
                comp.add(m)
                stack.append(m)
        comps.append(comp)
    return comps


def _simple_point_table() -> NDArray[np.bool_]:
    """Simple-point lookup over the 256 neighbourhood configurations, (8, 4) topology.

    A pixel is simple (flipping it changes no topology) when its membrane neighbours form
    exactly one 8-connected component and its interior neighbours exactly one 4-connected
    component 4-adjacent to it (the local characterisation of digital topology, e.g. Bertrand
    and Malandain 1994). The centre itself is excluded, so the test holds for both flips.
    """

    def adj8(a: tuple[int, int], b: tuple[int, int]) -> bool:
        return max(abs(a[0] - b[0]), abs(a[1] - b[1])) == 1

    def adj4(a: tuple[int, int], b: tuple[int, int]) -> bool:
        return abs(a[0] - b[0]) + abs(a[1] - b[1]) == 1

    table = np.zeros(256, dtype=bool)
    for code in range(256):
        fg = [k for k in range(8) if code >> k & 1]
        bg = [k for k in range(8) if not code >> k & 1]
        n_fg = len(_ring_components(fg, adj8))
        n_bg = sum(
            any(0 in _RING[k] for k in comp)  # contains a 4-neighbour of the centre
            for comp in _ring_components(bg, adj4)
        )
        table[code] = n_fg == 1 and n_bg == 1
    return table


_SIMPLE = _simple_point_table()


def warp_truth(
    pred_membrane: ArrayLike, true_membrane: ArrayLike, *, threshold: float = 0.5
) -> NDArray[np.bool_]:
    """Warp the true membrane map towards a prediction by flipping simple points only.

    Greedy algorithm of Jain et al. (2010): among the pixels where the warped truth disagrees
    with the binarised prediction and whose flip is topology-preserving (simple point; membrane
    8-connected, interior 4-connected), flip the one the prediction is most confident about,
    ``|pred - truth|``, ties in raster order; repeat until no disagreeing pixel is simple.
    Pixels outside the image count as membrane, so no warp can join two cells around the
    image border. A priority queue holds the candidates; a pixel found non-simple is queued
    again when one of its 8 neighbours flips.

    Parameters
    ----------
    pred_membrane : ndarray of bool, shape (H, W), or of float in [0, 1]
        Predicted membrane map or membrane probability (True / 1 = membrane).
    true_membrane : ndarray of bool or 0/1, shape (H, W)
        Ground truth, True = membrane.
    threshold : float
        Membrane where ``pred >= threshold``.

    Returns
    -------
    ndarray of bool, shape (H, W)
        The warped truth: same topology as ``true_membrane``, True = membrane.
    """
    true = _true_membrane(true_membrane)
    prob, _ = _pred_membrane(pred_membrane, true.shape)
    h, w = true.shape
    stride = w + 2

    # Work on flat padded buffers: the 1-pixel frame needs no bounds checks and is membrane.
    grid = np.pad(true, 1, constant_values=True).astype(np.uint8).ravel()
    target = np.pad(prob >= threshold, 1, constant_values=True).ravel()
    priority = np.pad(np.abs(prob - true), 1).ravel().tolist()
    mismatch = bytearray((grid != target).astype(np.uint8).tobytes())
    waiting = bytearray(len(mismatch))  # 1 = disagreeing but not simple when last checked
    offsets = [dr * stride + dc for dr, dc in _RING]
    simple = _SIMPLE.tolist()
    cells = bytearray(grid.tobytes())

    start = np.flatnonzero(np.frombuffer(bytes(mismatch), dtype=np.uint8))
    heap = [(-priority[i], i) for i in start.tolist()]
    heapq.heapify(heap)
    while heap:
        neg_p, i = heapq.heappop(heap)
        code = 0
        for k, off in enumerate(offsets):
            code |= cells[i + off] << k
        if not simple[code]:
            waiting[i] = 1
            continue
        cells[i] ^= 1
        mismatch[i] = 0
        for off in offsets:
            j = i + off
            if waiting[j] and mismatch[j]:
                waiting[j] = 0
                heapq.heappush(heap, (-priority[j], j))
    warped = np.frombuffer(bytes(cells), dtype=np.uint8).reshape(h + 2, w + 2)
    return warped[1:-1, 1:-1].astype(bool)


def warping_error(
    pred_membrane: ArrayLike, true_membrane: ArrayLike, *, threshold: float = 0.5
) -> dict[str, float | int]:
    """Warping error of Jain et al. (2010): pixel disagreement left after `warp_truth`.

    Topology-preserving disagreements (a boundary drawn a pixel off) are warped away; what
    remains are topological errors such as a gap that merges two cells or a spurious membrane
    that splits one. The warp is greedy, so this is an upper bound on the minimum over warps.

    Parameters
    ----------
    pred_membrane : ndarray of bool, shape (H, W), or of float in [0, 1]
        Predicted membrane map or membrane probability (True / 1 = membrane).
    true_membrane : ndarray of bool or 0/1, shape (H, W)
        Ground truth, True = membrane.
    threshold : float
        Membrane where ``pred >= threshold``.

    Returns
    -------
    dict
        ``warping_error`` (float): fraction of pixels where the warped truth and the binarised
        prediction disagree; ``n_errors`` (int): their count; ``n_flipped`` (int): pixels the
        warp changed; ``threshold`` (float).
    """
    true = _true_membrane(true_membrane)
    prob, _ = _pred_membrane(pred_membrane, true.shape)
    warped = warp_truth(prob, true, threshold=threshold)
    n_errors = int(np.count_nonzero(warped != (prob >= threshold)))
    return {
        "warping_error": n_errors / true.size,
        "n_errors": n_errors,
        "n_flipped": int(np.count_nonzero(warped != true)),
        "threshold": float(threshold),
    }


# --------------------------------------------------------------------------------------------
# semantic segmentation


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
        so that images can be pooled by summing them.
    """
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
    fp = confusion.sum(axis=0) - tp
    fn = confusion.sum(axis=1) - tp

    iou: list[float | None] = []
    dice: list[float | None] = []
    for a, b, c in zip(tp.tolist(), fp.tolist(), fn.tolist(), strict=True):
        present = a + b + c > 0
        iou.append(a / (a + b + c) if present else None)
        dice.append(2 * a / (2 * a + b + c) if present else None)
    defined_iou = [v for v in iou if v is not None]
    defined_dice = [v for v in dice if v is not None]
    return {
        "iou": iou,
        "dice": dice,
        "mean_iou": sum(defined_iou) / len(defined_iou) if defined_iou else None,
        "mean_dice": sum(defined_dice) / len(defined_dice) if defined_dice else None,
        "tp": tp.tolist(),
        "fp": fp.tolist(),
        "fn": fn.tolist(),
    }


# --------------------------------------------------------------------------------------------
# instances


def _n_matches(rows: NDArray, cols: NDArray, iou: NDArray) -> int:
    """Size of a maximum one-to-one matching of (true, pred) pairs (all eligible).

    Above IoU 0.5 each object has at most one eligible partner and the pairs already are the
    matching; otherwise (IoU thresholds <= 0.5, or exact ties at 0.5) solve an assignment that
    maximises the number of matches first and their total IoU second.
    """
    if rows.size == 0:
        return 0
    r_ids, r = np.unique(rows, return_inverse=True)
    c_ids, c = np.unique(cols, return_inverse=True)
    if r_ids.size == rows.size and c_ids.size == cols.size:
        return int(rows.size)
    # A bonus larger than any total IoU makes the count dominate.
    bonus = float(min(r_ids.size, c_ids.size) + 1)
    gain = np.zeros((r_ids.size, c_ids.size))
    gain[r, c] = bonus + iou
    ri, ci = optimize.linear_sum_assignment(gain, maximize=True)
    return int(np.count_nonzero(gain[ri, ci] > 0))


def _detection_stats(tp: NDArray, fp: NDArray, fn: NDArray) -> dict[str, list[float]]:
    return {
        "precision": [_ratio(a, a + b) for a, b in zip(tp, fp, strict=True)],
        "recall": [_ratio(a, a + c) for a, c in zip(tp, fn, strict=True)],
        "f1": [_ratio(2 * a, 2 * a + b + c) for a, b, c in zip(tp, fp, fn, strict=True)],
        "ap": [_ratio(a, a + b + c) for a, b, c in zip(tp, fp, fn, strict=True)],
    }


def instance_scores(
    pred_labels: ArrayLike,
    true_labels: ArrayLike,
    *,
    thresholds: Sequence[float] = IOU_THRESHOLDS,
) -> dict[str, Any]:
    """Object-level scores of an instance segmentation against the truth.

    Rules (``|T & P|`` is the overlap of true object T and predicted object P in pixels):

    * Matching, per IoU threshold: a one-to-one matching of true and predicted objects using
      only pairs with ``IoU >= threshold``, of maximum size (optimal assignment). Matched pairs
      are TP, unmatched predictions FP, unmatched true objects FN; precision ``TP/(TP+FP)``,
      recall ``TP/(TP+FN)``, F1 ``2TP/(2TP+FP+FN)``, AP ``TP/(TP+FP+FN)`` (DSB 2018 /
      stardist definition). A ratio 0/0 is 1: with no true and no predicted objects every
      score is 1; with no predictions precision is 1 and recall 0.
    * Merge: a predicted object that covers more than half (``|T & P| > |T|/2``) of two or
      more true objects; ``merges`` counts such predicted objects.
    * Split: a true object T covered by two or more predicted objects that each cover at least
      10 % of it (``|T & P| >= |T|/10``) and together cover more than half of it; ``splits``
      counts such true objects.
    * SEG (Cell Tracking Challenge): for each true object, the Jaccard index with the predicted
      object covering more than half of it (at most one can), else 0; ``seg`` is the mean over
      true objects (1 if there is none, by the 0/0 rule).

    Parameters
    ----------
    pred_labels : ndarray of int, shape (H, W) or any
        Predicted instances, 0 = background, other values = object ids (any, not necessarily
        consecutive).
    true_labels : ndarray of int, same shape
        True instances, 0 = background.
    thresholds : sequence of float
        IoU thresholds; default 0.5, 0.55, ..., 0.95.

    Returns
    -------
    dict
        ``thresholds`` (list of float); per threshold, lists aligned with it: ``tp``, ``fp``,
        ``fn`` (int), ``precision``, ``recall``, ``f1``, ``ap`` (float); ``mean_ap`` (float,
        mean AP over the thresholds); ``n_true``, ``n_pred``, ``merges``, ``splits`` (int);
        ``seg`` (float) and ``seg_sum`` (float, sum of the per-object SEG, for pooling).
    """
    true = _label_image(true_labels, "true_labels")
    pred = _label_image(pred_labels, "pred_labels")
    if pred.shape != true.shape:
        raise ValueError(f"pred_labels shape {pred.shape} differs from {true.shape}")
    thr = [float(t) for t in thresholds]
    if not thr:
        raise ValueError("thresholds must not be empty")

    t_lab, n_true = _consecutive(true)
    p_lab, n_pred = _consecutive(pred)
    true_area = np.bincount(t_lab.ravel(), minlength=n_true + 1)[1:]
    pred_area = np.bincount(p_lab.ravel(), minlength=n_pred + 1)[1:]

    # Sparse overlaps: one entry per (true, pred) pair that shares a pixel.
    both = (t_lab > 0) & (p_lab > 0)
    keys, inter = np.unique(t_lab[both] * (n_pred + 1) + p_lab[both], return_counts=True)
    ti = keys // (n_pred + 1) - 1
    pi = keys % (n_pred + 1) - 1
    iou = inter / (true_area[ti] + pred_area[pi] - inter)

    tp = np.array([_n_matches(ti[iou >= x], pi[iou >= x], iou[iou >= x]) for x in thr])
    fp = n_pred - tp
    fn = n_true - tp
    stats = _detection_stats(tp, fp, fn)

    # Integer comparisons keep "more than half" and "at least 10 %" exact.
    major = 2 * inter > true_area[ti]
    merges = int(np.count_nonzero(np.bincount(pi[major], minlength=n_pred) >= 2))
    piece = 10 * inter >= true_area[ti]
    n_pieces = np.bincount(ti[piece], minlength=n_true)
    covered = np.bincount(ti[piece], weights=inter[piece], minlength=n_true)
    splits = int(np.count_nonzero((n_pieces >= 2) & (2 * covered > true_area)))
    seg_sum = float(iou[major].sum())

    return {
        "thresholds": thr,
        "tp": tp.tolist(),
        "fp": fp.tolist(),
        "fn": fn.tolist(),
        **stats,
        "mean_ap": float(np.mean(stats["ap"])),
        "n_true": n_true,
        "n_pred": n_pred,
        "merges": merges,
        "splits": splits,
        "seg": _ratio(seg_sum, n_true),
        "seg_sum": seg_sum,
    }


def pool_instance_scores(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Dataset-level instance scores from per-image `instance_scores` results.

    TP, FP and FN are summed over images per threshold before precision, recall, F1 and AP are
    computed (so large images with many objects weigh more than in a mean of per-image
    scores); merges, splits and object counts are summed; SEG is the mean over all true
    objects of the dataset.

    Parameters
    ----------
    results : sequence of dict
        Outputs of `instance_scores`, all with the same ``thresholds``.

    Returns
    -------
    dict
        The keys of `instance_scores` plus ``n_images`` (int).
    """
    if not results:
        raise ValueError("results must not be empty")
    thr = list(results[0]["thresholds"])
    if any(list(r["thresholds"]) != thr for r in results):
        raise ValueError("all results must use the same IoU thresholds")
    tp = np.sum([r["tp"] for r in results], axis=0)
    fp = np.sum([r["fp"] for r in results], axis=0)
    fn = np.sum([r["fn"] for r in results], axis=0)
    stats = _detection_stats(tp, fp, fn)
    n_true = int(sum(r["n_true"] for r in results))
    seg_sum = float(sum(r["seg_sum"] for r in results))
    return {
        "thresholds": thr,
        "tp": tp.tolist(),
        "fp": fp.tolist(),
        "fn": fn.tolist(),
        **stats,
        "mean_ap": float(np.mean(stats["ap"])),
        "n_true": n_true,
        "n_pred": int(sum(r["n_pred"] for r in results)),
        "merges": int(sum(r["merges"] for r in results)),
        "splits": int(sum(r["splits"] for r in results)),
        "seg": _ratio(seg_sum, n_true),
        "seg_sum": seg_sum,
        "n_images": len(results),
    }
