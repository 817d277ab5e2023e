"""Prediction: files in, masks or probability maps out, via overlap-tile inference.

The instance post-processing (scipy, scikit-image) and the overlay pictures (matplotlib) are
imported where they are used: a mask or probability run does not pay their ~1.5 s of imports.
"""

from __future__ import annotations

import glob
import logging
import tempfile
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tifffile
import torch

from biounet.checks import available_memory, check_fits
from biounet.configs import PredictConfig
from biounet.durable import fault_point, remove_leftovers, temp_prefix
from biounet.errors import BiounetError
from biounet.inference import Engine, softmax
from biounet.io import (
    ensure_dir,
    is_image_file,
    list_images,
    read_image,
    read_pixel_size,
    write_png,
    write_tiff,
)
from biounet.io_zarr import is_zarr, zarr_stem
from biounet.model import UNet
from biounet.modeldir import ModelInfo, load_model
from biounet.normalize import apply_normalization, normalization_params, normalize
from biounet.precision import bytes_per_value, default_device
from biounet.runtimes import choose
from biounet.tiling import TilePlan, plan_for, plan_tiles, tile_memory

if TYPE_CHECKING:
    from biounet.instances import InstanceConfig

log = logging.getLogger(__name__)


def tile_plan(
    info: ModelInfo, shape: tuple[int, int], config: PredictConfig, precision: str
) -> TilePlan:
    """The tiling of an image of `shape` for this model and configuration."""
    return plan_for(info.net, shape, config.tiling, precision)


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files, zarr stores, folders (their images and zarr stores) and glob patterns -> inputs,
    in the given order."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir() and is_zarr(path):
            files.append(path)
        elif path.is_dir():
            stores = sorted(p for p in path.iterdir() if p.is_dir() and is_zarr(p))
            # list_images says what it expected when the folder holds neither
            images = sorted(p for p in path.iterdir() if is_image_file(p)) if stores else None
            files.extend((list_images(path) if images is None else images) + stores)
        elif path.is_file():
            files.append(path)
        elif glob.has_magic(str(item)):
            matches = sorted(
                Path(p)
                for p in glob.glob(str(item))
                if is_image_file(Path(p)) or (is_zarr(Path(p)) and Path(p).is_dir())
            )
            if not matches:
                raise BiounetError(f"{item}: the pattern matches no image files")
            files.extend(matches)
        else:
            raise BiounetError(f"{item}: no such file or folder")
    stems: dict[str, Path] = {}
    for f in files:
        stem = zarr_stem(f) if is_zarr(f) else f.stem
        if stem in stems and stems[stem] != f:
            raise BiounetError(
                f"{f}: has the same name stem as {stems[stem]}; outputs would overwrite each "
                "other, so predict them into different `out` folders"
            )
        stems[stem] = f
    return files


