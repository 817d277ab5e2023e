"""Evaluate predictions against ground truth: per image, over a folder, as a JSON report.

Three tasks (`TASKS`), each scored with the pure functions of `biounet.metrics`:

``membranes`` (ISBI 2012 EM segmentation)
    Truth: label images where the value ``truth_foreground`` marks membrane. The default is
    **0, the ISBI 2012 convention (0 = membrane, 255 = cell interior)**; other values all count
    as cell interior, so a cell label image with 0 on the boundaries works too. Predictions: a
    class mask (membrane where ``mask == membrane_class``) or a probability TIFF (plane
    ``membrane_class`` is the membrane probability). biounet models trained on ISBI with
    ``--foreground 0`` predict 0 = interior, 1 = membrane, hence ``membrane_class = 1``.
    Scores: pixel error at threshold 0.5, the ISBI pixel error ``1 - best F-score`` and the
    foreground-restricted Rand and information scores (both maximised over the threshold
    sweep 0.0..1.0 for probabilities; a mask is one threshold), and the warping error
    (probabilities thresholded at 0.5).

``semantic``
    Truth: class indices ``0..K-1`` (negative values: ignored pixels). A binary truth is
    recognised: when all truth files together hold at most two distinct values other than
    just 0 and 1 (e.g. ``{0, 255}``) and ``num_classes`` is unset or not above the larger
    value, they become 0/1 with **the larger value as class 1**; with ``truth_foreground``
    set, that stored value is class 1 and every other value 0. Predictions: a class mask, or the
    argmax of a probability TIFF. ``num_classes`` defaults to max label + 1 over truth and
    predictions (at least the number of probability planes, and 2 for a binary truth). Scores:
    per-class IoU and Dice and their means over the classes present (`metrics.iou_dice`).

``instances``
    Truth and predictions: instance label images (0 = background, 1..N one object each, ids
    need not be consecutive or agree). Scores: `metrics.instance_scores` per image plus
    ``ap_50`` and ``f1_50`` (AP and F1 at IoU 0.5); the report adds the dataset-level
    ``pooled`` scores of `metrics.pool_instance_scores`.

Predictions are what ``biounet predict`` writes: ``STEM.tif`` holding a ``(H, W)`` uint8 class
mask or a ``(K, H, W)`` float32 probability map; its ``STEM_overlay.png`` pictures are skipped.
Prediction and truth files are matched by file stem (``a.tif`` with ``a.png``); every truth
file needs a prediction and every prediction a truth file.

The report is a JSON-safe dict (no NaN; ``None`` where a score is undefined)::

    {"task": str, "config": {...resolved EvaluateConfig...},
     "images": {stem: per-image scores}, "mean": {mean of the per-image scores},
     "pooled": {dataset-level scores}}          # "pooled": semantic and instances only

For ``semantic`` the pooled IoU/Dice come from TP/FP/FN summed over all images.

This module walks the folders; `biounet.evaluate_scoring` scores one array pair (and holds
`EvaluateConfig`), `biounet.evaluate_report` builds, saves, loads and prints reports. Import
their public names from here.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from biounet.errors import BiounetError
from biounet.evaluate_report import _build_report, format_table, load_report, save_report
from biounet.evaluate_scoring import (
    MEMBRANE_KEYS,
    TASKS,
    EvaluateConfig,
    _class_count,
    _evaluate,
    _semantic_plan,
    _SemanticPlan,
)
from biounet.io import list_images, read_array, read_mask

__all__ = [
    "MEMBRANE_KEYS",
    "TASKS",
    "EvaluateConfig",
    "evaluate_folders",
    "evaluate_pair",
    "format_table",
    "load_report",
    "pair_predictions",
    "save_report",
]

log = logging.getLogger(__name__)

_OVERLAY_SUFFIX = "_overlay"
_NAMES = ("prediction", "truth")


# -- public API ---------------------------------------------------------------------------


def evaluate_pair(
    pred_array: np.ndarray, truth_array: np.ndarray, config: EvaluateConfig
) -> dict[str, Any]:
    """Scores of one prediction against its truth.

    Parameters
    ----------
    pred_array : ndarray
        ``(H, W)`` class mask / instance labels, or ``(K, H, W)`` float probabilities.
    truth_array : ndarray, shape (H, W)
        Stored truth as read by `biounet.io.read_mask`.
    config : EvaluateConfig

    Returns
    -------
    dict
        The per-image scores of ``config.task`` (module docstring), JSON-safe.

    Raises
    ------
    BiounetError
        Shapes differ, or the arrays cannot be what the task needs.
    """
    return _evaluate(np.asarray(pred_array), np.asarray(truth_array), config, None, _NAMES)


def evaluate_folders(pred: Path, truth: Path, config: EvaluateConfig) -> dict[str, Any]:
    """Score every prediction in `pred` against the truth file of the same stem in `truth`.

    Parameters
    ----------
    pred, truth : Path
        Two folders (matched by file stem, see `pair_predictions`) or two single files.
    config : EvaluateConfig

    Returns
    -------
    dict
        The report: ``task``, ``config`` (resolved), ``images``, ``mean`` and, for semantic
        and instances, ``pooled`` (module docstring).
    """
    pairs = pair_predictions(Path(pred), Path(truth))
    plan = _semantic_plan_files(pairs, config) if config.task == "semantic" else None
    resolved = _resolved_config(config, plan)
    images: dict[str, dict[str, Any]] = {}
    for stem, p, t in pairs:
        truth_arr = read_mask(t)
        pred_arr = _read_prediction(p)
        images[stem] = _evaluate(pred_arr, truth_arr, resolved, plan, (str(p), str(t)))
        log.info("evaluated %s against %s", p, t)
    return _build_report(resolved, images)


def pair_predictions(pred: Path, truth: Path) -> list[tuple[str, Path, Path]]:
    """Match prediction and truth files by file stem.

    Two single files make one pair (named after the truth file). In folders, every truth file
    needs exactly one prediction and every prediction a truth file; ``STEM_overlay.png``
    files beside a prediction ``STEM.*`` (written by ``biounet predict --overlay``) are
    skipped.

    Returns
    -------
    list of (stem, pred_path, truth_path), sorted by stem
    """
    pred, truth = Path(pred), Path(truth)
    for path in (pred, truth):
        if not path.exists():
            raise BiounetError(f"{path}: no such file or folder")
    if pred.is_file() or truth.is_file():
        if not (pred.is_file() and truth.is_file()):
            folder, file = (pred, truth) if pred.is_dir() else (truth, pred)
            raise BiounetError(
                f"{folder}: is a folder but {file} is a file; give two prediction/truth "
                "folders or two files"
            )
        return [(truth.stem, pred, truth)]

    truths = _by_stem(list_images(truth))
    pred_files = list_images(pred)
    stems = {p.stem for p in pred_files}
    kept = []
    for p in pred_files:
        base = p.stem[: -len(_OVERLAY_SUFFIX)]
        if p.stem.endswith(_OVERLAY_SUFFIX) and p.suffix.lower() == ".png" and base in stems:
            log.debug("skipping overlay picture %s", p)
        else:
            kept.append(p)
    preds = _by_stem(kept)

    missing = [path for stem, path in truths.items() if stem not in preds]
    if missing:
        more = f" ({len(missing) - 1} more truth files lack one)" if len(missing) > 1 else ""
        raise BiounetError(
            f"{missing[0]}: no prediction named {missing[0].stem}.* in {pred}{more}; "
            "every truth file needs a prediction with the same file stem"
        )
    extra = [path for stem, path in preds.items() if stem not in truths]
    if extra:
        more = f" ({len(extra) - 1} more predictions lack one)" if len(extra) > 1 else ""
        raise BiounetError(
            f"{extra[0]}: no truth file named {extra[0].stem}.* in {truth}{more}; "
            "remove the prediction or add its truth file"
        )
    return [(stem, preds[stem], truths[stem]) for stem in sorted(truths)]


# -- reading the folders ------------------------------------------------------------------


def _read_prediction(path: Path) -> np.ndarray:
    """A prediction file as stored: (H, W) mask/labels or (K, H, W) probabilities."""
    arr = read_array(path)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim not in (2, 3):
        raise BiounetError(
            f"{path}: a prediction must be an (H, W) mask or a (K, H, W) probability TIFF, "
            f"got shape {arr.shape}"
        )
    return arr


def _by_stem(files: list[Path]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in files:
        if path.stem in out:
            raise BiounetError(
                f"{path}: same file stem as {out[path.stem]}; keep one file per stem"
            )
        out[path.stem] = path
    return out


def _semantic_plan_files(
    pairs: list[tuple[str, Path, Path]], config: EvaluateConfig
) -> _SemanticPlan:
    """First pass over the files: distinct truth values, and the classes the predictions use."""
    truth_values, pred_counts = [], []
    for _, p, t in pairs:
        truth = read_mask(t)
        truth_values.append(np.unique(truth))
        if config.num_classes is None:
            pred_counts.append(_class_count(_read_prediction(p), str(p)))
        if config.truth_foreground is not None and np.unique(truth[truth >= 0]).size > 2:
            raise BiounetError(
                f"{t}: holds more than two values, but a truth foreground value means a "
                "binary truth; leave it unset for class-index truth"
            )
    return _semantic_plan(truth_values, pred_counts, config)


def _resolved_config(config: EvaluateConfig, plan: _SemanticPlan | None) -> EvaluateConfig:
    if config.task == "membranes" and config.truth_foreground is None:
        return dataclasses.replace(config, truth_foreground=0)
    if plan is not None:
        return dataclasses.replace(
            config, num_classes=plan.num_classes, truth_foreground=plan.foreground
        )
    return config
