"""What the napari widget does, without Qt: load a model, predict a layer, add the result.

`snapshot` copies what a prediction needs from the layer (on the main thread: layers belong
to it); `predict_layer` runs in the widget's worker thread and touches no layer or viewer;
`add_result` runs on the main thread and adds the layers: a Labels layer for masks and
instances, one Image layer per class for probabilities, each at the input layer's scale and
translation so that it overlays the image at the right size. `segment` is all three in one
call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import biounet
from biounet.errors import BiounetError

OUTPUTS = ("mask", "prob", "instances")


@dataclass(frozen=True)
class Snapshot:
    """An image layer's data and placement, as read on the main thread."""

    data: np.ndarray
    name: str
    scale: tuple[float, ...]
    translate: tuple[float, ...]
    rgb: bool


@dataclass(frozen=True)
class Result:
    """A prediction ready to become layers: the data and how to show it."""

    data: np.ndarray  # (..., H, W) labels, or (K, ..., H, W) probabilities
    kind: str  # "labels" or "image"
    options: dict  # keyword arguments of viewer.add_labels / viewer.add_image


def snapshot(layer) -> Snapshot:
    return Snapshot(np.asarray(layer.data), str(layer.name), tuple(layer.scale),
                    tuple(layer.translate), bool(getattr(layer, "rgb", False)))  # fmt: skip


def model_choices() -> list[str]:
    """The shipped models' names, for the widget's menu."""
    return sorted(biounet.models())


def stored_tta(source: str) -> bool:
    """Whether the model `source` (a name or a folder) predicts with TTA by default
    (``postprocess.tta``); False where it cannot be read (the run will say why)."""
    from biounet.modeldir import load_info, resolve_model

    try:
        info = load_info(resolve_model(source))
    except (BiounetError, OSError):
        return False
    return bool((info.postprocess or {}).get("tta", False))


def load_model(source: str) -> biounet.Model:
    """`biounet.load`, kept between runs; a model folder whose weights changed (retrained)
    is loaded again."""
    weights = Path(source) / "weights.safetensors"
    stamp = weights.stat().st_mtime_ns if weights.is_file() else None
    return _load(str(source), stamp)


@functools.lru_cache(maxsize=2)
def _load(source: str, stamp: int | None) -> biounet.Model:
    return biounet.load(source)


def predict_layer(
    image: Snapshot,
    source: str,
    output: str = "mask",
    tta: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Result:
    """Segment an image layer's `snapshot` with the model `source` (a name or a folder).

    Takes a 2-D image (RGB; or with the model's channels first or last), or a stack
    ``(Z, H, W)`` of one-channel planes, segmented plane by plane. An RGB image given to a
    one-channel model is segmented as gray (the mean of R, G and B).
    """
    if output not in OUTPUTS:
        raise BiounetError(f"output must be one of {', '.join(OUTPUTS)}, not {output!r}")
    model = load_model(str(source))
    planes, channel_axis, spatial = _layout(image, model.in_channels)
    results = []
    for i, plane in enumerate(planes):
        report = _plane_progress(progress, i, len(planes))
        results.append(model.predict(plane, output, tta=tta, channel_axis=channel_axis,
                                     progress=report))  # fmt: skip
    stack = len(spatial) == 3
    # a stack's planes along the axis before (H, W): (Z, H, W) labels, (K, Z, H, W) p
    result = np.stack(results, axis=1 if output == "prob" else 0) if stack else results[0]
    placement = {"scale": tuple(image.scale[a] for a in spatial),
                 "translate": tuple(image.translate[a] for a in spatial)}  # fmt: skip
    return Result(result, *_display(image.name, output, model, placement))


def _layout(image: Snapshot, channels: int) -> tuple[list[np.ndarray], int | None, tuple]:
    """(planes to predict, their channel axis, the layer's spatial axes of the result)."""
    data = image.data
    if image.rgb:  # napari's RGB(A) layers: colour last, 2-D layer axes
        colours = data[..., :3]
        if channels == 1:
            return [colours.astype(np.float32).mean(axis=-1)], None, (0, 1)
        if channels == 3 and data.ndim == 3:
            return [colours], -1, (0, 1)
    elif data.ndim == 2 and channels == 1:
        return [data], None, (0, 1)
    elif data.ndim == 3 and channels > 1 and data.shape[0] == channels:
        return [data], 0, (1, 2)
    elif data.ndim == 3 and data.shape[-1] == channels:  # channels last, (H, W, 1) too
        return [data], -1, (0, 1)
    elif data.ndim == 3 and channels == 1:
        return list(data), None, (0, 1, 2)
    raise BiounetError(
        f"layer {image.name!r} has shape {data.shape}; this model takes 2-D images with "
        f"{channels} channel(s) (or RGB), or a (Z, H, W) stack for one channel"
    )


def _plane_progress(progress, index: int, count: int):
    if progress is None:
        return None

    def report(done: int, total: int) -> None:
        progress(index * total + done, count * total)

    return report


def _display(name: str, output: str, model: biounet.Model, placement: dict) -> tuple[str, dict]:
    """How a result shows: its layer type and options, placed like the input layer."""
    if output == "prob":
        names = [f"{name} p({c})" for c in model.classes]
        return "image", {"name": names, **placement, "channel_axis": 0,
                         "contrast_limits": [0.0, 1.0], "colormap": "magma",
                         "blending": "additive"}  # fmt: skip
    return "labels", {"name": f"{name} {output}", **placement}


def add_result(viewer, result: Result) -> list:
    """Add `result` to `viewer` (a napari Viewer or ViewerModel); returns the new layers."""
    if result.kind == "labels":
        return [viewer.add_labels(result.data, **result.options)]
    layers = viewer.add_image(result.data, **result.options)
    return list(layers) if isinstance(layers, list | tuple) else [layers]


def segment(viewer, layer, source: str, output: str = "mask", tta: bool | None = None) -> list:
    """`snapshot`, `predict_layer` and `add_result`, in this thread."""
    return add_result(viewer, predict_layer(snapshot(layer), source, output, tta))
