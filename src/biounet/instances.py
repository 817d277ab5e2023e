"""From class probabilities to an instance label image (touching cells kept apart).

The network was trained on targets where the contact pixels of touching cells are background
(the paper's carved gaps, 2-class models) or a third "border" class (3-class models). So:

1. cell cores = probability of the cell class above a threshold (for 3-class models: cell
   wins over border and background), with holes filled and objects below `min_size` removed;
2. seeds = connected components of the cores (4-connectivity, so cores that touch only at a
   corner stay apart);
3. the seeds grow back over the foreground (cell or border pixels, or `expand` px of the
   carved gap for 2-class models) by a watershed on the cell probability, so each pixel goes
   to the seed it is best connected to and no seed crosses another;
4. ids are relabelled 1..N consecutively.

All steps are scikit-image / scipy.ndimage operations on the whole probability map; prediction
stitches tiles exactly, so objects are never cut or duplicated at tile seams.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from skimage.segmentation import expand_labels, relabel_sequential, watershed


@dataclass(frozen=True)
class InstanceConfig:
    """Post-processing of class probabilities into instances.

    Parameters
    ----------
    cell_class : int
        Class index of the cells (1 for background/cell[/border] models).
    border_class : int or None
        Class index of the explicit border class of 3-class models (None for 2-class).
    threshold : float
        Cell probability above which a pixel is a cell core.
    min_size : int
        Cores smaller than this many pixels are dropped (noise).
    expand : int
        Pixels by which cells grow back into the background after the watershed: the
        carved gap of 2-class training is ~1 px per cell (0 for 3-class models).
    fill_holes : bool
        Fill holes inside cores before seeding.
    """

    cell_class: int = 1
    border_class: int | None = None
    threshold: float = 0.5
    min_size: int = 15
    expand: int = 1
    fill_holes: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def instances_from_probabilities(probs: np.ndarray, config: InstanceConfig) -> np.ndarray:
    """Instance labels from softmax probabilities.

    Parameters
    ----------
    probs : ndarray, shape (K, H, W), float
        Class probabilities (softmax over K).
    config : InstanceConfig

    Returns
    -------
    ndarray of uint32, shape (H, W)
        0 = background, 1..N one cell each, consecutive.
    """
    cell = probs[config.cell_class]
    if config.border_class is None:
        cores = cell > config.threshold
        region = cores
    else:
        border = probs[config.border_class]
        cores = (cell > config.threshold) & (cell >= border)
        region = (cell + border) > config.threshold
    if config.fill_holes:
        cores = ndimage.binary_fill_holes(cores)
        region = ndimage.binary_fill_holes(region | cores)
    seeds, _ = ndimage.label(cores)
    if config.min_size > 1:
        # bincount rather than skimage's remove_small_objects, whose size argument changed
        # meaning between releases (min_size -> max_size in 0.26).
        small = np.bincount(seeds.ravel()) < config.min_size
        small[0] = False
        seeds[small[seeds]] = 0
    labels = watershed(-cell, markers=seeds, mask=region | (seeds > 0))
    if config.expand > 0:
        labels = expand_labels(labels, distance=config.expand)
    labels, _, _ = relabel_sequential(labels)
    return labels.astype(np.uint32)
