"""Evaluation metrics, the public API: pure functions of label arrays.

Import them from here (``from biounet.metrics import rand_scores``); the definitions live in
one module per kind of segmentation:

* `biounet.metrics_membranes`, membrane maps (ISBI 2012 EM segmentation challenge):
  `pixel_error`, `rand_scores`, `rand_info_scores`, `ISBI_THRESHOLDS`. Convention there: True
  (or 1) = membrane, float predictions are membrane probabilities; ISBI label images store the
  opposite (0 = membrane), so pass ``labels == 0``.
* `biounet.metrics_warping`, the topological membrane score of Jain et al. (2010):
  `warping_error`, `warp_truth`.
* `biounet.metrics_instances`, instance label images (0 = background): `instance_scores`
  (matching and AP at `IOU_THRESHOLDS` 0.5:0.95, merges, splits, Cell Tracking Challenge SEG)
  and `pool_instance_scores` (dataset-level pooling).
* `biounet.metrics_semantic`, class masks: `iou_dice` per image, `pool_semantic_scores` over
  images, and the one IoU/Dice formula on per-class counts, `iou_dice_from_counts` and
  `dice_from_counts`.
* `biounet.metrics_common`: input checks and ratio rules the others share (not public).

The dict-returning functions give plain Python ``int``, ``float``, ``list`` and ``None`` (never
NaN), so ``json.dumps(result, allow_nan=False)`` works; the array functions
(`iou_dice_from_counts`, `dice_from_counts`, `warp_truth`) return numpy arrays.

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

from biounet.metrics_instances import IOU_THRESHOLDS, instance_scores, pool_instance_scores
from biounet.metrics_membranes import ISBI_THRESHOLDS, pixel_error, rand_info_scores, rand_scores
from biounet.metrics_semantic import (
    dice_from_counts,
    iou_dice,
    iou_dice_from_counts,
    pool_semantic_scores,
)

# The neighbourhood order and simple-point table, for tests of the warp's topology.
from biounet.metrics_warping import _RING as _RING
from biounet.metrics_warping import _SIMPLE as _SIMPLE
from biounet.metrics_warping import warp_truth, warping_error

__all__ = [
    "IOU_THRESHOLDS",
    "ISBI_THRESHOLDS",
    "dice_from_counts",
    "instance_scores",
    "iou_dice",
    "iou_dice_from_counts",
    "pixel_error",
    "pool_instance_scores",
    "pool_semantic_scores",
    "rand_info_scores",
    "rand_scores",
    "warp_truth",
    "warping_error",
]
