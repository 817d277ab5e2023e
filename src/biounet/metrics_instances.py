"""Instance segmentation metrics: matching and AP over IoU thresholds, merges, splits, SEG.

Instances are label images (0 = background, any other value one object; ids need not be
consecutive or agree between truth and prediction). `instance_scores` scores one image and
`pool_instance_scores` pools per-image results into dataset-level scores. Matching uses
scipy's optimal assignment (``optimize.linear_sum_assignment``); the matching rule, merges,
splits, SEG and pooling are written from their published definitions (DSB 2018 / stardist
for AP, the Cell Tracking Challenge for SEG).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import optimize

from biounet.metrics_common import _consecutive, _label_image, _ratio

__all__ = ["IOU_THRESHOLDS", "instance_scores", "pool_instance_scores"]

#: IoU thresholds 0.5, 0.55, ..., 0.95 of the instance metrics (DSB 2018 / stardist).
IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))

# Object counts of a result; pooling sums them over images.
_COUNTS = ("n_true", "n_pred", "merges", "splits")


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


def _summary(
    thr: list[float],
    matches: tuple[NDArray, NDArray, NDArray],
    counts: Mapping[str, int],
    seg_sum: float,
) -> dict[str, Any]:
    """The result dict of one image or of a pool of images, in the key order of the report.

    ``matches`` is (TP, FP, FN) per threshold; ``counts`` holds ``n_true``, ``n_pred``,
    ``merges`` and ``splits``.
    """
    tp, fp, fn = matches
    stats = _detection_stats(tp, fp, fn)
    return {
        "thresholds": thr,
        "tp": tp.tolist(),
        "fp": fp.tolist(),
        "fn": fn.tolist(),
        **stats,
        "mean_ap": float(np.mean(stats["ap"])),
        "n_true": counts["n_true"],
        "n_pred": counts["n_pred"],
        "merges": counts["merges"],
        "splits": counts["splits"],
        "seg": _ratio(seg_sum, counts["n_true"]),
        "seg_sum": seg_sum,
    }


def _sparse_overlaps(
    t_lab: NDArray, n_true: int, p_lab: NDArray, n_pred: int
) -> tuple[NDArray, NDArray, NDArray, NDArray, NDArray]:
    """One entry per (true, pred) pair of objects that share a pixel.

    ``t_lab`` and ``p_lab`` are consecutive labels 0..N. Returns the pairs' 0-based true and
    predicted indices, their overlap in pixels and IoU, and the area of each true object.
    """
    true_area = np.bincount(t_lab.ravel(), minlength=n_true + 1)[1:]
    pred_area = np.bincount(p_lab.ravel(), minlength=n_pred + 1)[1:]
    both = (t_lab > 0) & (p_lab > 0)
    keys, inter = np.unique(t_lab[both] * (n_pred + 1) + p_lab[both], return_counts=True)
    ti = keys // (n_pred + 1) - 1
    pi = keys % (n_pred + 1) - 1
    iou = inter / (true_area[ti] + pred_area[pi] - inter)
    return ti, pi, inter, iou, true_area


def _merges_splits_seg(
    ti: NDArray, pi: NDArray, inter: NDArray, iou: NDArray, true_area: NDArray, n_pred: int
) -> tuple[int, int, float]:
    """Merges, splits and the SEG sum from the sparse overlaps (see `instance_scores`)."""
    n_true = true_area.size
    # Integer comparisons keep "more than half" and "at least 10 %" exact.
    major = 2 * inter > true_area[ti]
    merges = int(np.count_nonzero(np.bincount(pi[major], minlength=n_pred) >= 2))
    piece = 10 * inter >= true_area[ti]
    n_pieces = np.bincount(ti[piece], minlength=n_true)
    covered = np.bincount(ti[piece], weights=inter[piece], minlength=n_true)
    splits = int(np.count_nonzero((n_pieces >= 2) & (2 * covered > true_area)))
    return merges, splits, float(iou[major].sum())


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
    ti, pi, inter, iou, true_area = _sparse_overlaps(t_lab, n_true, p_lab, n_pred)
    tp = np.array([_n_matches(ti[iou >= x], pi[iou >= x], iou[iou >= x]) for x in thr])
    merges, splits, seg_sum = _merges_splits_seg(ti, pi, inter, iou, true_area, n_pred)
    counts = {"n_true": n_true, "n_pred": n_pred, "merges": merges, "splits": splits}
    return _summary(thr, (tp, n_pred - tp, n_true - tp), counts, seg_sum)


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
    tp, fp, fn = (np.sum([r[key] for r in results], axis=0) for key in ("tp", "fp", "fn"))
    counts = {key: int(sum(r[key] for r in results)) for key in _COUNTS}
    seg_sum = float(sum(r["seg_sum"] for r in results))
    return {**_summary(thr, (tp, fp, fn), counts, seg_sum), "n_images": len(results)}
