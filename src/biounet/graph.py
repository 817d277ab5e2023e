"""Prediction as a dask graph: an image of any size, block by block, wherever dask runs.

The blocks are the one-process result cut into pieces. Each block holds whole tiles of the
overlap-tile plan one process uses for the image (`biounet.tiling`): its task reads their
input windows with the model's context, mirrored at the image border exactly as one process
mirrors them, normalises them with statistics computed once for the whole image, and keeps
the output pixels each tile writes in one process (where tiles overlap, the later tile's, as
`predict_tiled` stitches). So the blocks equal the one-process result bit for bit at the
same precision, tile and batch size (tested at fp32 with torch; the runtimes may compute a
tile differently with another thread count, within their tolerance of torch).

Masks of a model with a stored membrane post-processing: each block is made from the
probabilities of a window `instance_margin` px wider (`membranes_graph`), which equals the
one-process mask wherever the cells beside the block fit in the margin.

Instances: each block labels the probabilities of its window (the block plus
`instance_margin` px) and keeps the objects whose seed starts inside it
(`biounet.instances.owned_objects`); one task ranks all objects' seeds in raster order
(`rank_ids`), and each output block pastes its own and its neighbours' objects with their
final ids, in the order `instances_in_chunks` writes them: the labels of one process.

A worker process builds the network once (`_engine`, keyed by the weights' digest). Every
task's result depends only on its inputs, so a block that dask computes again (a worker
died) is the same block: writing it twice writes the same bytes. dask.distributed provides
the scheduling, retries and data movement; only the block arithmetic is here, since no
dask tool knows the overlap-tile plan.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from biounet.configs import PredictConfig
from biounet.errors import BiounetError
from biounet.instances import (
    InstanceConfig,
    edge_band,
    owned_objects,
    rank_ids,
    window_box,
)
from biounet.mirror import mirror_indices
from biounet.normalize import (
    apply_normalization,
    merge_counts,
    normalization_params,
    params_from_counts,
    value_counts,
)
from biounet.tiling import AxisPlan, TilePlan

logger = logging.getLogger(__name__)
# Blocks are whole tiles, at least this many output px a side (fewer, larger tasks).
BLOCK_PX = 1024
# Float images beyond this many pixels get their percentiles from a regular subsample of
# ~4 megapixels, as one process streaming a large TIFF does (`biounet.io.LazyImage.sample`).
SAMPLE_PX = 4_000_000


@dataclass(frozen=True)
class NetSpec:
    """What a worker needs to build the network: architecture and weights, by value."""

    info: dict  # `ModelInfo.to_dict()`
    weights: dict  # name -> ndarray
    precision: str
    device: str
    digest: str
    engine: str = "torch"  # resolved: what the client chose runs on every worker
    cache: str | None = None

    @classmethod
    def of(cls, net, info, engine, cache: str | None = None) -> NetSpec:
        """The spec of `net` as `engine` (a `biounet.inference.Engine`) runs it."""
        weights = {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}
        about = f"{engine.runtime} {engine.precision} {engine.device} {json.dumps(info.to_dict())}"
        h = hashlib.sha256(about.encode())
        for name in sorted(weights):
            h.update(name.encode() + np.ascontiguousarray(weights[name]).tobytes())
        cache = None if cache is None else str(Path(cache).absolute())  # workers' cwd differ
        return cls(info.to_dict(), weights, engine.precision, str(engine.device),
                   h.hexdigest()[:16], engine.runtime, cache)  # fmt: skip

    def describe(self) -> str:
        return f"engine {self.engine}, {self.precision}, {self.device}"


_ENGINES: dict = {}
_ENGINES_LOCK = threading.Lock()


def _engine(spec: NetSpec):
    """The network of `spec`, built once per process."""
    with _ENGINES_LOCK:
        if spec.digest not in _ENGINES:
            import torch

            from biounet.inference import Engine
            from biounet.model import UNet
            from biounet.modeldir import ModelInfo

            if spec.device.startswith("cuda") and not torch.cuda.is_available():
                raise BiounetError(
                    "this dask worker sees no CUDA device, but prediction runs on "
                    f"{spec.device}: predict with --device cpu, or on GPU workers"
                )

            info = ModelInfo.from_dict(spec.info, "the model shipped to this worker")
            net = UNet(info.net)
            net.load_state_dict({k: torch.from_numpy(v) for k, v in spec.weights.items()})
            _ENGINES.clear()  # one model at a time per process
            try:
                _ENGINES[spec.digest] = Engine(
                    net, torch.device(spec.device), spec.precision, None, spec.engine, spec.cache
                )
            except BiounetError as exc:  # the client chose for a machine like its own
                raise BiounetError(
                    f"this dask worker cannot run what the client chose ({spec.describe()}): "
                    f"{exc}; or predict with --engine torch"
                ) from None
        return _ENGINES[spec.digest]


# -- the block grid --------------------------------------------------------------------------


def block_edges(axis: AxisPlan, length: int, per_block: int) -> list[tuple[int, int, range]]:
    """Per block along one axis: its output range and the tiles (indices) it holds.

    Tile k writes ``[k * stride, (k + 1) * stride)`` in one process (the last tile: to the
    end), later tiles overwriting earlier ones; a block of `per_block` consecutive tiles
    therefore owns the union of theirs.
    """
    count = len(axis.origins(length))
    edges = []
    for first in range(0, count, per_block):
        last = min(first + per_block, count)
        stop = length if last == count else last * axis.stride
        edges.append((first * axis.stride, stop, range(first, last)))
    return edges


def _per_block(axis: AxisPlan, at_least: int) -> int:
    return max(1, -(-at_least // axis.stride))


# -- statistics ------------------------------------------------------------------------------


def image_statistics(
    source, normalization, whole_limit: int, scheduler=None
) -> tuple[np.ndarray, np.ndarray]:
    """Normalisation (offset, scale) of a dask image (C, H, W), as one process computes it:
    exact percentiles from value counts for integer images; for float ones, those of the
    whole image up to `whole_limit` pixels, else of a regular subsample (as one process
    streaming a TIFF of that size does)."""
    import dask

    if normalization.method != "percentile":  # fixed: the data do not matter
        return normalization_params(_gather(source[:, :1, :1], scheduler), normalization)
    if np.issubdtype(source.dtype, np.integer):
        parts = [dask.delayed(value_counts)(b) for b in source.to_delayed().ravel()]
        while len(parts) > 1:  # a tree of merges, computed where the blocks are
            parts = [
                dask.delayed(merge_counts)(*parts[i : i + 2]) if i + 1 < len(parts) else parts[i]
                for i in range(0, len(parts), 2)
            ]
        (counts,) = dask.compute(parts[0], scheduler=scheduler)
        return params_from_counts(counts, source.dtype, normalization)
    _, height, width = source.shape
    if height * width <= whole_limit:
        return normalization_params(_gather(source, scheduler), normalization)
    step = max(1, int(np.ceil(np.sqrt(height * width / SAMPLE_PX))))
    return normalization_params(_gather(source[:, ::step, ::step], scheduler), normalization)


def _gather(array, scheduler) -> np.ndarray:
    import dask

    (value,) = dask.compute(array, scheduler=scheduler)
    return np.asarray(value)


# -- probabilities and masks -----------------------------------------------------------------


class _Window:
    """A block's input region, seen as the whole image (C, H, W) by `mirror_crop`."""

    def __init__(self, data: np.ndarray, y0: int, x0: int, shape: tuple[int, int, int]):
        self.data, self.y0, self.x0, self.shape = data, y0, x0, shape

    def __getitem__(self, key):
        _, rows, cols = key
        return self.data[
            ...,
            rows.start - self.y0 : rows.stop - self.y0,
            cols.start - self.x0 : cols.stop - self.x0,
        ]


