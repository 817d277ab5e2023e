"""Score one prediction array against one truth array, for each evaluation task.

`EvaluateConfig` says what to score; the functions here turn stored arrays into the inputs of
`biounet.metrics` (membrane maps, class masks, instance labels), refuse arrays that cannot be
what the task needs with a `BiounetError` naming the file, and return the per-image scores.
The conventions of each task are documented in `biounet.evaluate`, the public entry point;
nothing here reads files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from biounet import metrics
from biounet.configs import TASKS, EvaluateConfig
from biounet.errors import BiounetError

__all__ = ["MEMBRANE_KEYS", "TASKS", "EvaluateConfig"]

# Messages keep the logger of the public module, which users and the CLI know by name.
log = logging.getLogger("biounet.evaluate")


#: Per-image scores of the membranes task, in table order.
MEMBRANE_KEYS = (
    "pixel_error",
    "pixel_fscore_error",
    "rand_error",
    "v_rand",
    "v_rand_split",
    "v_rand_merge",
    "v_info",
    "v_info_split",
    "v_info_merge",
    "warping_error",
)


@dataclass(frozen=True)
class _SemanticPlan:
    """How semantic truth values become classes: ``foreground`` is the stored value of class
    1 in a binary truth (None: values are class indices); ``num_classes`` is K."""

    foreground: int | None
    num_classes: int


# -- array checks -------------------------------------------------------------------------


def _is_probabilities(pred: np.ndarray) -> bool:
    return pred.ndim == 3


def _check_shapes(pred: np.ndarray, truth: np.ndarray, names: tuple[str, str]) -> None:
    if truth.ndim != 2:
        raise BiounetError(f"{names[1]}: truth must be a 2-D image, got shape {truth.shape}")
    if pred.ndim not in (2, 3) or pred.shape[-2:] != truth.shape:
        raise BiounetError(
            f"{names[0]}: prediction has shape {pred.shape} but {names[1]} has shape "
            f"{truth.shape}; predictions must be (H, W) masks or (K, H, W) probabilities "
            "of the same image size as their truth"
        )


def _integer_image(arr: np.ndarray, name: str, what: str) -> np.ndarray:
    """A 2-D label/class image as int64; integer-valued floats are accepted."""
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr)):
            raise BiounetError(
                f"{name}: {what} must hold integer values; probability predictions are "
                "(K, H, W) TIFFs ('biounet predict --output prob')"
            )
    elif arr.dtype.kind not in "ui":
        raise BiounetError(f"{name}: unsupported pixel type {arr.dtype} for {what}")
    return arr.astype(np.int64)


def _probabilities(pred: np.ndarray, name: str) -> np.ndarray:
    if pred.dtype.kind != "f":
        raise BiounetError(
            f"{name}: a (K, H, W) prediction must hold float probabilities, got {pred.dtype}"
        )
    if pred.shape[0] < 2:
        raise BiounetError(f"{name}: a probability map needs one plane per class (K >= 2)")
    if not np.isfinite(pred).all() or pred.min() < -1e-6 or pred.max() > 1 + 1e-6:
        raise BiounetError(
            f"{name}: probabilities must lie in [0, 1]; is this a biounet probability TIFF?"
        )
    return pred


# -- scoring ------------------------------------------------------------------------------


def _evaluate(
    pred: np.ndarray,
    truth: np.ndarray,
    config: EvaluateConfig,
    plan: _SemanticPlan | None,
    names: tuple[str, str],
) -> dict[str, Any]:
    """Per-image scores of ``config.task``; ``names`` (prediction, truth) go into errors.

    ``plan`` is the semantic plan of the whole folder; without one (a single pair) it is made
    from this pair alone.
    """
    _check_shapes(pred, truth, names)
    if config.task == "membranes":
        return _membranes(pred, truth, config, names)
    if config.task == "semantic":
        if plan is None:
            plan = _semantic_plan([np.unique(truth)], [_class_count(pred, names[0])], config)
        return _semantic(pred, truth, plan, names)
    return _instances(pred, truth, names)


def _truth_membrane(truth: np.ndarray, fg: int, name: str) -> np.ndarray:
    """The true membrane map, refusing a truth without interior and warning on odd ones."""
    true_membrane = truth == fg
    n_membrane = int(np.count_nonzero(true_membrane))
    if n_membrane == truth.size:
        raise BiounetError(
            f"{name}: every pixel equals the membrane value {fg}, no cell interior is "
            "left; set the truth foreground to the stored membrane value"
        )
    if n_membrane == 0:
        log.warning("%s: no pixel equals the membrane value %d", name, fg)
    elif n_membrane > truth.size / 2:
        log.warning(
            "%s: %d%% of the truth is membrane (value %d); is the truth foreground right?",
            name,
            round(100 * n_membrane / truth.size),
            fg,
        )
    return true_membrane


def _pred_membrane(pred: np.ndarray, k: int, name: str, truth_has_membrane: bool) -> np.ndarray:
    """Membrane probability (plane ``k``) or membrane map (``mask == k``) of a prediction."""
    if _is_probabilities(pred):
        probs = _probabilities(pred, name)
        if k >= probs.shape[0]:
            raise BiounetError(
                f"{name}: has {probs.shape[0]} probability planes, so no membrane plane "
                f"{k}; set the membrane class to the model's membrane class"
            )
        return np.clip(probs[k].astype(np.float64), 0.0, 1.0)
    membrane = _integer_image(pred, name, "a class mask") == k
    if truth_has_membrane and not membrane.any():
        log.warning("%s: no pixel has the membrane class %d", name, k)
    return membrane


def _membranes(
    pred: np.ndarray, truth: np.ndarray, config: EvaluateConfig, names: tuple[str, str]
) -> dict[str, float]:
    fg = 0 if config.truth_foreground is None else config.truth_foreground
    true_membrane = _truth_membrane(truth, fg, names[1])
    membrane = _pred_membrane(pred, config.membrane_class, names[0], true_membrane.any())
    pe = metrics.pixel_error(membrane, true_membrane)
    rs = metrics.rand_scores(membrane, true_membrane)
    we = metrics.warping_error(membrane, true_membrane, threshold=0.5)
    scores = {**pe, **rs, **we}
    return {key: float(scores[key]) for key in MEMBRANE_KEYS}


def _class_count(pred: np.ndarray, name: str) -> int:
    """Classes a prediction implies: its planes, or its largest class index + 1."""
    if _is_probabilities(pred):
        return int(_probabilities(pred, name).shape[0])
    mask = _integer_image(pred, name, "a class mask")
    if mask.min() < 0:
        raise BiounetError(f"{name}: class masks must not contain negative values")
    return int(mask.max()) + 1


def _semantic_plan(
    truth_values: list[np.ndarray], pred_counts: list[int], config: EvaluateConfig
) -> _SemanticPlan:
    """Decide, from the distinct truth values of all files, how truth values become classes."""
    values = np.unique(np.concatenate([np.asarray(v).ravel() for v in truth_values]))
    values = values[values >= 0]
    k = config.num_classes
    top = int(values.max()) if values.size else 0
    if config.truth_foreground is not None:
        if values.size > 2:
            raise BiounetError(
                f"the truth holds {values.size} distinct values, but a truth foreground "
                "value means a binary truth; leave it unset for class-index truth"
            )
        fg: int | None = config.truth_foreground
    elif values.size <= 2 and not set(values.tolist()) <= {0, 1} and (k is None or top >= k):
        fg = top  # e.g. {0, 255}: the larger value is class 1
    else:
        fg = None  # class indices as stored ({0, 1} included)
    if fg is not None and k is not None and k < 2:
        raise BiounetError(f"a binary truth needs 2 classes, not {k}")
    if k is None:
        k = max([2 if fg is not None else top + 1, *pred_counts])
    return _SemanticPlan(foreground=None if fg is None else int(fg), num_classes=int(k))


def _semantic(
    pred: np.ndarray, truth: np.ndarray, plan: _SemanticPlan, names: tuple[str, str]
) -> dict[str, Any]:
    k = plan.num_classes
    true = _integer_image(truth, names[1], "a truth mask")
    if plan.foreground is not None:
        true = np.where(true < 0, -1, true == plan.foreground).astype(np.int64)
    elif true.max() >= k:
        raise BiounetError(
            f"{names[1]}: truth values up to {int(true.max())} are not class indices "
            f"0..{k - 1}; set the number of classes"
        )
    if _is_probabilities(pred):
        classes = _probabilities(pred, names[0]).argmax(axis=0)
    else:
        classes = _integer_image(pred, names[0], "a class mask")
    if classes.size and (classes.min() < 0 or classes.max() >= k):
        raise BiounetError(
            f"{names[0]}: predicted classes up to {int(classes.max())} are not class indices "
            f"0..{k - 1}; predictions must be biounet class masks or probabilities"
        )
    return metrics.iou_dice(classes, true, k)


def _instances(pred: np.ndarray, truth: np.ndarray, names: tuple[str, str]) -> dict[str, Any]:
    if _is_probabilities(pred):
        raise BiounetError(
            f"{names[0]}: is a probability map; instance evaluation needs an instance label "
            "image (0 = background, 1..N one object each)"
        )
    labels = _integer_image(pred, names[0], "an instance label image")
    true = _integer_image(truth, names[1], "an instance label image")
    for name, arr in zip(names, (labels, true), strict=True):
        if arr.min() < 0:
            raise BiounetError(f"{name}: instance labels must be >= 0")
    scores = metrics.instance_scores(labels, true)
    if scores["n_pred"] == 1 and scores["n_true"] > 2:
        log.warning(
            "%s: one predicted object against %d true ones; is it a class mask rather than "
            "instance labels?",
            names[0],
            scores["n_true"],
        )
    return _with_iou50(scores)


def _with_iou50(scores: dict[str, Any]) -> dict[str, Any]:
    """Instance scores plus ``ap_50`` and ``f1_50``, the AP and F1 at IoU 0.5."""
    i = scores["thresholds"].index(0.5)
    return {**scores, "ap_50": scores["ap"][i], "f1_50": scores["f1"][i]}
