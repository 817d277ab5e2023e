"""Training data: image/mask pairs in memory, and random training tiles drawn from them.

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

from biounet.errors import BiounetError
from biounet.io import mask_to_classes, read_image, read_mask
from biounet.mirror import mirror_crop
from biounet.model import UNetConfig
from biounet.normalize import NormalizeConfig, normalize
from biounet.weightmap import class_balance_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataConfig:
    """How masks are read and weighted.

    Parameters
    ----------
    mask_type : {"binary", "instances", "classes"} or None
        None detects per mask (<= 2 values: binary, more: instances).
    foreground : int, optional
        Stored value of the foreground in binary masks (default: the larger value).
    class_balance : bool
        Weight pixels by inverse class frequency per image (w_c of the paper's eq. 2).
    """

    mask_type: str | None = None
    foreground: int | None = None
    class_balance: bool = True


@dataclass
class Sample:
    """One training image, normalised, with its per-pixel targets."""

    name: str
    image: np.ndarray  # (C, H, W) float32
    classes: np.ndarray  # (H, W) int64
    weights: np.ndarray  # (H, W) float32
    instances: np.ndarray | None = None  # (H, W) int32 object ids, where the mask has them


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
    if mask.shape != image.shape[1:]:
        raise BiounetError(
            f"{mask_path}: mask is {mask.shape[0]}x{mask.shape[1]} but its image "
            f"{image_path.name} is {image.shape[1]}x{image.shape[2]}; they must be the same size"
        )
    classes, instances, _ = mask_to_classes(
        mask, mask_path, config.mask_type, net.num_classes, config.foreground
    )
    if config.class_balance:
        weights = class_balance_weights(classes, net.num_classes)
    else:
        weights = np.ones(classes.shape, np.float32)
    return Sample(image_path.stem, normalize(image, norm), classes, weights, instances)


def split_validation(pairs: list, fraction: float) -> tuple[list, list]:
    """Hold out the last contiguous block of `pairs` (sorted by name) for validation.

    A contiguous block, not a random pick, because neighbouring files are often neighbouring
    sections or fields of view whose near-duplicates would leak into validation.
    """
    if not 0.0 <= fraction < 1.0:
        raise BiounetError(f"validation fraction must be in [0, 1), not {fraction}")
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
    weight 0: the input context there is mirrored, the labels would be invented.
    """

    def __init__(
        self, samples: list[Sample], geometry: TileGeometry, seed: int, length: int
    ) -> None:
        if not samples:
            raise BiounetError("no training images")
        self.samples = samples
        self.geometry = geometry
        self.seed = seed
        self.length = length
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
        image = mirror_crop(sample.image, oy - g.context, ox - g.context, g.tile_in, g.tile_in)
        target, weight = _crop_targets(sample, oy, ox, g.tile_out)
        return torch.from_numpy(image), torch.from_numpy(target), torch.from_numpy(weight)


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
