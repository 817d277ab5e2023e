"""Overlap-tile prediction: images of any size, tile by tile, with mirrored borders.

Geometry (per axis, in output pixel coordinates; the image's pixel ``i`` is output pixel ``i``):
each tile keeps ``tile_out`` output pixels starting at ``origin`` and reads the input window
``[origin - context, origin - context + tile_in)``, mirror-extrapolated where it leaves the
image. For the valid network ``context`` is the network's margin (92 px at depth 4) and the
network's output is exactly the kept window, so nothing is discarded.

A depth-d network pools ``d`` times, so it is shift-equivariant only for shifts that are
multiples of ``2**d``: tile origins sit on that grid (``stride`` is the largest multiple of
``2**d`` not above ``tile_out``; neighbouring tiles overlap by ``tile_out - stride`` pixels,
which they compute identically). The stitched valid-network result therefore equals one pass
over the whole mirror-padded image, to float rounding: no seams.

For the padded ("same") variant each tile is widened by a ``halo`` on each side that is
discarded from the output, because zero padding makes a tile's border pixels differ from
whole-image inference. The default halo, the network's receptive radius plus 2 px (94 px at
depth 4; the pooling phase makes the field lopsided by a pixel or so: measured exact at radius
+ 2 for depths 1-4, not at the radius itself), removes the difference to float rounding; a
smaller halo is cheaper but leaves a difference. Measured with random He-initialised weights
(the worst case: trained networks are more local), depth 4, base 8, 150x170 image, 64 px
tiles: max |softmax difference| 0.86 at halo 32, 0.19 at halo 64, 5e-6 at halo 96; depth 3:
0.27 at halo 16, 0.028 at halo 32, 1e-6 at 46 (tests/test_tiling.py checks this bound).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass

import numpy as np
import torch

from biounet.ahead import ahead
from biounet.architecture import UNetConfig
from biounet.configs import DEFAULT_MEMORY_MB, Tiling
from biounet.errors import BiounetError
from biounet.mirror import mirror_crop
from biounet.model import UNet
from biounet.precision import autocast, bytes_per_value, inference_format
from biounet.tta import average_views, bounding_box, view_windows

# Allocator slack and oneDNN's reordered copies over the live feature maps counted by
# `UNetConfig.peak_activations` (exact for the live tensors, tests/test_model.py); bench/memory.py
# measures the whole process.
MEMORY_SLACK = 1.5


@dataclass(frozen=True)
class AxisPlan:
    """Tiling of one axis: kept output per tile, grid stride, and input window geometry."""

    tile_in: int
    tile_out: int
    stride: int
    context: int  # input pixels before the first kept output pixel
    crop: int  # network output pixels discarded before the first kept one
    period: int  # the pooling period 2**depth: tile origins lie on its grid

    def origins(self, length: int) -> list[int]:
        """Output origins of the tiles covering ``[0, length)``."""
        if length <= self.tile_out:
            return [0]
        count = -(-(length - self.tile_out) // self.stride) + 1
        return [k * self.stride for k in range(count)]


@dataclass(frozen=True)
class TilePlan:
    y: AxisPlan
    x: AxisPlan

    @property
    def tile_shape(self) -> tuple[int, int]:
        return self.y.tile_in, self.x.tile_in

    def tiles(self, shape: tuple[int, int]) -> Iterator[tuple[int, int]]:
        """Output origins ``(oy, ox)`` of all tiles for an image of `shape` (H, W)."""
        for oy in self.y.origins(shape[0]):
            for ox in self.x.origins(shape[1]):
                yield oy, ox

    def count(self, shape: tuple[int, int]) -> int:
        return len(self.y.origins(shape[0])) * len(self.x.origins(shape[1]))


def default_halo(net: UNetConfig) -> int:
    """Halo that makes "same" tiling exact: the receptive radius plus 2 px."""
    return net.receptive_radius + 2


def valid_tiles(net: UNetConfig, count: int, halo: int | None = None) -> list[tuple[int, int]]:
    """The `count` smallest usable tiles as (input side, output side) pairs."""
    tiles, request = [], min_tile(net, halo)
    while len(tiles) < count:
        axis = _snap_axis(net, request, net.size_step, halo, up=True)
        tiles.append((axis.tile_in, axis.tile_out))
        request = axis.tile_out + 1
    return tiles


def min_tile(net: UNetConfig, halo: int | None = None) -> int:
    """Smallest output tile size usable for seamless tiling (at least one pooling period)."""
    return _snap_axis(net, net.size_step, net.size_step, halo, up=True).tile_out


def _snap_axis(net: UNetConfig, request: int, at_least: int, halo: int, up: bool) -> AxisPlan:
    """Valid axis plan with ``tile_out`` nearest to `request` (down, or up) and >= `at_least`."""
    step = net.size_step
    halo = default_halo(net) if halo is None else halo
    if net.padding == "valid":

        def valid(o: int) -> bool:
            return net.is_valid_output(o)

        context, crop = net.margin, 0
    else:
        # Same padding: the widened tile must itself be a valid input (a multiple of 2**d).
        def valid(o: int) -> bool:
            return (o + 2 * halo) % step == 0

        context, crop = halo, halo
    target = max(request, at_least) if up else request
    candidates = range(target, target + 4 * step + 16) if up else range(target, at_least - 1, -1)
    out = next((o for o in candidates if o >= at_least and valid(o)), None)
    if out is None:
        raise BiounetError(f"tile size {request} is too small")
    tile_in = out + 2 * context
    return AxisPlan(
        tile_in=tile_in,
        tile_out=out,
        stride=out // step * step,
        context=context,
        crop=crop,
        period=step,
    )


def tile_memory(
    net: UNetConfig, tile_shape: tuple[int, int], batch_size: int = 1, bytes_per_value: int = 4
) -> int:
    """Estimated bytes of feature maps for one forward pass of a batch of input tiles."""
    values = net.peak_activations(*tile_shape) * batch_size
    return int(values * bytes_per_value * MEMORY_SLACK)


def auto_tile(
    net: UNetConfig,
    image_shape: tuple[int, int],
    halo: int | None = None,
    memory_mb: float = DEFAULT_MEMORY_MB,
    batch_size: int = 1,
    bytes_per_value: int = 4,
) -> int:
    """Output tile side that computes the fewest input pixels for this image, within memory.

    Every tile recomputes its context (the margin, or the halo), so bigger tiles waste less;
    but a tile bigger than needed computes mirrored pixels. Among the valid tiles whose
    `tile_memory` fits `memory_mb`, this returns the one whose plan has the smallest total
    input area (ties: the larger tile, fewer calls). If none fits, the smallest valid tile.
    """
    budget = memory_mb * 2**20
    request = best = min_tile(net, halo)
    best_cost = None
    longest = max(image_shape)
    while True:
        plan = _plan(net, image_shape, request, halo)
        if tile_memory(net, plan.tile_shape, batch_size, bytes_per_value) > budget:
            break
        cost = plan.count(image_shape) * plan.y.tile_in * plan.x.tile_in
        if best_cost is None or cost <= best_cost:
            best, best_cost = max(plan.y.tile_out, plan.x.tile_out), cost
        if request >= longest:
            break  # one tile covers the image: larger requests give the same plan
        request = _snap_axis(net, request + 1, net.size_step, halo, up=True).tile_out
    return best


def plan_tiles(
    net: UNetConfig,
    image_shape: tuple[int, int],
    tile: int | None = None,
    halo: int | None = None,
    *,
    memory_mb: float = DEFAULT_MEMORY_MB,
    batch_size: int = 1,
    bytes_per_value: int = 4,
) -> TilePlan:
    """Choose tile sizes for an image.

    Parameters
    ----------
    net : UNetConfig
    image_shape : (H, W)
    tile : int, optional
        Wanted output tile size per axis, snapped down to a valid size. Default: `auto_tile`,
        the tile with the least computation for this image within `memory_mb`. An axis
        shorter than the tile gets the smallest valid tile that covers it, wasting nothing.
    halo : int, optional
        Discarded border per side for the "same" variant (default: `default_halo`,
        which makes tiling exact); ignored for "valid".
    memory_mb, batch_size, bytes_per_value
        Memory budget for the default tile: MiB of feature maps for a batch of
        `batch_size` tiles at `bytes_per_value` (4 for fp32, 2 for bf16/fp16).

    Raises
    ------
    BiounetError
        When `tile` is below the smallest valid tile size.
    """
    if tile is None:
        tile = auto_tile(net, image_shape, halo, memory_mb, batch_size, bytes_per_value)
    smallest = min_tile(net, halo)
    if tile < smallest:
        raise BiounetError(
            f"tile size {tile} is too small for this model; the smallest valid tile is "
            f"{smallest} (use `tile` {smallest} or larger)"
        )
    return _plan(net, image_shape, tile, halo)


def plan_for(
    net: UNetConfig, image_shape: tuple[int, int], tiling: Tiling, precision: str
) -> TilePlan:
    """`plan_tiles` with a `Tiling`'s settings, at a resolved `precision`."""
    return plan_tiles(
        net,
        image_shape,
        tiling.tile,
        tiling.halo,
        memory_mb=tiling.memory_mb,
        batch_size=tiling.batch_size,
        bytes_per_value=bytes_per_value(precision),
    )


