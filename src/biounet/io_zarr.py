"""Zarr and OME-Zarr images: the full-resolution level read lazily, outputs written as zarr.

Inputs: a zarr array ``X.zarr`` ((H, W), (C, H, W) or (H, W, C), or named by its v3
``dimension_names``), an OME-Zarr image ``X.ome.zarr`` (NGFF 0.4 or 0.5, read with
ome-zarr-models: level 0, axes and pixel size from the metadata; axes other than c, y and x
must have one element), or a TIFF through tifffile's zarr store. Each becomes a dask array
(C, H, W) that reads only the windows asked for. Outputs: a zarr array ``DIR/X.zarr``, or for
an OME-Zarr input an OME-Zarr image ``DIR/X.ome.zarr`` (NGFF 0.5) with the input's y and x
axes, units and scale, written region by region by whoever computes each block.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from biounet.errors import BiounetError

OME_SUFFIX = ".ome.zarr"


def is_zarr(path: Path) -> bool:
    """Whether `path` names a zarr store (a folder ``*.zarr``, ``*.ome.zarr`` included)."""
    return Path(path).suffix.lower() == ".zarr"


def zarr_stem(path: Path) -> str:
    """``X`` of ``X.zarr`` and of ``X.ome.zarr``."""
    name = Path(path).name
    if name.lower().endswith(OME_SUFFIX):
        return name[: -len(OME_SUFFIX)]
    return Path(name).stem


@dataclass(frozen=True)
class ZarrImage:
    """One 2-D image in a zarr store.

    Attributes
    ----------
    path : Path
    array : zarr.Array
        The full-resolution data, as stored.
    axes : tuple of str
        Name of each of `array`'s axes ("c", "y", "x", and e.g. "t", "z" of length 1).
    ome : dict or None
        For OME-Zarr: the y and x axes' ``unit`` and ``scale`` (the pixel size).
    """

    path: Path
    array: object
    axes: tuple[str, ...]
    ome: dict | None = field(default=None)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        size = dict(zip(self.axes, self.array.shape, strict=True))
        return size.get("c", 1), size["y"], size["x"]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    def to_dask(self):
        """The image as a lazy dask array (C, H, W)."""
        import dask.array as da

        data = da.from_zarr(self.array)
        drop = tuple(i for i, a in enumerate(self.axes) if a not in "cyx")
        data = data[tuple(0 if i in drop else slice(None) for i in range(data.ndim))]
        kept = [a for a in self.axes if a in "cyx"]
        if "c" not in kept:
            data, kept = data[None], ["c", *kept]
        return data.transpose([kept.index(a) for a in "cyx"])


def open_zarr_image(path: Path) -> ZarrImage:
    """The image in the zarr array or OME-Zarr image at `path` (checked, nothing read yet)."""
    import zarr

    path = Path(path)
    if not path.is_dir():
        raise BiounetError(f"{path}: no such zarr folder")
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:
        raise BiounetError(
            f"{path}: cannot be read as zarr ({exc.__class__.__name__}); is it complete?"
        ) from None
    if isinstance(node, zarr.Group):
        return _ome_image(path)
    names = getattr(node.metadata, "dimension_names", None)
    axes = tuple(n.lower() for n in names) if names and all(names) else _guess_axes(node.shape)
    return _checked(ZarrImage(path, node, axes), path)


def _guess_axes(shape: tuple[int, ...]) -> tuple[str, ...]:
    if len(shape) == 2:
        return ("y", "x")
    if len(shape) == 3 and shape[0] <= 4:
        return ("c", "y", "x")
    if len(shape) == 3 and shape[-1] <= 4:
        return ("y", "x", "c")
    return ("?",) * len(shape)


def _ome_image(path: Path) -> ZarrImage:
    import zarr
    from ome_zarr_models import open_ome_zarr

    try:
        group = open_ome_zarr(str(path))
        multiscale = group.ome_attributes.multiscales[0]
        level = multiscale.datasets[0]
        array = zarr.open_array(str(path / level.path), mode="r")
    except Exception as exc:
        raise BiounetError(
            f"{path}: a zarr group, but not a readable OME-Zarr image "
            f"({exc.__class__.__name__}); give the array inside it (X.zarr/NAME) or an "
            "OME-Zarr image"
        ) from None
    axes = tuple(a.name.lower() for a in multiscale.axes)
    transforms = {t.type: list(getattr(t, t.type, [])) for t in level.coordinateTransformations}
    scale = transforms.get("scale") or [1.0] * len(axes)
    shift = transforms.get("translation") or [0.0] * len(axes)
    ome = {
        a.name.lower(): {"unit": a.unit, "scale": float(s), "translation": float(t)}
        for a, s, t in zip(multiscale.axes, scale, shift, strict=True)
        if a.name.lower() in ("y", "x")
    }
    return _checked(ZarrImage(path, array, axes, ome), path)


def _checked(image: ZarrImage, path: Path) -> ZarrImage:
    axes, shape = image.axes, image.array.shape
    if len(axes) != len(shape) or "y" not in axes or "x" not in axes or len(set(axes)) != len(axes):
        raise BiounetError(
            f"{path}: has shape {tuple(shape)}; expected one 2-D image (H, W), (C, H, W) or "
            "(H, W, C), or axes named y and x"
        )
    for name, size in zip(axes, shape, strict=True):
        if name not in "cyx" and size != 1:
            raise BiounetError(
                f"{path}: its {name} axis has {size} elements; biounet segments 2-D images: "
                "give one plane"
            )
    if image.dtype.kind not in "uif":
        raise BiounetError(f"{path}: holds {image.dtype} values; expected real numbers")
    return image


# -- TIFF inputs as dask arrays ---------------------------------------------------------------


class TiffRegions:
    """A TIFF that opens itself in whichever process reads from it: a dask array built on it
    travels to cluster workers as its path alone."""

    def __init__(self, path: Path) -> None:
        from biounet.io import LazyImage

        self.path = Path(path)
        with LazyImage(self.path) as image:  # checked here, once
            self.shape, self.dtype = image.shape, image.dtype
        self.ndim = 3

    def __reduce__(self):
        return TiffRegions, (self.path,)

    def __getitem__(self, key) -> np.ndarray:
        channels, rows, cols = key
        return _opened(self.path)[..., rows, cols][channels]


@functools.lru_cache(maxsize=8)
def _opened(path: Path):
    from biounet.io import LazyImage

    return LazyImage(path)


def tiff_to_dask(path: Path):
    """A TIFF of any size as a lazy dask array (C, H, W)."""
    import dask.array as da

    regions = TiffRegions(path)
    return da.from_array(regions, chunks=(regions.shape[0], 2048, 2048), asarray=False)


# -- outputs -------------------------------------------------------------------------------


# NGFF names the units of UDUNITS-2; TIFF metadata abbreviates them.
_NGFF_UNITS = {"µm": "micrometer", "nm": "nanometer", "mm": "millimeter", "cm": "centimeter"}


def space_of_tiff(path: Path) -> dict | None:
    """The y/x axes' ``unit``, ``scale`` and ``translation`` (`ZarrImage.ome`'s form) of a
    TIFF that states a pixel size (`biounet.io.read_pixel_size`), else None."""
    from biounet.io import read_pixel_size

    size = read_pixel_size(path)
    if size is None:
        return None
    unit = _NGFF_UNITS.get(size.unit, size.unit)
    return {
        "y": {"unit": unit, "scale": size.y, "translation": 0.0},
        "x": {"unit": unit, "scale": size.x, "translation": 0.0},
    }


def output_name(path: Path, ome: dict | None) -> str:
    """The zarr output of input `path`: ``X.ome.zarr`` where the input states its pixel
    size (`ome`: an OME-Zarr input, or a calibrated TIFF), else ``X.zarr``."""
    stem = zarr_stem(path) if is_zarr(path) else Path(path).stem
    return stem + (OME_SUFFIX if ome is not None else ".zarr")


def create_output(
    folder: Path,
    shape: tuple[int, ...],
    dtype,
    chunks: tuple[int, ...],
    ome: dict | None = None,
    attributes: dict | None = None,
    name: str | None = None,
):
    """An empty output array in `folder` (which it makes), ready for region writes.

    (H, W) outputs are masks or labels, (K, H, W) class probabilities. With `ome` (the
    input's y and x axes as `ZarrImage.ome` holds them), `folder` becomes an OME-Zarr image
    (level ``0``, named `name`) with those axes.
    """
    import zarr

    if ome is None:
        array = zarr.create_array(
            store=str(folder), shape=shape, dtype=dtype, chunks=chunks, fill_value=0,
            dimension_names=("c", "y", "x")[-len(shape) :], overwrite=True,
        )  # fmt: skip
        array.attrs.update(attributes or {})
        return array
    from ome_zarr_models.v05.axes import Axis
    from ome_zarr_models.v05.image import Image
    from pydantic_zarr.v3 import ArraySpec

    names = ("c", "y", "x")[-len(shape) :]
    template = zarr.create_array(store={}, shape=shape, dtype=dtype, chunks=chunks, fill_value=0)
    axes = [
        Axis(name="c", type="channel")
        if n == "c"
        else Axis(name=n, type="space", unit=ome[n]["unit"])
        for n in names
    ]
    scale = [1.0 if n == "c" else ome[n]["scale"] for n in names]
    shift = [0.0 if n == "c" else ome[n]["translation"] for n in names]
    image = Image.new(
        array_specs=[ArraySpec.from_array(template, dimension_names=list(names))],
        paths=["0"], axes=axes, scales=[scale], translations=[shift if any(shift) else None],
        name=name, metadata=attributes,
    )  # fmt: skip
    image.to_zarr(zarr.storage.LocalStore(str(folder)), path="")
    return zarr.open_array(str(Path(folder) / "0"), mode="r+")


LABELS = "instances"  # the NGFF labels image instance outputs are written as


def create_labels(folder: Path, shape: tuple[int, int], dtype, chunks: tuple[int, ...],
                  ome: dict, attributes: dict | None = None, name: str = LABELS):  # fmt: skip
    """An empty NGFF labels image ``folder/labels/<name>`` inside the OME-Zarr image `folder`
    (made by `create_output`): the ``labels`` group lists it, and its own metadata is an
    image's (same axes and scale) plus ``image-label`` pointing back at the image."""
    import zarr

    labels = Path(folder) / "labels"
    zarr.open_group(str(labels), mode="w", zarr_format=3,
                    attributes={"ome": {"version": "0.5", "labels": [name]}})  # fmt: skip
    array = create_output(labels / name, shape, dtype, chunks, ome, attributes, name=name)
    group = zarr.open_group(str(labels / name), mode="r+")
    group.attrs["ome"] = {**group.attrs["ome"], "image-label": {"source": {"image": "../../"}}}
    return array


def open_output(folder: Path):
    """The output array `create_output` made in `folder`: its level ``0`` for OME-Zarr, and
    the labels image's level ``0`` where instance labels were written as NGFF labels."""
    import zarr

    node = zarr.open(str(folder), mode="r")
    if not isinstance(node, zarr.Group):
        return node
    if (Path(folder) / "labels" / LABELS / "0").is_dir():
        return node["labels"][LABELS]["0"]
    return node["0"]