def _block_task(window, spec: NetSpec, plan: TilePlan, box, source_box, shape, origins,
                offset, scale, batches: list[int], output: str,
                tta: bool) -> np.ndarray:  # fmt: skip
    """One block: its tiles' logits stitched as in one process, then `output` of them.

    `batches`: for each tile (of `origins`), the size of the batch one process computes it
    in. oneDNN's float rounding depends on the batch size (not on the other tiles in the
    batch), so each tile is computed in a batch of that size, filled up with repeats.
    """
    from biounet.configs import Tiling
    from biounet.inference import softmax

    window = np.block(window)
    if window.dtype.kind == "f" and not (
        np.isfinite(window).all() and np.abs(window).max() <= np.finfo(np.float32).max
    ):
        raise BiounetError(
            f"image holds NaN, infinite or beyond-float32 values near rows {box[0]}, columns "
            f"{box[1]}; replace them before predicting"
        )
    engine = _engine(spec)
    (y0, y1), (x0, x1) = box
    image = _Window(window, source_box[0], source_box[1], shape)
    keep = (plan.y.tile_out, plan.x.tile_out)
    found = {}
    for size in sorted(set(batches)):
        group = [o for o, b in zip(origins, batches, strict=True) if b == size]
        filled = group + group[-1:] * (-len(group) % size)
        tiles = engine.blocks(
            image, plan, filled, keep, Tiling(batch_size=size),
            prepare=lambda w: apply_normalization(w, offset, scale), tta=tta,
        )  # fmt: skip
        found.update(((oy, ox), logits) for oy, ox, logits in list(tiles)[: len(group)])
    out = np.empty((len(next(iter(found.values()))), y1 - y0, x1 - x0), np.float32)
    for oy, ox in origins:  # in raster order: where tiles overlap, the later one's pixels
        h, w = min(keep[0], y1 - oy), min(keep[1], x1 - ox)
        out[:, oy - y0 : oy - y0 + h, ox - x0 : ox - x0 + w] = found[oy, ox][:, :h, :w]
    probs = softmax(out)
    return probs.argmax(0).astype(np.uint8) if output == "mask" else probs