def _plan(
    net: UNetConfig, image_shape: tuple[int, int], request: int, halo: int | None
) -> TilePlan:
    at_least = net.size_step
    axes = []
    for length in image_shape:
        down = _snap_axis(net, request, at_least, halo, up=False)
        cover = _snap_axis(net, length, at_least, halo, up=True)
        axes.append(cover if cover.tile_out <= down.tile_out else down)
    return TilePlan(*axes)


Forward = Callable[[np.ndarray], np.ndarray]


def model_forward(
    model: UNet,
    precision: str = "fp32",
    device: torch.device | None = None,
    fmt: torch.memory_format | None = None,
) -> Forward:
    """Wrap `model` as a numpy batch function ``(B, C, h, w) float32 -> (B, K, h', w') float32``.

    `precision` must already be resolved ("fp32", "bf16" or "fp16"); see `biounet.precision`.
    `model` is put in eval mode and in the layout `fmt` (default: `inference_format`; a
    network in training is validated in its training layout, `memory_format`, so that
    validating does not change its training).
    """
    device = device or next(model.parameters()).device
    if device.type == "cuda" and device.index is None:
        # the caller's current GPU: the tile loop calls `forward` from a thread of its own,
        # whose current device is GPU 0
        device = torch.device("cuda", torch.cuda.current_device())
    fmt = fmt or inference_format(precision, device)
    model = model.eval().to(memory_format=fmt)

    def forward(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).to(memory_format=fmt)
        with torch.inference_mode(), autocast(precision, device):
            y = model(x)
        return y.float().cpu().numpy()

    return forward


