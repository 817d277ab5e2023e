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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from biounet import metrics
from biounet.errors import BiounetError
from biounet.io import list_images, read_array, read_json, read_mask, write_json

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

TASKS = ("membranes", "semantic", "instances")

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
_MEMBRANE_COLUMNS = (
    "pixel_error",
    "pixel_fscore_error",
    "rand_error",
    "v_rand",
    "v_info",
    "warping_error",
)
_INSTANCE_SCALARS = ("n_true", "n_pred", "ap_50", "f1_50", "mean_ap", "merges", "splits", "seg")
_OVERLAY_SUFFIX = "_overlay"


@dataclass(frozen=True)
class EvaluateConfig:
    """What to score and how to read the files (see the module docstring).

    Attributes
    ----------
    task : {"membranes", "semantic", "instances"}
    num_classes : int, optional
        semantic: number of classes K; default max label + 1 over truth and predictions.
    truth_foreground : int, optional
        membranes: the stored truth value that means membrane; default 0 (ISBI 2012: 0 =
        membrane, 255 = cell). semantic: the stored value of class 1 in a binary truth;
        default the larger value. Unused for instances.
    membrane_class : int
        membranes: class index (mask) or probability plane (probabilities) of membrane in
        the predictions; biounet predicts 0 = interior, 1 = membrane.
    """

    task: str
    num_classes: int | None = None
    truth_foreground: int | None = None
    membrane_class: int = 1

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise BiounetError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.num_classes is not None and self.num_classes < 1:
            raise BiounetError(f"number of classes must be at least 1, not {self.num_classes}")
        if self.membrane_class < 0:
            raise BiounetError(f"membrane class must be >= 0, not {self.membrane_class}")


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