def _source_span(axis: AxisPlan, origins: list[int], length: int, tta: bool) -> tuple[int, int]:
    """The image rows (or columns) the tiles at `origins` read, mirrored included (with TTA,
    windows a pooling period wider on each side: `biounet.tta`)."""
    extra = axis.period if tta else 0
    lo = origins[0] - axis.context - extra
    hi = origins[-1] - axis.context + axis.tile_in + extra
    idx = mirror_indices(lo, hi, length)
    return int(idx.min()), int(idx.max()) + 1


def predict_graph(
    source,
    spec: NetSpec,
    info,
    config: PredictConfig,
    output: str,
    scheduler=None,
):
    """The prediction of a dask image (C, H, W) as a lazy dask array.

    Parameters
    ----------
    source : dask.array.Array, shape (C, H, W), raw intensities
    spec : NetSpec
    info : biounet.modeldir.ModelInfo
    config : PredictConfig
        Tiling (``tile``, ``batch_size``, ``memory_mb``) and ``instance_margin``.
    output : {"mask", "prob", "instances"}
    scheduler : optional
        Where to compute the normalisation statistics now (dask's default: None).

    Returns
    -------
    dask.array.Array
        (H, W) uint8 mask, (K, H, W) float32 probabilities, or (H, W) uint32 labels.
    """

    from biounet.precision import resolve_precision
    from biounet.tiling import plan_for

    channels, height, width = source.shape
    if channels != info.net.in_channels:
        raise BiounetError(
            f"image has {channels} channel(s) but the model expects {info.net.in_channels}"
        )
    offset, scale = image_statistics(source, info.normalization, config.stream_pixels, scheduler)
    precision = resolve_precision(spec.precision, _device(spec.device))
    plan = plan_for(info.net, (height, width), config.tiling, precision)
    from biounet.predict import membrane_config, wants_tta

    membranes = membrane_config(info) if output == "mask" else None
    tta = wants_tta(config, info)
    if membranes is not None:
        from biounet.membranes import reach

        if config.instance_margin <= reach(membranes):
            raise BiounetError(
                f"margin {config.instance_margin} px must exceed {reach(membranes)} px for the "
                "model's membrane smoothing (`instance_margin`)"
            )
    margin = config.instance_margin if output == "instances" or membranes else 0
    rows = block_edges(plan.y, height, _per_block(plan.y, max(BLOCK_PX, margin + 1)))
    cols = block_edges(plan.x, width, _per_block(plan.x, max(BLOCK_PX, margin + 1)))
    kind = "mask" if output == "mask" and membranes is None else "prob"
    stats = (offset, scale)
    result = _tile_blocks(source, _shipped(spec, scheduler), plan, (rows, cols), stats,
                          config.batch_size, kind, info.net.num_classes, tta)  # fmt: skip
    # The last block of an axis may be longer than the others (its last tile's overhang);
    # regular chunks (the last one shorter) are what zarr arrays and `da.to_zarr` take.
    regular = {-2: rows[0][1] - rows[0][0], -1: cols[0][1] - cols[0][0]}
    result = result.rechunk({result.ndim + a: c for a, c in regular.items()})
    if membranes is not None:
        return membranes_graph(result, membranes, margin)
    if output != "instances":
        return result
    from biounet.predict import instance_config

    return instances_graph(result, instance_config(info), margin)


