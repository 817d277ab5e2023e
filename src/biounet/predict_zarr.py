"""Block-wise prediction into zarr: zarr and OME-Zarr inputs, and any input on a cluster.

The graph is `biounet.graph`'s. Here the input is opened lazily, the output made in a
temporary folder beside its final name, its blocks stored by dask (each block writes its own
region of the zarr array, aligned to its chunks, so a block computed twice writes the same
bytes), and the folder renamed into place once every block is written: an output exists
only complete.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from biounet.configs import PredictConfig
from biounet.durable import atomic_dir, fault_point
from biounet.errors import BiounetError
from biounet.io_zarr import (
    ZarrImage,
    create_labels,
    create_output,
    is_zarr,
    open_output,
    open_zarr_image,
    output_name,
    space_of_tiff,
    tiff_to_dask,
    zarr_stem,
)

log = logging.getLogger(__name__)


@dataclass
class BlockwiseInput:
    """An input opened for block-wise prediction, and where its output goes."""

    path: Path
    source: object  # dask array (C, H, W)
    image: ZarrImage | None  # the zarr input's description (None for files)
    target: Path
    ome: dict | None = None  # its y/x units and pixel size, where it states them


def blockwise(path: Path, config: PredictConfig) -> bool:
    """Whether `path` is predicted block by block: zarr inputs always, any with `blockwise`."""
    return is_zarr(path) or config.blockwise


def open_blockwise(path: Path, out_dir: Path, in_channels: int, config) -> BlockwiseInput:
    """Open `path` lazily and check it against the model and `config` (nothing written).

    Paths are made absolute: cluster workers may run in other folders."""
    path, out_dir = Path(path).absolute(), Path(out_dir).absolute()
    if config.overlay:
        raise BiounetError(
            f"{path}: block-wise prediction (zarr inputs, `cluster`) writes no overlay; "
            "drop `overlay`"
        )
    image, ome = None, None
    if is_zarr(path):
        image = open_zarr_image(path)
        source, ome = image.to_dask(), image.ome
    elif path.suffix.lower() in (".tif", ".tiff"):
        source, ome = tiff_to_dask(path), space_of_tiff(path)
    else:
        import dask.array as da

        from biounet.io import read_image

        source = da.from_array(read_image(path), chunks=-1)
    if source.shape[0] != in_channels:
        raise BiounetError(
            f"{path}: has {source.shape[0]} channel(s) but the model expects {in_channels}"
        )
    target = Path(out_dir) / output_name(path, ome)
    return BlockwiseInput(path, source, image, target, ome)


def done_blockwise(target: Path, config: PredictConfig, num_classes: int) -> bool:
    """The output at `target` is there and of the kind asked for."""
    if not target.is_dir():
        return False
    try:
        array = open_output(target)
        shape, dtype = array.shape, np.dtype(array.dtype)
    except Exception:  # unreadable: predict it again
        return False
    if config.output == "prob":
        return dtype == np.float32 and len(shape) == 3 and shape[0] == num_classes
    wanted = np.uint8 if config.output == "mask" else np.uint32
    return dtype == wanted and len(shape) == 2


def predict_blockwise(spec, info, item: BlockwiseInput, config, scheduler=None) -> Path:
    """Predict one opened input into its zarr output; returns the output's path.

    `spec`: the network (`biounet.graph.NetSpec`); `scheduler`: where dask computes (a
    dask.distributed Client, "synchronous", or None for dask's default).
    """
    import dask.array as da

    from biounet.graph import predict_graph

    result = predict_graph(item.source, spec, info, config, config.output, scheduler)
    chunks = tuple(c[0] for c in result.chunks)  # the blocks' size; the last ones differ
    attributes = {
        "biounet": {
            "output": config.output,
            "classes": list(info.class_names),
            "input": item.path.name,
            "computed_by": spec.describe(),
        }
    }
    with atomic_dir(item.target) as tmp:
        name = zarr_stem(item.target)
        if config.output == "instances" and item.ome is not None:
            # NGFF: labels live in an image. The image is the objects' mask (0/1, uint8),
            # the labels image `labels/instances`; one pass computes both.
            mask = create_output(tmp, result.shape, np.uint8, chunks, item.ome, attributes,
                                 name=name)  # fmt: skip
            labels = create_labels(tmp, result.shape, result.dtype, chunks, item.ome,
                                   attributes)  # fmt: skip
            sources, targets = [(result > 0).astype(np.uint8), result], [mask, labels]
        else:
            array = create_output(tmp, result.shape, result.dtype, chunks, item.ome,
                                  attributes, name=name)  # fmt: skip
            sources, targets = [result], [array]
        da.store(sources, targets, lock=False, compute=True, scheduler=scheduler)
        fault_point(f"{item.target.name}: blocks written")
    log.info("wrote %s", item.target)
    return item.target
