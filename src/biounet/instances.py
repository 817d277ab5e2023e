"""From class probabilities to an instance label image (touching cells kept apart).

The network was trained on targets where the contact pixels of touching cells are background
(the paper's carved gaps, 2-class models) or a third "border" class (3-class models). So:

1. cell cores = probability of the cell class above `seed_threshold` (for 3-class models:
   cell also wins over border), with small holes filled and objects below `min_size` removed;
2. seeds = connected components of the cores (4-connectivity, so cores that touch only at a
   corner stay apart);
3. the seeds grow back over the foreground (cell, or cell + border, probability above
   `threshold`), then by `expand` px, by a watershed on the cell probability, so each pixel goes
   to the seed it is best connected to and no seed crosses another;
4. optionally, the background pixels of gaps at most `gap` px wide between two cells -- the
   contacts that training carved apart, 2-3 px wide -- go to the nearer cell, so touching
   cells get their contact back without every outline growing as `expand` makes it;
5. ids are relabelled 1..N consecutively.

All steps are scikit-image / scipy.ndimage operations on the whole probability map; prediction
stitches tiles exactly, so objects are never cut or duplicated at tile seams.

Maps too large for memory go through `instances_in_chunks`: every step above acts within one
clump of touching cells (plus `expand` px; cells within ``2 * gap`` px count as touching),
so blocks read with a margin wider than the largest clump give each clump exactly as the
whole map would; each object is kept by the one block holding its seed's first pixel, and
ids are ranked by that pixel, as `ndimage.label` numbers them. The result equals
`instances_from_probabilities` (tested); a clump wider than the margin is logged.
No library labels a watershed in blocks like this (dask-image's
`label` merges connected components across blocks, not seeded watersheds), hence by hand.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from skimage.segmentation import expand_labels, relabel_sequential, watershed

from biounet.checks import check_number
from biounet.errors import BiounetError

logger = logging.getLogger(__name__)


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
        Foreground probability (cell, or cell + border) above which a pixel belongs to a cell:
        sets the cells' extent.
    seed_threshold : float or None
        Cell probability above which a pixel is a cell core (a seed); None means `threshold`.
        Higher than `threshold`, it splits touching cells whose dividing gap the network drew
        faintly (a gap at p = 0.7 still joins two cores at 0.5, not at 0.9) without shrinking
        them.
    min_size : int
        Cores smaller than this many pixels are dropped (noise).
    expand : int
        Pixels by which cells grow into the background after the watershed (restores a
        carved gap where the network draws cells too small).
    gap : int
        Then, the background pixels of gaps at most `gap` px wide between two cells go to the
        nearer one: the carved contacts (2-3 px wide) close at ``gap=3`` while outlines away
        from other cells stay as drawn. 0: off.
    fill_holes : bool
        Fill holes in the cores and the foreground.
    max_hole : int
        Only holes whose bounding box fits in ``max_hole x max_hole`` px are filled: a hole in
        a nucleus, not the space enclosed by a ring of touching cells (which may hold cells of
        its own), and a local decision, so blockwise post-processing stays exact.
    """

    cell_class: int = 1
    border_class: int | None = None
    threshold: float = 0.5
    seed_threshold: float | None = None
    min_size: int = 15
    expand: int = 1
    fill_holes: bool = True
    max_hole: int = 32
    gap: int = 0

    def __post_init__(self) -> None:
        # configs come from model files too: refuse what would silently label nothing
        check_number("cell_class", self.cell_class, low=0, integer=True)
        check_number("border_class", self.border_class, low=0, integer=True, none_ok=True)
        check_number("threshold", self.threshold, low=0, high=1, low_open=True, high_open=True)
        check_number("seed_threshold", self.seed_threshold, low=0, high=1, low_open=True,
                     high_open=True, none_ok=True)  # fmt: skip
        check_number("min_size", self.min_size, low=0, integer=True)
        check_number("max_hole", self.max_hole, low=0, integer=True)
        check_number("expand", self.expand, low=0, high=1000, integer=True)
        check_number("gap", self.gap, low=0, high=50, integer=True)  # (2 gap + 1)^2 passes
        if self.border_class is not None and self.border_class == self.cell_class:
            raise BiounetError(f"border_class {self.border_class} is the cell_class")
        if not isinstance(self.fill_holes, bool):
            raise BiounetError(f"`fill_holes` must be true or false, not {self.fill_holes!r}")
        if self.seed_threshold is not None and self.seed_threshold < self.threshold:
            raise BiounetError(
                f"seed_threshold {self.seed_threshold} is below threshold {self.threshold}: "
                "seeds must lie inside the cells"
            )

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
    labels, _ = _seeded_labels(probs, config)
    labels, _, _ = relabel_sequential(labels)
    return labels.astype(np.uint32)


