"""Training data: image/mask pairs in memory, and random training tiles drawn from them.

The weight map (class balance + the paper's border term) is computed once per image, at load
time, and warped with the labels for each augmented tile (linear interpolation), rather than
recomputed per tile: the distances it needs are those of the undeformed cells, and computing
it once costs ~20 ms per image instead of that much per tile.

Every tile is a pure function of ``(seed, index)``: ``TileDataset[i]`` draws its image, position
and augmentation from ``numpy.random.default_rng([seed, i])``. Data order is therefore fixed by
the seed alone, which is what makes ``--resume`` reproduce an uninterrupted run exactly and
lets DataLoader workers (and later DDP ranks) share the work without sharing state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from biounet import weightmap
from biounet.architecture import UNetConfig
from biounet.augment import AugmentConfig, adjust_gray, center_crop, sample_coordinates, warp
from biounet.checks import check_number
from biounet.configs import DataConfig
from biounet.errors import BiounetError
from biounet.io import read_image, read_mask
from biounet.masks import mask_to_classes
from biounet.mirror import mirror_crop
from biounet.normalize import NormalizeConfig, normalize
from biounet.weightmap import (
    carve_borders,
    instances_from_binary,
    touching_borders,
)

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One training image, normalised, with its per-pixel targets."""

    name: str
    image: np.ndarray  # (C, H, W) float32
    classes: np.ndarray  # (H, W) int64
    weights: np.ndarray  # (H, W) float32
    instances: np.ndarray | None = None  # (H, W) int32 cells (carved where they touched)
    mask_type: str = "binary"  # as stored or detected: binary, instances or classes


def load_sample(
    image_path: Path,
    mask_path: Path,
    net: UNetConfig,
    norm: NormalizeConfig,
    config: DataConfig,
) -> Sample:
    """Read, check and prepare one image/mask pair."""
    image = read_image(image_path, net.in_channels)
    mask = read_mask(mask_path)
    return make_sample(image_path.stem, image, mask, net, norm, config, mask_path)


def make_sample(
    name: str,
    image: np.ndarray,
    mask: np.ndarray,
    net: UNetConfig,
    norm: NormalizeConfig,
    config: DataConfig,
    source: Path | str = "mask",
) -> Sample:
    """Check and prepare one image (C, H, W) and its mask (H, W), as read from files.

    `source` names the mask in error messages (its file, or its place in a list).
    """
    if mask.shape != image.shape[1:]:
        raise BiounetError(
            f"{source}: mask is {mask.shape[0]}x{mask.shape[1]} but its image {name} is "
            f"{image.shape[1]}x{image.shape[2]}; they must be the same size"
        )
    classes, instances, mask_type = mask_to_classes(
        mask, source, config.mask_type, net.num_classes, config.foreground
    )
    classes, instances = targets(classes, instances, net.num_classes, config, source)
    weights = weight_map(classes, instances, net.num_classes, config)
    return Sample(name, normalize(image, norm), classes, weights, instances, mask_type)


