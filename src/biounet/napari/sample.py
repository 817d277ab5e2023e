"""napari sample data: an ISBI 2012 EM slice where the data is at hand, else a synthetic one.

No image ships with biounet: the slice is read from ``$BIOUNET_DATA/isbi2012/test_images``
(the data folder `biounet` commands use). Without it, a synthetic "EM-like" image of dark
membranes between bright cells stands in, so the menu entry always gives something to
segment.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

DATA_ENV = "BIOUNET_DATA"
CROP = 384  # px: segmented in seconds on a laptop CPU


def isbi_sample() -> list[tuple[np.ndarray, dict, str]]:
    """napari's sample-data contribution: ``[(image, {"name": ...}, "image")]``."""
    root = os.environ.get(DATA_ENV)
    folder = Path(root) / "isbi2012" / "test_images" if root else None
    files = sorted(folder.glob("*.png")) if folder is not None and folder.is_dir() else []
    if files:
        import imageio.v3 as iio

        image = np.asarray(iio.imread(files[0]))
        if image.ndim == 3:
            image = image[..., 0]
        crop = image[:CROP, :CROP]
        return [(crop, {"name": f"ISBI 2012 {files[0].stem} (crop)"}, "image")]
    return [(synthetic_em(), {"name": f"synthetic EM (set {DATA_ENV} for ISBI 2012)"}, "image")]


def synthetic_em(size: int = CROP, cells: int = 40, seed: int = 0) -> np.ndarray:
    """uint8 image of bright cells separated by dark 3-px membranes (a Voronoi tiling)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    seeds = np.zeros((size, size), np.int32)
    points = rng.integers(0, size, (cells, 2))
    seeds[points[:, 0], points[:, 1]] = np.arange(1, cells + 1)
    _, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    regions = seeds[iy, ix]
    edges = ndimage.morphological_gradient(regions, size=3) > 0
    image = np.where(edges, 50.0, 190.0) + rng.normal(0, 15, (size, size))
    image = ndimage.gaussian_filter(image, 1.0)
    return image.clip(0, 255).astype(np.uint8)
