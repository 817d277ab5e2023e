"""Test-time augmentation tile by tile: the 8 rotations and flips of each tile, averaged.

TTA averages the probabilities of the 8 views of the image (rotations by multiples of 90
degrees, each with and without a mirror flip), each predicted with overlap-tile inference and
turned back. Done per view of the whole image it needs the whole image in memory; here it is
done per tile, so that streamed TIFFs and dask blocks get it too, with the same result.

Why the windows are a pooling period larger: tiled prediction of a view puts the pooling grid
on that view's own top-left corner (`biounet.tiling`), and a view that flips an axis puts it
at the image's far edge, which need not lie on the grid of the unturned image. So for each
view the tile's block is found in the view's coordinates and widened to the grid there: the
window read is `2**depth` px longer per axis, and the block sits `delta` px inside its output.
The result is the whole-image TTA's, to float rounding (tests/test_tta.py), at
((tile_in + 2**depth) / tile_in)**2 of its cost (+3 % at 836 px tiles). Mirroring commutes with
turning an image, so the turned window of the mirrored image is the mirrored window of the
turned one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Box = tuple[tuple[int, int], tuple[int, int]]  # ((y0, y1), (x0, x1)), ends excluded


def dihedral_views() -> list[tuple[int, bool]]:
    """The 8 rotations by multiples of 90 degrees (``np.rot90``'s k), each with and without a
    mirror flip of the columns afterwards."""
    return [(k, flip) for k in range(4) for flip in (False, True)]


def to_view(array: np.ndarray, view: tuple[int, bool]) -> np.ndarray:
    """The view of the last two axes of `array` (a copy, C-contiguous)."""
    k, flip = view
    out = np.rot90(array, k, axes=(-2, -1))
    return np.ascontiguousarray(out[..., ::-1] if flip else out)


def from_view(array: np.ndarray, view: tuple[int, bool]) -> np.ndarray:
    """Undo `to_view` (a view of `array`, not a copy)."""
    k, flip = view
    return np.rot90(array[..., ::-1] if flip else array, -k, axes=(-2, -1))


def _point(view: tuple[int, bool], shape: tuple[int, int], y: int, x: int) -> tuple[int, int]:
    """Where pixel (y, x) of an image of `shape` lies in its view (any integer y, x)."""
    k, flip = view
    height, width = shape
    for _ in range(k % 4):  # np.rot90 once: new[i, j] = old[j, W - 1 - i]
        y, x, height, width = width - 1 - x, y, width, height
    return (y, width - 1 - x) if flip else (y, x)


def view_box(view: tuple[int, bool], shape: tuple[int, int], box: Box) -> Box:
    """The image of `box` (in an image of `shape`) in the view's coordinates."""
    (y0, y1), (x0, x1) = box
    (a, b), (c, d) = _point(view, shape, y0, x0), _point(view, shape, y1 - 1, x1 - 1)
    return (min(a, c), max(a, c) + 1), (min(b, d), max(b, d) + 1)


def _view_shape(view: tuple[int, bool], shape: tuple[int, int]) -> tuple[int, int]:
    return shape if view[0] % 2 == 0 else shape[::-1]


def image_box(view: tuple[int, bool], shape: tuple[int, int], box: Box) -> Box:
    """The inverse of `view_box`: the box of the image whose view is `box`."""
    k, flip = view
    inverse = _view_shape(view, shape)
    # undo the flip (its own inverse), then rotate back by 4 - k quarter turns
    (y0, y1), (x0, x1) = box
    if flip:
        x0, x1 = inverse[1] - x1, inverse[1] - x0
    return view_box(((4 - k) % 4, False), inverse, ((y0, y1), (x0, x1)))


@dataclass(frozen=True)
class ViewWindow:
    """How one view of one tile is computed: the image window to read (turned by `view`),
    and where the tile's block lies in the network's output of it."""

    view: tuple[int, bool]
    window: Box  # in image coordinates, mirrored outside the image
    offset: tuple[int, int]  # block's first output row, column in the view's output


def view_windows(shape: tuple[int, int], block: Box, axes: tuple, period: int) -> list[ViewWindow]:
    """The 8 views' windows of the tile that keeps `block` (image coordinates).

    Parameters
    ----------
    shape : (H, W) of the image
    block : the tile's output block ((oy, oy + tile_out_y), (ox, ox + tile_out_x))
    axes : (AxisPlan, AxisPlan) of the plan's y and x axes (context, crop, tile_in, tile_out)
    period : the pooling period ``2**depth``, on which the view's tile origins lie
    """
    windows = []
    for view in dihedral_views():
        turned = view[0] % 2 == 1  # the view's rows are the image's columns
        plans = axes[::-1] if turned else axes
        (a0, a1), (b0, b1) = view_box(view, shape, block)
        spans, offsets = [], []
        for start, plan in zip((a0, b0), plans, strict=True):
            origin = start - start % period  # on the view's own grid
            lo = origin - plan.context
            spans.append((lo, lo + plan.tile_in + period))
            offsets.append(plan.crop + start - origin)
        windows.append(ViewWindow(view, image_box(view, shape, tuple(spans)), tuple(offsets)))
    return windows


def bounding_box(windows: list[ViewWindow]) -> Box:
    """The smallest box holding every window (read once, cropped per view)."""
    ys = [w.window[0] for w in windows]
    xs = [w.window[1] for w in windows]
    return (min(y for y, _ in ys), max(y for _, y in ys)), (
        min(x for x, _ in xs),
        max(x for _, x in xs),
    )


def average_views(
    forward: Callable[[np.ndarray], np.ndarray],
    reads: list[np.ndarray],
    corners: list[tuple[int, int]],
    plans: list[list[ViewWindow]],
    size: tuple[int, int],
) -> np.ndarray:
    """Log of the mean softmax over the 8 views, per tile: ``(B, K, size_y, size_x)`` float32
    "logits" whose softmax is the averaged probabilities.

    `reads[i]`: tile i's prepared bounding window (C, h, w), whose top-left is image pixel
    `corners[i]`; `plans[i]`: its `view_windows`; `size`: the block's (tile_out_y, tile_out_x).
    One forward call per view, on the batch's windows of that view.
    """
    total = np.zeros((len(reads), 0), np.float32)
    for v in range(len(plans[0])):
        batch = []
        for read, (cy, cx), views in zip(reads, corners, plans, strict=True):
            (y0, y1), (x0, x1) = views[v].window
            batch.append(to_view(read[:, y0 - cy : y1 - cy, x0 - cx : x1 - cx], views[v].view))
        logits = forward(np.stack(batch))
        view = plans[0][v].view
        h, w = size[::-1] if view[0] % 2 == 1 else size
        blocks = []
        for out, views in zip(logits, plans, strict=True):
            dy, dx = views[v].offset
            blocks.append(from_view(out[:, dy : dy + h, dx : dx + w], view))
        block = np.stack(blocks)
        block = np.exp(block - block.max(axis=1, keepdims=True))
        block /= block.sum(axis=1, keepdims=True)
        total = block if total.size == 0 else total + block
    # the views' mean; probabilities far below float32's resolution count as 1e-30
    return np.log(np.maximum(total / len(plans[0]), 1e-30), dtype=np.float32)