def mask_weights(
    mask_path: Path, num_classes: int, config: DataConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Class targets and weight map of one mask file: (int64 (H, W), float32 (H, W))."""
    classes, instances, _ = mask_to_classes(
        read_mask(mask_path), mask_path, config.mask_type, num_classes, config.foreground
    )
    classes, cells = targets(classes, instances, num_classes, config, mask_path)
    return classes, weight_map(classes, cells, num_classes, config)


def augment_examples(
    image: np.ndarray,
    classes: np.ndarray,
    rng: np.random.Generator,
    count: int,
    augment: AugmentConfig,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`count` augmented versions of a whole (normalised) image and its class mask.

    Returns a list of ``(image (C, H, W) float32, classes (H, W) int64)``, drawn exactly as
    training tiles are (one coordinate map each, centred on the image).
    """
    shape = classes.shape
    centre = (shape[0] // 2, shape[1] // 2)
    out = []
    for _ in range(count):
        coords = sample_coordinates(shape, centre, rng, augment)
        img = warp(image, coords, order=3).astype(np.float32)
        if augment.gray:
            img = adjust_gray(img, rng, augment)
        out.append((img, warp(classes, coords, order=0)))
    return out


def targets(
    classes: np.ndarray,
    instances: np.ndarray | None,
    num_classes: int,
    config: DataConfig,
    path: Path | str = "mask",
) -> tuple[np.ndarray, np.ndarray]:
    """Border-aware class targets and the cells (instance labels) of one mask.

    Returns
    -------
    classes : ndarray of int64, shape (H, W)
    cells : ndarray of int32, shape (H, W), 0 between cells
    """
    if instances is None:
        if not 0 <= config.cell_class < num_classes:
            raise BiounetError(f"cell class {config.cell_class} is not a class of this model")
        return classes, instances_from_binary(classes == config.cell_class)
    if config.touching == "keep":
        return classes, instances
    contacts = touching_borders(instances)
    if config.touching == "class":
        if num_classes != 3:
            raise BiounetError(
                f"{path}: touching='class' needs a 3-class model (background, cell, border)"
            )
        classes = classes.copy()
        classes[contacts] = 2
        return classes, np.where(contacts, 0, instances).astype(np.int32)
    carved = carve_borders(instances)
    return (carved > 0).astype(np.int64), carved.astype(np.int32)


def weight_map(
    classes: np.ndarray, cells: np.ndarray, num_classes: int, config: DataConfig
) -> np.ndarray:
    """The paper's weight map (`biounet.weightmap.weight_map`) as `config` sets it up."""
    return weightmap.weight_map(
        classes,
        cells,
        num_classes,
        config.border_w0,
        config.border_sigma,
        class_balance=config.class_balance,
    )


def split_validation(pairs: list, fraction: float) -> tuple[list, list]:
    """Hold out the last contiguous block of `pairs` (sorted by name) for validation.

    A contiguous block, not a random pick, because neighbouring files are often neighbouring
    sections or fields of view whose near-duplicates would leak into validation.
    """
    check_number("val_fraction", fraction, low=0, high=1, high_open=True)
    n_val = int(round(len(pairs) * fraction))
    if fraction > 0 and n_val == 0 and len(pairs) > 1:
        n_val = 1
    if n_val >= len(pairs):
        n_val = len(pairs) - 1
    return pairs[: len(pairs) - n_val], pairs[len(pairs) - n_val :]


@dataclass(frozen=True)
class TileGeometry:
    """Square training tile: network input side, target side, and input context per side."""

    tile_in: int
    tile_out: int
    context: int


def tile_geometry(net: UNetConfig, tile_out: int) -> TileGeometry:
    """Training tile for a wanted output size, snapped down to a valid one."""
    if net.padding == "valid":
        out = net.snap_output(tile_out, up=False)
        if out is None:
            raise BiounetError(
                f"training tile {tile_out} is too small; the smallest valid one is "
                f"{net.min_output_size()}"
            )
        return TileGeometry(net.input_size(out), out, net.margin)
    out = tile_out // net.size_step * net.size_step
    if out == 0:
        raise BiounetError(f"training tile {tile_out} is too small; use >= {net.size_step}")
    return TileGeometry(out, out, 0)


class TileDataset(torch.utils.data.Dataset):
    """Random training tiles; item ``i`` is determined by ``(seed, i)`` alone.

    Returns ``(image, target, weight)``: float32 (C, tile_in, tile_in), int64
    (tile_out, tile_out), float32 (tile_out, tile_out). Target pixels outside the image get
    weight 0: the input context there is mirrored, the labels would be invented. With
    `augment`, one coordinate map per tile deforms image, target and weight alike.
    """

    def __init__(
        self,
        samples: list[Sample],
        geometry: TileGeometry,
        seed: int,
        length: int,
        augment: AugmentConfig | None = None,
    ) -> None:
        if not samples:
            raise BiounetError("no training images")
        self.samples = samples
        self.geometry = geometry
        self.seed = seed
        self.length = length
        self.augment = augment
        # Sample images in proportion to their area, so every pixel is equally likely.
        areas = np.array([s.classes.size for s in samples], np.float64)
        self.image_p = areas / areas.sum()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index])
        sample = self.samples[rng.choice(len(self.samples), p=self.image_p)]
        g = self.geometry
        height, width = sample.classes.shape
        oy = _random_origin(rng, height, g.tile_out)
        ox = _random_origin(rng, width, g.tile_out)
        if self.augment is None:
            image = mirror_crop(sample.image, oy - g.context, ox - g.context, g.tile_in, g.tile_in)
            target, weight = _crop_targets(sample, oy, ox, g.tile_out)
        else:
            image, target, weight = self._augmented(sample, oy, ox, rng)
        return torch.from_numpy(image), torch.from_numpy(target), torch.from_numpy(weight)

    def _augmented(self, sample: Sample, oy: int, ox: int, rng: np.random.Generator):
        """One coordinate map for the input tile; its central crop for the targets."""
        g, aug = self.geometry, self.augment
        half = g.tile_out // 2
        coords = sample_coordinates((g.tile_in, g.tile_in), (oy + half, ox + half), rng, aug)
        # Cubic for the image (the paper's bicubic), nearest for labels, linear for weights;
        # weights are zero outside the image, where the mirrored labels would be invented.
        image = warp(sample.image, coords, order=3).astype(np.float32)
        inner = np.ascontiguousarray(center_crop(coords, (g.tile_out, g.tile_out)))
        target = warp(sample.classes, inner, order=0)
        weight = warp(sample.weights, inner, order=1, mode="constant", cval=0.0)
        if aug.gray:
            image = adjust_gray(image, rng, aug)
        return image, target.astype(np.int64), weight.astype(np.float32)


def _random_origin(rng: np.random.Generator, length: int, tile: int) -> int:
    """Origin of a tile along an axis: inside the image, or covering all of a short axis."""
    lo, hi = min(0, length - tile), max(0, length - tile)
    return int(rng.integers(lo, hi + 1))


def _crop_targets(sample: Sample, oy: int, ox: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    target = np.zeros((size, size), np.int64)
    weight = np.zeros((size, size), np.float32)
    height, width = sample.classes.shape
    y0, x0 = max(oy, 0), max(ox, 0)
    y1, x1 = min(oy + size, height), min(ox + size, width)
    target[y0 - oy : y1 - oy, x0 - ox : x1 - ox] = sample.classes[y0:y1, x0:x1]
    weight[y0 - oy : y1 - oy, x0 - ox : x1 - ox] = sample.weights[y0:y1, x0:x1]
    return target, weight