def evaluate_folders(
    pred: Path,
    truth: Path,
    config: EvaluateConfig,
    *,
    on_file: Callable[[Path, int, int], None] | None = None,
) -> dict[str, Any]:
    """Score every prediction in `pred` against the truth file of the same stem in `truth`.

    Parameters
    ----------
    pred, truth : Path
        Two folders (matched by file stem, see `pair_predictions`) or two single files.
    config : EvaluateConfig
    on_file : callable, optional
        Called as ``on_file(pred_path, index, total)`` before each pair is scored.

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
    for i, (stem, p, t) in enumerate(pairs):
        if on_file is not None:
            on_file(p, i, len(pairs))
        truth_arr = read_mask(t)
        pred_arr = _read_prediction(p)
        images[stem] = _evaluate(pred_arr, truth_arr, resolved, plan, (str(p), str(t)))
        log.info("evaluated %s against %s", p, t)
    return _report(resolved, images)


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


def save_report(path: Path, report: Mapping[str, Any]) -> Path:
    """Write `report` as JSON, atomically; returns `path`."""
    json.dumps(report, allow_nan=False)  # refuse NaN / non-JSON values before writing
    write_json(Path(path), dict(report))
    return Path(path)


def load_report(path: Path) -> dict[str, Any]:
    """Read a report written by `save_report`."""
    path = Path(path)
    report = read_json(path)
    if report.get("task") not in TASKS or not isinstance(report.get("images"), dict):
        raise BiounetError(
            f"{path}: not a biounet evaluation report (no task/images); "
            "write one with 'biounet evaluate'"
        )
    return report


def format_table(report: Mapping[str, Any]) -> str:
    """Plain-text table: one row per image, then ``mean`` (and ``pooled``) rows."""
    task = report["task"]
    rows: list[tuple[str, Mapping[str, Any]]] = list(report["images"].items())
    rows.append(("mean", report["mean"]))
    if "pooled" in report:
        rows.append(("pooled", report["pooled"]))

    if task == "membranes":
        columns = [(key, key) for key in _MEMBRANE_COLUMNS]
    elif task == "semantic":
        k = len(report["mean"]["iou"])
        columns = [("mean_iou", "mean_iou"), ("mean_dice", "mean_dice")]
        columns += [(f"iou_{c}", ("iou", c)) for c in range(k)]
    else:
        columns = [(key, key) for key in _INSTANCE_SCALARS]

    def cell(scores: Mapping[str, Any], key: str | tuple[str, int]) -> str:
        value = scores[key[0]][key[1]] if isinstance(key, tuple) else scores.get(key)
        if value is None:
            return "-"
        if isinstance(value, int):
            return str(int(value))
        return f"{value:.4f}"

    header = ["image"] + [name for name, _ in columns]
    body = [[name] + [cell(scores, key) for _, key in columns] for name, scores in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        first = r[0].ljust(widths[0])
        rest = [v.rjust(w) for v, w in zip(r[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    rule = "-" * len(line(header))
    n_images = len(report["images"])
    out = [line(header), rule, *(line(r) for r in body[:n_images]), rule]
    out += [line(r) for r in body[n_images:]]
    return "\n".join(out)


# -- reading ------------------------------------------------------------------------------

_NAMES = ("prediction", "truth")


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


@dataclass(frozen=True)
class _SemanticPlan:
    """How semantic truth values become classes: ``foreground`` is the stored value of class
    1 in a binary truth (None: values are class indices); ``num_classes`` is K."""

    foreground: int | None
    num_classes: int


def _evaluate(
    pred: np.ndarray,
    truth: np.ndarray,
    config: EvaluateConfig,
    plan: _SemanticPlan | None,
    names: tuple[str, str],
) -> dict[str, Any]:
    _check_shapes(pred, truth, names)
    if config.task == "membranes":
        return _membranes(pred, truth, config, names)
    if config.task == "semantic":
        if plan is None:
            plan = _semantic_plan([np.unique(truth)], [_class_count(pred, names[0])], config)
        return _semantic(pred, truth, plan, names)
    return _instances(pred, truth, names)


def _membranes(
    pred: np.ndarray, truth: np.ndarray, config: EvaluateConfig, names: tuple[str, str]
) -> dict[str, float]:
    fg = 0 if config.truth_foreground is None else config.truth_foreground
    true_membrane = truth == fg
    n_membrane = int(np.count_nonzero(true_membrane))
    if n_membrane == truth.size:
        raise BiounetError(
            f"{names[1]}: every pixel equals the membrane value {fg}, no cell interior is "
            "left; set the truth foreground to the stored membrane value"
        )
    if n_membrane == 0:
        log.warning("%s: no pixel equals the membrane value %d", names[1], fg)
    elif n_membrane > truth.size / 2:
        log.warning(
            "%s: %d%% of the truth is membrane (value %d); is the truth foreground right?",
            names[1],
            round(100 * n_membrane / truth.size),
            fg,
        )

    k = config.membrane_class
    if _is_probabilities(pred):
        probs = _probabilities(pred, names[0])
        if k >= probs.shape[0]:
            raise BiounetError(
                f"{names[0]}: has {probs.shape[0]} probability planes, so no membrane plane "
                f"{k}; set the membrane class to the model's membrane class"
            )
        membrane: np.ndarray = np.clip(probs[k].astype(np.float64), 0.0, 1.0)
    else:
        mask = _integer_image(pred, names[0], "a class mask")
        membrane = mask == k
        if n_membrane and not membrane.any():
            log.warning("%s: no pixel has the membrane class %d", names[0], k)

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
    i = scores["thresholds"].index(0.5)
    return {**scores, "ap_50": scores["ap"][i], "f1_50": scores["f1"][i]}


# -- report -------------------------------------------------------------------------------


def _resolved_config(config: EvaluateConfig, plan: _SemanticPlan | None) -> EvaluateConfig:
    if config.task == "membranes" and config.truth_foreground is None:
        return dataclasses.replace(config, truth_foreground=0)
    if plan is not None:
        return dataclasses.replace(
            config, num_classes=plan.num_classes, truth_foreground=plan.foreground
        )
    return config


def _mean(values: list[Any]) -> float | None:
    defined = [float(v) for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def _mean_lists(lists: list[list[Any]]) -> list[float | None]:
    return [_mean(list(column)) for column in zip(*lists, strict=True)]


def _report(config: EvaluateConfig, images: dict[str, dict[str, Any]]) -> dict[str, Any]:
    scores = list(images.values())
    report: dict[str, Any] = {
        "task": config.task,
        "config": dataclasses.asdict(config),
        "images": images,
    }
    if config.task == "membranes":
        report["mean"] = {key: _mean([s[key] for s in scores]) for key in MEMBRANE_KEYS}
    elif config.task == "semantic":
        report["mean"] = {
            "iou": _mean_lists([s["iou"] for s in scores]),
            "dice": _mean_lists([s["dice"] for s in scores]),
            "mean_iou": _mean([s["mean_iou"] for s in scores]),
            "mean_dice": _mean([s["mean_dice"] for s in scores]),
        }
        report["pooled"] = _pool_semantic(scores)
    else:
        mean: dict[str, Any] = {key: _mean([s[key] for s in scores]) for key in _INSTANCE_SCALARS}
        for key in ("precision", "recall", "f1", "ap"):
            mean[key] = _mean_lists([s[key] for s in scores])
        report["mean"] = {"thresholds": list(scores[0]["thresholds"]), **mean}
        report["pooled"] = _with_iou50(metrics.pool_instance_scores(scores))
    return _plain(report)


def _pool_semantic(scores: list[dict[str, Any]]) -> dict[str, Any]:
    tp, fp, fn = (np.sum([s[key] for s in scores], axis=0).tolist() for key in ("tp", "fp", "fn"))
    iou: list[float | None] = []
    dice: list[float | None] = []
    for a, b, c in zip(tp, fp, fn, strict=True):
        present = a + b + c > 0
        iou.append(a / (a + b + c) if present else None)
        dice.append(2 * a / (2 * a + b + c) if present else None)
    return {
        "iou": iou,
        "dice": dice,
        "mean_iou": _mean(iou),
        "mean_dice": _mean(dice),
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def _plain(obj: Any) -> Any:
    """Plain JSON values: Python int/float/str/None, lists and dicts; non-finite -> None."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | np.ndarray):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    raise TypeError(f"not a JSON value: {type(obj).__name__}")