def tile_outputs(
    forward: Forward,
    image,
    plan: TilePlan,
    origins: Iterable[tuple[int, int]],
    keep: tuple[int, int],
    batch_size: int = 1,
    prepare: Callable[[np.ndarray], np.ndarray] | None = None,
    progress: Callable[[int, int], None] | None = None,
    total: int | None = None,
    tta: bool = False,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """The one tile loop: mirrored input windows, batched forward passes, kept output blocks.

    The windows are read and prepared one batch ahead of the forward pass, and the forward
    pass runs one batch ahead of the caller, each in a background thread (`biounet.ahead`):
    `image`, `prepare` and `forward` are called from those threads, so that reading and
    writing overlap the computation; `forward` must return a new array on each call (the
    caller still reads one batch's outputs while the next is computed).

    Parameters
    ----------
    forward : callable
        Batch function, e.g. from `model_forward`.
    image : array-like, shape (C, H, W)
        Anything `mirror_crop` reads (numpy array, memory map, `LazyImage`).
    plan : TilePlan
    origins : iterable of (oy, ox)
        Output origins of the tiles, in the order the blocks are wanted.
    keep : (h, w)
        Output pixels kept per tile from its origin (at most the plan's ``tile_out``).
    batch_size : int
        Tiles per forward call; memory grows with it, not with the image.
    prepare : callable, optional
        Applied to each input window before the forward pass (e.g. normalisation of a file
        read window by window).
    progress : callable(done, total), optional
    total : int, optional
        Tile count reported to `progress` (default: the length of `origins`).
    tta : bool
        Average each tile over its 8 rotations and flips (`biounet.tta`): 8 forward calls per
        batch, and blocks that are the log of the mean probabilities.

    Yields
    ------
    (oy, ox, block)
        ``block``: float32 (K, keep_h, keep_w) raw network outputs (logits) for the output
        pixels ``[oy, oy + keep_h) x [ox, ox + keep_w)`` (past the image edge where a tile
        overhangs it).
    """
    origins = list(origins)
    total = len(origins) if total is None else total
    (ch, cw), (kh, kw) = ((0, 0) if tta else (plan.y.crop, plan.x.crop)), keep
    # Three stages in three threads, one batch apart: reading and normalising the next windows
    # and using the previous outputs (the caller: argmax, compression, writing) overlap the
    # forward pass. One batch waits between stages: memory follows the batch, not the image.
    read = _views if tta else _windows
    batches = ahead(read(image, plan, origins, batch_size, prepare), name="biounet-read")
    done = 0
    stream = _forwarded(forward, batches, (plan.y.tile_out, plan.x.tile_out))
    with closing(ahead(stream, name="biounet-forward")) as results:
        for where, result in results:
            for (oy, ox), tile in zip(where, result, strict=True):
                yield oy, ox, tile[:, ch : ch + kh, cw : cw + kw]
            done += len(where)
            if progress is not None:
                progress(done, total)


def _windows(image, plan: TilePlan, origins: list, batch_size: int, prepare):
    """Batches ``(origins, (B, C, h, w) windows)`` of mirrored, prepared input windows."""
    for b in range(0, len(origins), batch_size):
        where = origins[b : b + batch_size]
        windows = []
        for oy, ox in where:
            y0, x0 = oy - plan.y.context, ox - plan.x.context
            window = mirror_crop(image, y0, x0, plan.y.tile_in, plan.x.tile_in)
            windows.append(window if prepare is None else prepare(window))
        yield where, np.stack(windows)


def _views(image, plan: TilePlan, origins: list, batch_size: int, prepare):
    """Batches ``(origins, (windows, corners, views))`` for TTA: per tile, one prepared window
    holding all its views' windows, its top-left pixel, and its `view_windows`."""
    shape, axes = image.shape[-2:], (plan.y, plan.x)
    for b in range(0, len(origins), batch_size):
        where = origins[b : b + batch_size]
        reads, corners, views = [], [], []
        for oy, ox in where:
            block = ((oy, oy + plan.y.tile_out), (ox, ox + plan.x.tile_out))
            tile_views = view_windows(shape, block, axes, plan.y.period)
            (y0, y1), (x0, x1) = bounding_box(tile_views)
            window = mirror_crop(image, y0, x0, y1 - y0, x1 - x0)
            reads.append(window if prepare is None else prepare(window))
            corners.append((y0, x0))
            views.append(tile_views)
        yield where, (reads, corners, views)


def _forwarded(forward: Forward, batches: Iterator, size: tuple[int, int]):
    """``(origins, outputs)`` of each batch; closes `batches` (its thread) when stopped."""
    with closing(batches):
        for where, windows in batches:
            if isinstance(windows, tuple):  # TTA: the views' mean, per tile
                yield where, average_views(forward, *windows, size)
            else:
                yield where, forward(windows)


def predict_tiled(
    forward: Forward,
    image: np.ndarray,
    plan: TilePlan,
    num_classes: int,
    batch_size: int = 1,
    progress: Callable[[int, int], None] | None = None,
    tta: bool = False,
) -> np.ndarray:
    """Run `forward` over the tiles of `image` and stitch the outputs.

    Parameters
    ----------
    forward : callable
        Batch function, e.g. from `model_forward`.
    image : ndarray, shape (C, H, W), float32
        Normalised image; any H, W >= 1.
    plan : TilePlan
    num_classes : int
        Output channels K of the network.
    batch_size : int
        Tiles per forward call.
    progress : callable(done, total), optional
    tta : bool
        Average each tile over its 8 rotations and flips (see `tile_outputs`).

    Returns
    -------
    ndarray of float32, shape (K, H, W)
        Raw network outputs (logits), stitched; with `tta` the log of the mean probabilities.
    """
    height, width = image.shape[-2:]
    out = np.empty((num_classes, height, width), np.float32)
    keep = (plan.y.tile_out, plan.x.tile_out)
    origins = plan.tiles((height, width))
    tiles = tile_outputs(
        forward, image, plan, origins, keep, batch_size, progress=progress, tta=tta
    )
    with closing(tiles):  # an exception here (in `progress`, say) stops the threads at once
        for oy, ox, block in tiles:
            h, w = min(keep[0], height - oy), min(keep[1], width - ox)
            out[:, oy : oy + h, ox : ox + w] = block[:, :h, :w]
    return out


def predict_whole(
    forward: Forward, image: np.ndarray, net: UNetConfig, halo: int | None = None
) -> np.ndarray:
    """Reference: one forward pass over the whole mirror-padded image, cropped to (K, H, W).

    The padded image starts ``context`` pixels before the image (as tiles do), so its pooling
    grid matches the tiles'. Memory grows with the image: for tests and small images only.
    """
    height, width = image.shape[-2:]
    halo = default_halo(net) if halo is None else halo
    context = net.margin if net.padding == "valid" else halo
    sizes = []
    for length in (height, width):
        ax = _snap_axis(net, length, 1, halo, up=True)
        sizes.append(ax.tile_in)
    padded = mirror_crop(image, -context, -context, sizes[0], sizes[1])
    result = forward(padded[None])[0]
    crop = 0 if net.padding == "valid" else halo
    return result[:, crop : crop + height, crop : crop + width]
