"""What a stored mask means: binary, instance labels or class indices -> training classes.

Reading the file is `biounet.io.read_mask`'s job; this module only interprets the values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from biounet.errors import BiounetError

MASK_TYPES = ("binary", "instances", "classes")


def mask_to_classes(
    mask: np.ndarray,
    path: Path,
    mask_type: str | None,
    num_classes: int,
    foreground: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Turn a stored mask into class indices (and instance labels where it has them).

    Parameters
    ----------
    mask : ndarray, shape (H, W), integer
    path : Path
        For error messages.
    mask_type : {"binary", "instances", "classes"} or None
        None detects: at most two values -> "binary", more -> "instances".
        "binary": any two values; `foreground` (default: the larger value) is class 1.
        "instances": 0 = background, 1..N one object each; class 1 = any object.
        "classes": values are class indices 0..num_classes-1.
    num_classes : int
    foreground : int, optional
        Stored value of the foreground in a binary mask.

    Returns
    -------
    classes : ndarray of int64, shape (H, W)
    instances : ndarray of int32, shape (H, W), or None for binary/class masks
    mask_type : str
        The type used (after detection).
    """
    values = np.unique(mask)
    if mask_type is None:
        mask_type = "binary" if len(values) <= 2 else "instances"
    if mask_type not in MASK_TYPES:
        raise BiounetError(f"mask type must be one of {MASK_TYPES}, not {mask_type!r}")
    if mask_type == "binary":
        if len(values) > 2:
            raise BiounetError(
                f"{path}: a binary mask has at most two values, found {len(values)} "
                f"({_preview(values)}); use `mask_type` instances or classes"
            )
        if foreground is None:
            fg = values.max() if len(values) == 2 or values.max() != 0 else None
        else:
            fg = foreground
        classes = (
            (mask == fg).astype(np.int64) if fg is not None else np.zeros(mask.shape, np.int64)
        )
        return classes, None, mask_type
    if mask_type == "instances":
        if num_classes not in (2, 3):
            raise BiounetError(
                f"{path}: instance masks train 2-class models (background, cell) or 3-class "
                f"ones (with `touching` class); the model has {num_classes} classes"
            )
        if values.min() < 0:
            raise BiounetError(f"{path}: instance labels must be >= 0")
        if values.max() > np.iinfo(np.int32).max:
            raise BiounetError(
                f"{path}: instance label {values.max()} is beyond 2147483647; relabel the mask "
                "with consecutive ids (e.g. skimage.segmentation.relabel_sequential)"
            )
        return (mask > 0).astype(np.int64), mask.astype(np.int32), mask_type
    if values.min() < 0 or values.max() >= num_classes:
        raise BiounetError(
            f"{path}: mask values {_preview(values)} are not all class indices "
            f"0..{num_classes - 1}; the model has {num_classes} classes"
        )
    return mask.astype(np.int64), None, mask_type


def _preview(values: np.ndarray) -> str:
    shown = ", ".join(str(v) for v in values[:6])
    return shown + (", ..." if len(values) > 6 else "")
