"""From membrane probabilities to a membrane mask whose gaps are closed.

A membrane mask is judged by the cells it encloses: one faint stretch of membrane (p = 0.45
where it should be 1) joins two cells, and the 4-connected regions of the mask merge them. The
pixel error hardly notices; the Rand error does. So besides the plain threshold this module
can draw the lines of a seeded watershed into the mask:

1. mask = membrane probability above `threshold` (0.5: the argmax of a 2-class model);
2. optionally the probability is smoothed (`smooth`, a Gaussian's sigma in px);
3. seeds = 4-connected regions where it is below `seed_threshold` (clear cell interiors),
   those smaller than `min_seed` px dropped;
4. a watershed of the (smoothed) probability from the seeds floods the image; its lines, one
   pixel wide and 8-connected (so no 4-connected region crosses them), join the mask.

Where the network drew a membrane the lines lie inside it and change nothing; where it drew a
gap between two seeds, a line closes it. The pixel error changes by those line pixels alone.
All steps are scipy.ndimage / scikit-image operations on the whole map. Maps too large for
memory go through `classes_in_chunks`: each block is computed from a window `margin` px wider
on every side, which gives the whole map's result wherever the cells next to the block (the
basins that compete for its pixels) and the smoothing fit in the margin (tested on EM slices).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

from biounet.checks import check_number
from biounet.errors import BiounetError
from biounet.instances import chunk_boxes, window_box


@dataclass(frozen=True)
class MembraneConfig:
    """How a membrane mask is made from class probabilities.

    Parameters
    ----------
    membrane_class : int
        Class index of the membranes in the probabilities.
    threshold : float
        Membrane probability above which a pixel is membrane.
    seed_threshold : float or None
        Membrane probability below which a pixel is a clear cell interior (a seed of the
        watershed whose lines close gaps), in (0, threshold]; None: the threshold alone, no
        lines.
    min_seed : int
        Seeds smaller than this many pixels are dropped (speckle inside a membrane would
        otherwise split it with lines of its own).
    smooth : float
        Sigma in px of a Gaussian applied to the probability before seeding and flooding
        (0: none).
    """

    membrane_class: int = 1
    threshold: float = 0.5
    seed_threshold: float | None = None
    min_seed: int = 10
    smooth: float = 0.0

    def __post_init__(self) -> None:
        check_number("threshold", self.threshold, low=0, high=1, low_open=True, high_open=True)
        check_number("seed_threshold", self.seed_threshold, low=0, high=self.threshold,
                     low_open=True, none_ok=True)  # fmt: skip
        check_number("min_seed", self.min_seed, low=1, integer=True)
        check_number("smooth", self.smooth, low=0, high=20)
        check_number("membrane_class", self.membrane_class, low=0, integer=True)

    def to_dict(self) -> dict:
        return asdict(self)


def reach(config: MembraneConfig) -> int:
    """Px of context the smoothing alone needs (scipy's Gaussian reaches 4 sigma): block-wise
    masks need a margin wider than this, and than the cells beside a block."""
    return int(4 * config.smooth + 0.5) + 1


def membrane_mask(probs: np.ndarray, config: MembraneConfig) -> np.ndarray:
    """Membrane mask of softmax probabilities, gaps between clear interiors closed.

    Parameters
    ----------
    probs : ndarray of float, shape (K, H, W)
        Class probabilities (softmax over K).
    config : MembraneConfig

    Returns
    -------
    ndarray of bool, shape (H, W)
        True on membranes.

    Examples
    --------
    Two cells joined by a faint stretch of membrane (p = 0.4) become two:

    >>> p = np.zeros((2, 5, 7), np.float32)
    >>> p[1, :, 3] = 1.0; p[1, 2, 3] = 0.4; p[0] = 1 - p[1]
    >>> membrane_mask(p, MembraneConfig())[:, 3].tolist()
    [True, True, False, True, True]
    >>> membrane_mask(p, MembraneConfig(seed_threshold=0.1, min_seed=1))[:, 3].tolist()
    [True, True, True, True, True]
    """
    if probs.ndim != 3 or not 0 <= config.membrane_class < probs.shape[0]:
        raise BiounetError(
            f"membrane class {config.membrane_class} is not among the {probs.shape[0]} "
            "classes of these probabilities"
        )
    membrane = np.asarray(probs[config.membrane_class], dtype=np.float32)
    mask = membrane > config.threshold
    if config.seed_threshold is None:
        return mask
    if config.smooth:
        membrane = ndimage.gaussian_filter(membrane, config.smooth)
    seeds, count = ndimage.label(membrane < config.seed_threshold)  # 4-connected
    sizes = np.bincount(seeds.ravel())
    keep = sizes >= config.min_seed
    keep[0] = False
    if keep.sum() < 2:  # one basin or none: no line to draw
        return mask
    seeds = np.where(keep[seeds], seeds, 0)
    flooded = watershed(membrane, seeds, watershed_line=True)
    return mask | (flooded == 0)


def membrane_classes(probs: np.ndarray, config: MembraneConfig) -> np.ndarray:
    """uint8 class indices (H, W): the membrane class on `membrane_mask`, elsewhere the
    likeliest other class."""
    membrane = membrane_mask(probs, config)
    others = np.delete(probs, config.membrane_class, axis=0).argmax(0)
    others += others >= config.membrane_class  # back to the classes' own indices
    return np.where(membrane, config.membrane_class, others).astype(np.uint8)


def classes_in_chunks(probs, out, config: MembraneConfig, chunk: int = 1024, margin: int = 128):
    """`membrane_classes` of a map too large for memory, block by block.

    Parameters
    ----------
    probs : array-like, shape (K, H, W), float
        Class probabilities; anything numpy-sliceable (ndarray, memory map, zarr array).
    out : array-like, shape (H, W), uint8
        Receives the class indices.
    chunk : int
        Side of the blocks written.
    margin : int
        Context read around each block (see the module's docstring).
    """
    _, height, width = probs.shape
    for block in chunk_boxes((height, width), chunk):
        (wy0, wy1), (wx0, wx1) = window_box(block, (height, width), margin)
        (y0, y1), (x0, x1) = block
        classes = membrane_classes(np.asarray(probs[:, wy0:wy1, wx0:wx1]), config)
        out[y0:y1, x0:x1] = classes[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0]
