"""Evaluation reports: build one from per-image scores, save, load and print it as a table.

The report layout is documented in `biounet.evaluate`; `_build_report` adds the means over
images and the dataset-level ``pooled`` scores (from `biounet.metrics`) and makes every value
plain JSON (no NaN, ``None`` where a score is undefined).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from biounet import metrics
from biounet.errors import BiounetError
from biounet.evaluate_scoring import MEMBRANE_KEYS, TASKS, EvaluateConfig, _with_iou50
from biounet.io import read_json, write_json

__all__ = ["format_table", "load_report", "save_report"]

_MEMBRANE_COLUMNS = (
    "pixel_error",
    "pixel_fscore_error",
    "rand_error",
    "v_rand",
    "v_info",
    "warping_error",
)
_INSTANCE_SCALARS = ("n_true", "n_pred", "ap_50", "f1_50", "mean_ap", "merges", "splits", "seg")


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


# -- table --------------------------------------------------------------------------------


def _columns(report: Mapping[str, Any]) -> list[tuple[str, str | tuple[str, int]]]:
    """(header, key) per column; a tuple key picks one class of a per-class list."""
    task = report["task"]
    if task == "membranes":
        return [(key, key) for key in _MEMBRANE_COLUMNS]
    if task == "semantic":
        k = len(report["mean"]["iou"])
        columns: list[tuple[str, str | tuple[str, int]]] = [
            ("mean_iou", "mean_iou"),
            ("mean_dice", "mean_dice"),
        ]
        return columns + [(f"iou_{c}", ("iou", c)) for c in range(k)]
    return [(key, key) for key in _INSTANCE_SCALARS]


def _cell(scores: Mapping[str, Any], key: str | tuple[str, int]) -> str:
    value = scores[key[0]][key[1]] if isinstance(key, tuple) else scores.get(key)
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(int(value))
    return f"{value:.4f}"


def format_table(report: Mapping[str, Any]) -> str:
    """Plain-text table: one row per image, then ``mean`` (and ``pooled``) rows."""
    rows: list[tuple[str, Mapping[str, Any]]] = list(report["images"].items())
    rows.append(("mean", report["mean"]))
    if "pooled" in report:
        rows.append(("pooled", report["pooled"]))
    columns = _columns(report)

    header = ["image"] + [name for name, _ in columns]
    body = [[name] + [_cell(scores, key) for _, key in columns] for name, scores in rows]
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


# -- building -----------------------------------------------------------------------------


def _mean(values: list[Any]) -> float | None:
    defined = [float(v) for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def _mean_lists(lists: list[list[Any]]) -> list[float | None]:
    return [_mean(list(column)) for column in zip(*lists, strict=True)]


def _build_report(config: EvaluateConfig, images: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The report of a folder: ``task``, ``config``, ``images``, ``mean`` and ``pooled``.

    Parameters
    ----------
    config : EvaluateConfig
        The resolved configuration the images were scored with.
    images : dict
        Per-image scores by file stem, in report order.
    """
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
        # Summed TP/FP/FN, then the same IoU/Dice formula as per image.
        report["pooled"] = metrics.pool_semantic_scores(scores)
    else:
        mean: dict[str, Any] = {key: _mean([s[key] for s in scores]) for key in _INSTANCE_SCALARS}
        for key in ("precision", "recall", "f1", "ap"):
            mean[key] = _mean_lists([s[key] for s in scores])
        report["mean"] = {"thresholds": list(scores[0]["thresholds"]), **mean}
        report["pooled"] = _with_iou50(metrics.pool_instance_scores(scores))
    return _plain(report)


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