def _seeded_labels(probs: np.ndarray, config: InstanceConfig) -> tuple[np.ndarray, np.ndarray]:
    """Labels numbered by their seeds (not consecutive), and the seeds."""
    cell = probs[config.cell_class]
    seed = config.threshold if config.seed_threshold is None else config.seed_threshold
    if config.border_class is None:
        cores = cell > seed
        region = cell > config.threshold
    else:
        border = probs[config.border_class]
        cores = (cell > seed) & (cell >= border)
        region = (cell + border) > config.threshold
    if config.fill_holes:
        cores = _fill_small_holes(cores, config.max_hole)
        region = _fill_small_holes(region | cores, config.max_hole)
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
    if config.gap > 0:
        labels = _close_contacts(labels, config.gap)
    return labels, seeds


def _close_contacts(labels: np.ndarray, gap: int) -> np.ndarray:
    """`labels` with the background pixels of gaps at most `gap` px wide between two cells
    given to the nearer cell.

    A pixel lies in such a gap when its distances to the nearest cell (d1) and to the nearest
    pixel of another cell (d2) sum to at most ``gap + 1`` (across a straight gap of width w,
    d1 + d2 = w + 1 everywhere) -- the paper's d1 + d2, here deciding which pixels to give
    back. d2 is taken over the offsets within `gap` px, exactly, so nothing farther reaches.
    """
    height, width = labels.shape
    d1, (iy, ix) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
    nearest = labels[iy, ix]
    d2 = np.full(labels.shape, np.inf)
    padded = np.pad(labels, gap)
    for dy in range(-gap, gap + 1):
        for dx in range(-gap, gap + 1):
            r = float(np.hypot(dy, dx))
            if r > gap or r == 0:
                continue
            shifted = padded[gap + dy : gap + dy + height, gap + dx : gap + dx + width]
            other = (shifted > 0) & (shifted != nearest)
            d2[other] = np.minimum(d2[other], r)
    between = (labels == 0) & (d1 + d2 <= gap + 1)
    return np.where(between, nearest, labels)


def _fill_small_holes(mask: np.ndarray, max_side: int) -> np.ndarray:
    """`mask` with its enclosed background components of bounding box <= max_side filled."""
    holes, _ = ndimage.label(~mask)  # 4-connected background, as binary_fill_holes floods
    fill = [False]
    for box in ndimage.find_objects(holes):
        fill.append(
            box is not None
            and all(
                b.start > 0 and b.stop < n and b.stop - b.start <= max_side
                for b, n in zip(box, mask.shape, strict=True)
            )
        )
    return mask | np.asarray(fill)[holes]


def edge_band(config: InstanceConfig) -> int:
    """Px from a block's cut edge within which a clump may continue beyond the edge, or border
    a hole that does; `instances_in_chunks` needs a margin wider than this."""
    return 1 + config.expand + 2 * config.gap + (config.max_hole + 1 if config.fill_holes else 0)


def instances_in_chunks(
    probs, out, config: InstanceConfig, chunk: int = 1024, margin: int = 128
) -> int:
    """`instances_from_probabilities` of a map too large for memory, block by block.

    Parameters
    ----------
    probs : array-like, shape (K, H, W), float
        Class probabilities; anything numpy-sliceable (ndarray, memory map, zarr array).
    out : array-like, shape (H, W), uint32, zero-filled
        Receives the labels (0 = background, 1..N consecutive).
    config : InstanceConfig
    chunk : int
        Side of the blocks each object is assigned to.
    margin : int
        Context read around each block: the widest clump of touching cells (plus `expand`
        and `max_hole`) must fit in it for the result to equal the whole-map one.

    Returns
    -------
    int
        The number of objects N. (Where a clump was logged as wider than the margin, a later
        block may overwrite an earlier one's object, and some of the ids 1..N be missing.)
    """
    _, height, width = probs.shape
    band = edge_band(config)
    if margin <= band:
        raise BiounetError(f"margin {margin} px must exceed {band} px (expand, gap, max_hole)")
    keys = [np.zeros(1, np.int64)]  # per provisional id: raster index of its seed's first pixel
    next_id, too_wide = 1, 0
    for block in chunk_boxes((height, width), chunk):
        window = window_box(block, (height, width), margin)
        (wy0, wy1), (wx0, wx1) = window
        local, found, wide = owned_objects(
            np.asarray(probs[:, wy0:wy1, wx0:wx1]), config, window, block, (height, width)
        )
        if not len(found):
            continue
        keys.append(found)
        too_wide += wide
        region = np.asarray(out[wy0:wy1, wx0:wx1])
        mine = local > 0
        region[mine] = local[mine] + np.uint32(next_id - 1)
        out[wy0:wy1, wx0:wx1] = region
        next_id += len(found)
    if too_wide:
        logger.warning(
            "%d object(s) in clumps wider than the %d px margin: they may differ from "
            "whole-image post-processing; raise the margin",
            too_wide,
            margin,
        )
    final = rank_ids(keys[1:])
    for (y0, y1), (x0, x1) in chunk_boxes((height, width), chunk):
        out[y0:y1, x0:x1] = final[np.asarray(out[y0:y1, x0:x1])]
    return len(final) - 1