def _pieces(array) -> list:
    """A dask array's blocks as nested lists of Delayed (`numpy.block` joins them), its graph
    left as it is: optimising it would give every task its own copy of the blocks it shares
    with its neighbours, and compute them again for each."""
    return array.to_delayed(optimize_graph=False).tolist()


def _shipped(spec: NetSpec, scheduler):
    """`spec` as the graph refers to it: sent to every worker of a dask.distributed cluster
    once (`scheduler`, else the client this process has), not inside the graph."""
    import dask

    client = scheduler if hasattr(scheduler, "scatter") else None
    if client is None and scheduler is None:
        try:
            from distributed import default_client

            client = default_client()
        except (ImportError, ValueError):  # no dask.distributed, or no client
            client = None
    if client is None:
        return dask.delayed(spec, pure=True)
    return client.scatter(spec, broadcast=True, hash=False)


def _tile_blocks(source, net, plan: TilePlan, edges, stats, batch_size: int, kind: str,
                 classes: int, tta: bool):  # fmt: skip
    """The lazy output of every block of `edges` (rows, columns), as one dask array."""
    import dask
    import dask.array as da

    channels, height, width = source.shape
    ys, xs = plan.y.origins(height), plan.x.origins(width)
    total, rest = len(ys) * len(xs), len(ys) * len(xs) % batch_size

    def batch_of(ky: int, kx: int) -> int:
        """The batch size one process computes tile (ky, kx) in: the last one is short."""
        return rest if rest and ky * len(xs) + kx >= total - rest else batch_size

    grid = []
    for y0, y1, ty in edges[0]:
        line = []
        for x0, x1, tx in edges[1]:
            oys, oxs = [ys[i] for i in ty], [xs[i] for i in tx]
            sy0, sy1 = _source_span(plan.y, oys, height, tta)
            sx0, sx1 = _source_span(plan.x, oxs, width, tta)
            task = dask.delayed(_block_task, pure=True)(
                _pieces(source[:, sy0:sy1, sx0:sx1]), net, plan, ((y0, y1), (x0, x1)), (sy0, sx0),
                (channels, height, width), [(oy, ox) for oy in oys for ox in oxs],
                *stats, [batch_of(ky, kx) for ky in ty for kx in tx], kind, tta,
            )  # fmt: skip
            if kind == "mask":
                line.append(da.from_delayed(task, (y1 - y0, x1 - x0), np.uint8))
            else:
                line.append(da.from_delayed(task, (classes, y1 - y0, x1 - x0), np.float32))
        grid.append(line)
    return da.block(grid)


def _device(name: str):
    import torch

    return torch.device(name)


# -- membranes and instances ----------------------------------------------------------------


def _membranes_task(probs, config, window, block) -> np.ndarray:
    from biounet.membranes import membrane_classes

    (wy0, _), (wx0, _) = window
    (y0, y1), (x0, x1) = block
    classes = membrane_classes(np.block(probs), config)
    return classes[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0]


def membranes_graph(probs, config, margin: int):
    """The class mask (H, W) uint8 of lazy probabilities (K, H, W) with a membrane
    post-processing (`biounet.membranes.MembraneConfig`), block by block: each of `probs`'
    chunks from a window `margin` px wider, as `biounet.membranes.classes_in_chunks` makes it."""
    import dask
    import dask.array as da

    _, height, width = probs.shape
    rows = np.cumsum([0, *probs.chunks[1]])
    cols = np.cumsum([0, *probs.chunks[2]])
    grid = []
    for i in range(len(rows) - 1):
        line = []
        for j in range(len(cols) - 1):
            block = ((int(rows[i]), int(rows[i + 1])), (int(cols[j]), int(cols[j + 1])))
            window = window_box(block, (height, width), margin)
            (wy0, wy1), (wx0, wx1) = window
            task = dask.delayed(_membranes_task, pure=True)(
                _pieces(probs[:, wy0:wy1, wx0:wx1]), config, window, block
            )
            shape = (block[0][1] - block[0][0], block[1][1] - block[1][0])
            line.append(da.from_delayed(task, shape, np.uint8))
        grid.append(line)
    return da.block(grid)