def predict_array(
    model: UNet,
    info: ModelInfo,
    image: np.ndarray,
    config: PredictConfig,
    device: torch.device | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Class probabilities for one raw image (sets up an `Engine` for this one call).

    Parameters
    ----------
    image : ndarray, shape (C, H, W), raw intensities
        Normalised here exactly as during training (the model's stored normalisation).

    Returns
    -------
    ndarray of float32, shape (K, H, W), softmax probabilities
    """
    engine = Engine(model, device, config.precision, None, config.engine, config.cache)
    tta = wants_tta(config, info)
    return engine.probabilities(image, info.normalization, config.tiling, tta, progress)


def output_array(probs: np.ndarray, info: ModelInfo, output: str) -> np.ndarray:
    """What ``output`` asks for, from probabilities (K, H, W).

    Returns
    -------
    ndarray
        "prob": the float32 probabilities; "mask": uint8 class indices (H, W); "instances":
        labels 1..N (H, W), uint16, or uint32 beyond 65535 objects.
    """
    if output == "prob":
        return probs
    if output == "mask":
        return class_mask(probs, info)
    from biounet.instances import instances_from_probabilities

    labels = instances_from_probabilities(probs, instance_config(info))
    return labels.astype(np.uint16 if labels.max() < 2**16 else np.uint32)


def class_mask(probs: np.ndarray, info: ModelInfo) -> np.ndarray:
    """uint8 class indices (H, W) of probabilities (K, H, W): the argmax, or, where the model
    stores a membrane post-processing (`biounet.membranes`), its membranes and elsewhere the
    likeliest other class."""
    post = membrane_config(info)
    if post is None:
        return probs.argmax(0).astype(np.uint8)
    from biounet.membranes import membrane_classes

    return membrane_classes(probs, post)


def wants_tta(config: PredictConfig, info: ModelInfo) -> bool:
    """Whether to predict with TTA: as `config` says, else as the model stores it
    (``postprocess.tta``), else not."""
    if config.tta is not None:
        return config.tta
    return bool((info.postprocess or {}).get("tta", False))


def membrane_config(info: ModelInfo):
    """The model's stored membrane post-processing (`biounet.membranes.MembraneConfig`), or
    None: masks are then the argmax."""
    stored = (info.postprocess or {}).get("membranes")
    if stored is None:
        return None
    from biounet.membranes import MembraneConfig

    return MembraneConfig(**stored)


def overlay_picture(
    info: ModelInfo, normalized: np.ndarray, probs: np.ndarray, result: np.ndarray, output: str
) -> np.ndarray:
    """RGB picture of a prediction over its normalised image: classes in colour, or instance
    contours."""
    from biounet.plots import instance_overlay, overlay, to_uint8

    gray = to_uint8(normalized)
    if output == "instances":
        return instance_overlay(gray, result)
    return overlay(gray, result if output == "mask" else class_mask(probs, info))


def predict_large(
    model: UNet | Engine,
    info: ModelInfo,
    path: Path,
    target: Path,
    config: PredictConfig,
    device: torch.device | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Class mask or instance labels of a TIFF of any size, read and written tile by tile.

    The input is memory-mapped or read chunk-wise (`LazyImage`); normalisation statistics come
    from a regular subsample of ~4 megapixels (percentiles of a subsample differ from the full
    image's by sampling noise only); the output is a zlib-compressed tiled TIFF whose tiles are
    the stride blocks of overlap-tile prediction. Masks are written in order as they are
    computed. Instances go through two temporary zarr arrays beside `target` (probabilities,
    4 bytes per pixel and class, and labels, 4 bytes per pixel; compressed, deleted at the
    end) and `instances_in_chunks`, which labels block by block exactly as the whole image
    would be; so do the masks of a model with a stored membrane post-processing
    (`biounet.membranes.classes_in_chunks`, blocks read with ``instance_margin`` px of
    context). Memory: one batch of tiles or one block, whatever the image size.
    """
    from biounet.io import LazyImage, atomic_path

    if config.output == "mask" and membrane_config(info) is not None:
        from biounet.membranes import reach

        need = reach(membrane_config(info))
        if config.instance_margin <= need:
            raise BiounetError(
                f"{path}: margin {config.instance_margin} px must exceed {need} px for this "
                f"model's membrane smoothing; use `instance_margin` {need + 1} or more"
            )
    if config.output == "instances":  # checked before any work, not after the prediction
        from biounet.instances import edge_band

        need = edge_band(instance_config(info))
        if config.instance_margin <= need:
            raise BiounetError(
                f"{path}: instance margin {config.instance_margin} px must exceed {need} px for "
                f"this model's post-processing; use `instance_margin` {need + 1} or more"
            )
    engine = model
    if not isinstance(model, Engine):
        engine = Engine(model, device, config.precision, None, config.engine, config.cache)
    with LazyImage(path) as src:
        if src.shape[0] != info.net.in_channels:
            raise BiounetError(
                f"{path}: has {src.shape[0]} channel(s) but the model expects "
                f"{info.net.in_channels}"
            )
        offset, scale = _statistics(src, info.normalization)
        _, height, width = src.shape
        plan = engine.plan((height, width), config.tiling)
        # TIFF tiles must be multiples of 16 px; any multiple of 16 is on the pooling grid of a
        # depth <= 4 network, and deeper networks' strides are multiples of 16 already.
        ty, tx = plan.y.stride // 16 * 16, plan.x.stride // 16 * 16
        if min(ty, tx) < 16:
            raise BiounetError(
                "streaming needs output tiles of at least 16 px; use a larger `tile`"
            )
        rows, cols = range(0, height, ty), range(0, width, tx)
        total = len(rows) * len(cols)

        def blocks():
            """Logits of the (ty, tx) output blocks in raster order (the last ones overhang)."""
            origins = ((oy, ox) for oy in rows for ox in cols)
            return engine.blocks(
                src,
                plan,
                origins,
                (ty, tx),
                config.tiling,
                prepare=lambda window: apply_normalization(window, offset, scale),
                progress=progress,
                total=total,
                tta=wants_tta(config, info),
            )

        size = read_pixel_size(path)
        extra = size.tiff_options(2) if size is not None else {}

        def write(tmp: Path, tiles, dtype) -> None:
            tifffile.imwrite(
                tmp,
                data=tiles,
                shape=(height, width),
                dtype=dtype,
                tile=(ty, tx),
                compression="zlib",
                photometric="minisblack",
                software=made_by(engine),
                **extra,
            )

        # closing: a failed write stops the tile loop's threads at once
        with atomic_path(target) as tmp, closing(blocks()) as stream:
            if config.output == "mask" and membrane_config(info) is None:
                write(tmp, (np.asarray(lg.argmax(0), np.uint8) for _, _, lg in stream), np.uint8)
                return
            with tempfile.TemporaryDirectory(
                prefix=temp_prefix(target.name), suffix=".work", dir=target.parent
            ) as work:
                probs = _stream_probabilities(info, stream, (height, width), (ty, tx), Path(work))
                result, dtype = _post_in_chunks(info, probs, Path(work), config)
                write(tmp, _read_blocks(result, (ty, tx), dtype), dtype)


_STATISTICS_PX = 1 << 22


def _statistics(src, normalization) -> tuple[np.ndarray, np.ndarray]:
    """Normalisation of a streamed image: exact percentiles from the value counts of bands of
    rows for integer images (as `biounet.graph` computes them block-wise), else those of a
    regular subsample (`LazyImage.sample`)."""
    from biounet.normalize import merge_counts, params_from_counts, value_counts

    if not (np.issubdtype(src.dtype, np.integer) and normalization.method == "percentile"):
        return normalization_params(src.sample(), normalization)
    counts = None
    # Counted in bands of ~4 megapixels, whatever the width (memory does not grow with the
    # image), read in bands of whole stored chunks (each tile decoded once).
    rows = max(1, _STATISTICS_PX // src.shape[2])
    read = -(-rows // src.row_chunk) * src.row_chunk
    for r in range(0, src.shape[1], read):
        block = src[..., r : r + read, :]
        for b in range(0, block.shape[1], rows):
            band = value_counts(block[:, b : b + rows])
            counts = band if counts is None else merge_counts(counts, band)
    return params_from_counts(counts, src.dtype, normalization)


# Blocks of 1024 px (with `instance_margin` px of context): clumps of touching cells narrower
# than the margin come out exactly as whole-image post-processing gives them.
_INSTANCE_CHUNK = 1024


def _stream_probabilities(info: ModelInfo, blocks, shape, block_shape, work: Path):
    """The probabilities of the logit `blocks`, in a zarr array in `work`."""
    import zarr

    height, width = shape
    k = info.net.num_classes
    # zarr chunks of whole output blocks, >= 512 px: small tiles would make millions of files
    chunks = tuple(b * -(-512 // b) for b in block_shape)
    probs = zarr.open_array(
        store=str(work / "probs.zarr"), mode="w", shape=(k, height, width),
        chunks=(k, *chunks), dtype=np.float32,
    )  # fmt: skip
    for oy, ox, logits in blocks:
        h, w = min(block_shape[0], height - oy), min(block_shape[1], width - ox)
        probs[:, oy : oy + h, ox : ox + w] = softmax(np.array(logits[:, :h, :w], np.float32))
    fault_point(f"{work.name}: probabilities written")
    return probs


def _post_in_chunks(info: ModelInfo, probs, work: Path, config: PredictConfig):
    """Instance labels (or a mask with the stored membrane post-processing) of streamed
    probabilities, block by block, in a zarr array in `work`; with its output dtype."""
    import zarr

    chunks, margin = probs.chunks[1:], config.instance_margin
    instances = config.output == "instances"
    result = zarr.open_array(
        store=str(work / "result.zarr"), mode="w", shape=probs.shape[1:], chunks=chunks,
        dtype=np.uint32 if instances else np.uint8, fill_value=0,
    )  # fmt: skip
    if instances:
        from biounet.instances import instances_in_chunks

        post = instance_config(info)
        n = instances_in_chunks(probs, result, post, chunk=_INSTANCE_CHUNK, margin=margin)
        dtype = np.uint16 if n < 2**16 else np.uint32
    else:
        from biounet.membranes import classes_in_chunks

        classes_in_chunks(probs, result, membrane_config(info), _INSTANCE_CHUNK, margin)
        dtype = np.uint8
    fault_point(f"{work.name}: labels written")
    return result, dtype


def _read_blocks(labels, block_shape: tuple[int, int], dtype):
    """(ty, tx) blocks of the labels in raster order, zero-padded at the edges."""
    height, width = labels.shape
    for oy in range(0, height, block_shape[0]):
        for ox in range(0, width, block_shape[1]):
            block = np.zeros(block_shape, dtype)
            part = labels[oy : oy + block_shape[0], ox : ox + block_shape[1]]
            block[: part.shape[0], : part.shape[1]] = part
            yield block


def _streams(path: Path, config: PredictConfig) -> bool:
    """Large TIFF, masks or instances: read and write tile by tile."""
    from biounet.io import image_pixels

    return (
        config.output in ("mask", "instances")
        and not config.overlay
        and path.suffix.lower() in (".tif", ".tiff")  # other formats decode whole anyway
        and (config.stream or image_pixels(path) > config.stream_pixels)
    )


def made_by(engine: Engine) -> str:
    """The outputs' Software tag: biounet's version and what computed them."""
    from biounet import __version__

    return f"biounet {__version__} ({engine.describe()})"


def instance_config(info: ModelInfo) -> InstanceConfig:
    """The model's stored post-processing, else a default for its number of classes."""
    from biounet.instances import InstanceConfig

    stored = (info.postprocess or {}).get("instances")
    if stored is not None:
        return InstanceConfig(**stored)
    if info.net.num_classes == 3:
        return InstanceConfig(border_class=2, expand=0)
    return InstanceConfig()


def _check_tile_memory(info: ModelInfo, config: PredictConfig, image_shape, device) -> None:
    """Refuse, before any work, an explicit tile whose batch cannot fit in memory."""
    _, precision = choose(config.engine, config.precision, device, info.net)
    shape = plan_for(info.net, image_shape, config.tiling, precision).tile_shape
    need = tile_memory(info.net, shape, config.batch_size, bytes_per_value(precision))
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_memory()
    check_fits(need, free, f"predicting {config.batch_size} tile(s) of {shape[0]} px",
               "lower `tile` or `batch_size`, or leave `tile` out")  # fmt: skip


def outputs_of(path: Path, out_dir: Path, config: PredictConfig) -> list[Path]:
    """The files that predicting `path` writes: ``STEM.tif``, and ``STEM_overlay.png``."""
    target = Path(out_dir) / f"{path.stem}.tif"
    return [target, Path(out_dir) / f"{path.stem}_overlay.png"] if config.overlay else [target]


def _done(path: Path, out_dir: Path, config: PredictConfig, info: ModelInfo) -> bool:
    """All outputs of `path` exist, and the TIFF is of the kind asked for (a mask is not taken
    for the probabilities of another run). Outputs appear only complete (`atomic_path`)."""
    outputs = outputs_of(path, out_dir, config)
    if not all(o.is_file() for o in outputs):
        return False
    try:
        with tifffile.TiffFile(outputs[0]) as tif:
            shape, dtype = tif.series[0].shape, np.dtype(tif.series[0].dtype)
    except Exception:  # unreadable: predict it again
        return False
    if config.output == "prob":
        return dtype == np.float32 and len(shape) == 3 and shape[0] == info.net.num_classes
    if config.output == "mask":
        return dtype == np.uint8 and len(shape) == 2
    return dtype in (np.uint16, np.uint32) and len(shape) == 2


def predict_files(
    model_dir: Path,
    inputs: list[str | Path],
    out_dir: Path,
    config: PredictConfig,
    device: torch.device | None = None,
    on_file: Callable[[Path, int, int], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_skip: Callable[[Path], None] | None = None,
    connect: Callable[[], object] | None = None,
) -> list[Path]:
    """Predict every input image and write ``out_dir/STEM.tif`` (and overlays).

    Zarr inputs (and every input with ``config.blockwise``) are predicted block by block
    into ``out_dir/STEM.zarr`` (``STEM.ome.zarr`` for OME-Zarr) by dask, on the scheduler
    `connect` returns (a dask.distributed Client, or "synchronous"; called once, after all
    checks; default: this process); see `biounet.predict_zarr`. All inputs are checked
    (exist, readable, right channels) before the first output is written. With
    ``config.skip_existing``, inputs all of whose outputs exist are skipped (`on_skip` is
    told): outputs are renamed into place complete, so present means done. Leftovers of
    killed runs in `out_dir` are removed first. Returns the written paths.
    """
    from biounet.predict_zarr import blockwise, done_blockwise, open_blockwise

    model, info = load_model(Path(model_dir))
    files = expand_inputs(inputs)
    choose(config.engine, config.precision, device or default_device())  # refused up front
    if config.tile is not None:
        plan_tiles(info.net, (1, 1), config.tile, config.halo)  # refuse a bad tile up front
    inputs_resolved = {f.resolve() for f in files}
    todo = []
    for f in files:
        item, shape = None, None
        if blockwise(f, config):
            item = open_blockwise(f, Path(out_dir), info.net.in_channels, config)
            target, shape = item.target, item.source.shape[1:]
        else:
            target = outputs_of(f, out_dir, config)[0]
        if target.resolve() in inputs_resolved:
            raise BiounetError(
                f"{f}: its output {target} would overwrite an input; choose another `out` folder"
            )
        done = (
            done_blockwise(target, config, info.net.num_classes)
            if item is not None
            else _done(f, out_dir, config, info)
        )
        if config.skip_existing and done:
            if on_skip is not None:
                on_skip(f)
            continue
        if shape is None and _streams(f, config):
            from biounet.io import LazyImage

            with LazyImage(f) as lazy:
                shape = lazy.shape[1:]
        elif shape is None:
            shape = read_image(f, info.net.in_channels).shape[1:]
        if config.tile is not None:
            _check_tile_memory(info, config, shape, device or default_device())
        todo.append((f, item))
    scheduler = None
    if any(item is not None for _, item in todo):  # before anything is written
        scheduler = connect() if connect is not None else "synchronous"
    ensure_dir(Path(out_dir))
    remove_leftovers(Path(out_dir))
    # set up once for all files
    engine = Engine(model, device, config.precision, None, config.engine, config.cache)
    written, spec = [], None
    for i, (f, item) in enumerate(todo):
        if on_file is not None:
            on_file(f, i, len(todo))
        if item is None:
            written += _predict_file(engine, info, f, out_dir, config, progress)
            continue
        from biounet.graph import NetSpec
        from biounet.predict_zarr import predict_blockwise

        # Workers compute on the device, with the engine and at the precision resolved here.
        spec = spec or NetSpec.of(model, info, engine, config.cache)
        written.append(predict_blockwise(spec, info, item, config, scheduler))
    return written


def _predict_file(engine, info, path: Path, out_dir: Path, config, progress) -> list[Path]:
    target, *overlay = outputs_of(path, out_dir, config)
    if _streams(path, config):
        predict_large(engine, info, path, target, config, progress=progress)
        return [target]
    x = normalize(read_image(path, info.net.in_channels), info.normalization)
    probs = engine.probabilities(x, None, config.tiling, wants_tta(config, info), progress)
    result = output_array(probs, info, config.output)
    # outputs overlay the input at scale, and say what computed them
    write_tiff(target, result, read_pixel_size(path), made_by(engine))
    if overlay:
        write_png(overlay[0], overlay_picture(info, x, probs, result, config.output))
    log.info("wrote %s", target)
    return [target, *overlay]