Box = tuple[tuple[int, int], tuple[int, int]]  # ((y0, y1), (x0, x1)), ends excluded


def chunk_boxes(shape: tuple[int, int], chunk: int) -> list[Box]:
    """The blocks of side `chunk` (the last ones shorter) that tile `shape`, in raster order."""
    height, width = shape
    return [
        ((y0, min(y0 + chunk, height)), (x0, min(x0 + chunk, width)))
        for y0 in range(0, height, chunk)
        for x0 in range(0, width, chunk)
    ]


def window_box(block: Box, shape: tuple[int, int], margin: int) -> Box:
    """`block` widened by `margin` px on each side, within the image."""
    (y0, y1), (x0, x1) = block
    return (
        (max(y0 - margin, 0), min(y1 + margin, shape[0])),
        (max(x0 - margin, 0), min(x1 + margin, shape[1])),
    )


def owned_objects(
    probs: np.ndarray, config: InstanceConfig, window: Box, block: Box, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, int]:
    """The objects a block owns, labelled from the probabilities of its window.

    Parameters
    ----------
    probs : ndarray, shape (K, h, w)
        The probabilities inside `window` (image coordinates), which contains `block`.
    window, block : Box
    shape : (H, W)
        The whole image's.

    Returns
    -------
    labels : ndarray of uint32, shape (h, w)
        The owned objects (those whose seed's first pixel lies in `block`), numbered 1..n in
        the order of `keys`; 0 elsewhere.
    keys : ndarray of int64, shape (n,)
        Raster index in the whole image of each object's seed's first pixel.
    too_wide : int
        Owned objects whose clump comes near a cut edge of the window.
    """
    (wy0, wy1), (wx0, wx1) = window
    (y0, y1), (x0, x1) = block
    labels, seeds = _seeded_labels(probs, config)
    ids, first = np.unique(seeds.ravel(), return_index=True)
    ids, first = ids[1:], first[1:]  # drop the background
    fy, fx = np.divmod(first, wx1 - wx0)
    fy, fx = fy + wy0, fx + wx0
    owned = (fy >= y0) & (fy < y1) & (fx >= x0) & (fx < x1)
    lut = np.zeros(int(labels.max()) + 1, np.uint32)
    lut[ids[owned]] = np.arange(1, owned.sum() + 1, dtype=np.uint32)
    local = lut[labels]
    if not owned.any():
        return local, np.zeros(0, np.int64), 0
    cut = (wy0 > 0, wy1 < shape[0], wx0 > 0, wx1 < shape[1])
    wide = _clumps_at_cut_edges(labels, local, edge_band(config), cut, config.gap)
    return local, (fy[owned] * shape[1] + fx[owned]).astype(np.int64), wide


def rank_ids(keys: list[np.ndarray]) -> np.ndarray:
    """Final ids of the objects of all blocks, numbered in order (block by block, then by
    local id): each object's rank by its seed's first pixel in raster order, as
    `ndimage.label` numbers the whole image's. Index 0 (background) stays 0.

    Returns
    -------
    ndarray of uint32, shape (1 + total objects,)
    """
    key = np.concatenate([np.zeros(1, np.int64), *keys])
    final = np.zeros(len(key), np.uint32)
    final[1 + np.argsort(key[1:], kind="stable")] = np.arange(1, len(key), dtype=np.uint32)
    return final


def _clumps_at_cut_edges(
    labels: np.ndarray,
    owned: np.ndarray,
    band: int,
    cut: tuple[bool, bool, bool, bool],
    gap: int = 0,
) -> int:
    """Owned objects whose clump comes within `band` px of a window edge that cuts the image,
    or, with `gap`, lies within ``2 * gap`` px of such a clump (`_close_contacts` lets cells
    that near change each other)."""
    near = np.zeros(labels.shape, bool)
    top, bottom, left, right = cut
    near[:band] |= top
    near[-band:] |= bottom
    near[:, :band] |= left
    near[:, -band:] |= right
    clumps, _ = ndimage.label(labels > 0, structure=np.ones((3, 3), bool))
    touching = np.unique(clumps[near])
    touching = touching[touching > 0]
    if not len(touching):
        return 0
    at_risk = np.isin(clumps, touching)
    if gap > 0:
        at_risk = ndimage.distance_transform_edt(~at_risk) <= 2 * gap
    return int(np.count_nonzero(np.unique(owned[at_risk & (owned > 0)])))