def _owned_task(probs, config: InstanceConfig, window, block, shape):
    local, keys, wide = owned_objects(np.block(probs), config, window, block, shape)
    return local, (keys, wide)


def _rank_task(found: list, margin: int) -> tuple[np.ndarray, np.ndarray]:
    keys = [k for k, _ in found]
    too_wide = sum(w for _, w in found)
    if too_wide:
        logger.warning(
            "%d object(s) in clumps wider than the %d px margin: they may differ from "
            "whole-image post-processing; raise the margin", too_wide, margin,
        )  # fmt: skip
    final = rank_ids(keys)
    starts = np.cumsum([0, *[len(k) for k in keys]])[:-1]
    return final, starts


def _compose_task(block, parts, ranked) -> np.ndarray:
    """A block's labels: the owned objects of the windows over it, in raster order of their
    blocks (later ones written over earlier ones, as `instances_in_chunks` does)."""
    final, starts = ranked
    (y0, y1), (x0, x1) = block
    out = np.zeros((y1 - y0, x1 - x0), np.uint32)
    for index, window, (local, _) in parts:
        (wy0, wy1), (wx0, wx1) = window
        ay0, ay1, ax0, ax1 = max(y0, wy0), min(y1, wy1), max(x0, wx0), min(x1, wx1)
        if ay0 >= ay1 or ax0 >= ax1:
            continue
        ids = local[ay0 - wy0 : ay1 - wy0, ax0 - wx0 : ax1 - wx0]
        mine = ids > 0
        region = out[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0]
        region[mine] = final[starts[index] + ids[mine]]
    return out


def instances_graph(probs, config: InstanceConfig, margin: int):
    """Instance labels (H, W) uint32 of lazy probabilities (K, H, W), block by block.

    The blocks are `probs`' chunks; each reads its neighbours' within `margin` px, which
    must be less than every block's side and exceed `edge_band` (see
    `biounet.instances.instances_in_chunks`, which this equals).
    """
    import dask
    import dask.array as da

    band = edge_band(config)
    if margin <= band:
        raise BiounetError(f"instance margin {margin} px must exceed {band} px (`instance_margin`)")
    _, height, width = probs.shape
    rows = np.cumsum([0, *probs.chunks[1]])
    cols = np.cumsum([0, *probs.chunks[2]])
    inner = [*probs.chunks[1][:-1], *probs.chunks[2][:-1]]  # the last blocks may be short
    if inner and min(inner) <= margin:
        raise BiounetError(f"blocks must be wider than the instance margin {margin} px")
    blocks = [
        ((int(rows[i]), int(rows[i + 1])), (int(cols[j]), int(cols[j + 1])))
        for i in range(len(rows) - 1)
        for j in range(len(cols) - 1)
    ]
    windows = [window_box(b, (height, width), margin) for b in blocks]
    owned = [
        dask.delayed(_owned_task, pure=True, nout=2)(
            _pieces(probs[:, wy0:wy1, wx0:wx1]), config, w, b, (height, width)
        )
        for b, w in zip(blocks, windows, strict=True)
        for (wy0, wy1), (wx0, wx1) in [w]
    ]
    ranked = dask.delayed(_rank_task, pure=True)([o[1] for o in owned], margin)
    ncols = len(cols) - 1
    grid = []
    for index, block in enumerate(blocks):
        i, j = divmod(index, ncols)
        near = [
            (n, windows[n], owned[n])
            for di in (-1, 0, 1)
            for dj in (-1, 0, 1)
            if 0 <= i + di < len(rows) - 1 and 0 <= j + dj < ncols
            for n in [(i + di) * ncols + (j + dj)]
        ]
        near.sort(key=lambda t: t[0])
        task = dask.delayed(_compose_task, pure=True)(block, near, ranked)
        (by0, by1), (bx0, bx1) = block
        cell = da.from_delayed(task, (by1 - by0, bx1 - bx0), np.uint32)
        if j == 0:
            grid.append([])
        grid[-1].append(cell)
    return da.block(grid)
