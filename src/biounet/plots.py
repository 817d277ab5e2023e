"""Pictures: training curves and segmentation overlays (figures and RGB arrays; no files)."""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def training_curves(history: list[dict]) -> Figure:
    """Training loss (and validation loss, Dice) against step.

    Parameters
    ----------
    history : list of dict
        Rows with "step", "loss" and optionally "val_loss", "val_dice".
    """
    fig = Figure(figsize=(8, 3.2))
    FigureCanvasAgg(fig)
    ax_loss, ax_dice = fig.subplots(1, 2)
    steps = [r["step"] for r in history]
    ax_loss.plot(steps, [r["loss"] for r in history], label="train")
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    if val:
        ax_loss.plot(*zip(*val, strict=True), "o-", label="validation")
    ax_loss.set(xlabel="step", ylabel="loss (weighted cross-entropy [+ Dice])")
    ax_loss.legend()
    dice = [(r["step"], r["val_dice"]) for r in history if "val_dice" in r]
    if dice:
        ax_dice.plot(*zip(*dice, strict=True), "o-", color="C1")
    # The foreground classes' Dice (`biounet.loop.validate`): background's would read ~0.96
    # even for poor masks.
    ax_dice.set(xlabel="step", ylabel="validation Dice, foreground classes", ylim=(0, 1))
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Gray display image from a (C, H, W) or (H, W) normalised image (first channel)."""
    gray = image[0] if image.ndim == 3 else image
    return (np.clip(gray, 0.0, 1.0) * 255).astype(np.uint8)


def overlay(image: np.ndarray, classes: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend class colours (class 0 left clear) over a gray image.

    Parameters
    ----------
    image : ndarray, shape (H, W), uint8
    classes : ndarray, shape (H, W), integer class indices

    Returns
    -------
    ndarray of uint8, shape (H, W, 3)
    """
    palette = np.array(
        [[0, 0, 0], [255, 40, 40], [40, 200, 255], [255, 210, 0], [80, 255, 80], [220, 80, 255]],
        np.float32,
    )
    rgb = np.repeat(image[..., None].astype(np.float32), 3, axis=-1)
    fg = classes > 0
    colours = palette[np.minimum(classes, len(palette) - 1)]
    rgb[fg] = (1 - alpha) * rgb[fg] + alpha * colours[fg]
    return rgb.round().astype(np.uint8)


def weight_figure(classes: np.ndarray, weights: np.ndarray) -> Figure:
    """The paper's Fig. 3c/d: the mask, and the weight map as a heat map over it."""
    fig = Figure(figsize=(10, 4.6))
    FigureCanvasAgg(fig)
    ax_mask, ax_w = fig.subplots(1, 2)
    ax_mask.imshow(classes, cmap="gray", interpolation="nearest")
    ax_mask.set_title("classes")
    ax_w.imshow(classes > 0, cmap="gray", interpolation="nearest")
    shown = ax_w.imshow(weights, cmap="jet", alpha=0.75, interpolation="nearest")
    ax_w.set_title(f"weight map (max {weights.max():.2f})")
    bar = fig.colorbar(shown, ax=ax_w, fraction=0.046, pad=0.04)
    bar.set_label("pixel weight w(x) in the loss")
    for ax in (ax_mask, ax_w):
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def augment_grid(
    examples: list[tuple[np.ndarray, np.ndarray]], columns: int | None = None
) -> Figure:
    """The original and its augmented versions with their mask contours on top, in a grid.

    Parameters
    ----------
    examples : list of (image (C, H, W) float, classes (H, W) int)
        The original first (titled so), then the augmented samples.
    columns : int, optional
        Default: the widest of 5, 4, 3 or 2 columns that fills every row (one row for a
        count none divides, up to 7).
    """
    from skimage.segmentation import find_boundaries

    n = len(examples)
    if columns is None:
        columns = next((c for c in (5, 4, 3, 2) if n % c == 0 and c <= n), min(n, 7))
    rows = -(-n // columns)
    fig = Figure(figsize=(3 * columns, 3.2 * rows))
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax in axes[n:]:
        fig.delaxes(ax)  # no empty cells
    for k, (ax, (image, classes)) in enumerate(zip(axes, examples, strict=False)):
        rgb = np.repeat(to_uint8(image)[..., None], 3, axis=-1)
        # Bright yellow: visible on dark membranes and on light cells alike.
        rgb[find_boundaries(classes, mode="inner")] = (255, 225, 0)
        ax.imshow(rgb, interpolation="nearest")
        ax.set_title("original" if k == 0 else f"augmented {k}", fontsize=11,
                     fontweight="bold" if k == 0 else "normal")  # fmt: skip
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def instance_colours(count: int) -> np.ndarray:
    """`count` bright, saturated colours (uint8 RGB, shape (count, 3)) that neighbours in id
    order tell apart: hues a golden-ratio step apart (deep blue left out), saturation >=
    0.6, value >= 0.85, so none is gray or dark next to gray nuclei or a black background."""
    from matplotlib.colors import hsv_to_rgb

    k = np.arange(count)
    hue = (k * 0.618034) % 1.0 * 0.88
    hue = np.where(hue >= 0.6, hue + 0.12, hue)  # no deep blue: dark on black at any value
    hsv = np.stack([hue, 0.6 + 0.4 * ((k * 7) % 3) / 2, 0.85 + 0.15 * ((k * 5) % 2)], axis=-1)
    return (hsv_to_rgb(hsv) * 255).round().astype(np.uint8)


def instance_overlay(image: np.ndarray, labels: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """Each instance's 2-px contour in a bright colour of its own over a gray image.

    Parameters
    ----------
    image : ndarray, shape (H, W), uint8
    labels : ndarray, shape (H, W), integer instance ids (0 = background)
    fill : float
        Opacity of a fill in the same colour (0: contours only).

    Returns
    -------
    ndarray of uint8, shape (H, W, 3)
    """
    from scipy import ndimage

    colours = instance_colours(int(labels.max()) + 1)
    rgb = np.repeat(image[..., None], 3, axis=-1).astype(np.float32)
    inside = labels > 0
    if fill > 0:
        rgb[inside] = (1 - fill) * rgb[inside] + fill * colours[labels[inside]]
    # Pixels within 2 px of another object or the background: a contour 2 px thick, inside
    # its object, so touching objects keep a line each.
    near = (ndimage.minimum_filter(labels, size=5) != labels) | (
        ndimage.maximum_filter(labels, size=5) != labels
    )
    edge = inside & near
    rgb[edge] = colours[labels[edge]]
    return rgb.round().astype(np.uint8)
