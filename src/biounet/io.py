"""Files in and out: images, masks, model directories, atomic writes.

Every problem with a user's file raises `BiounetError` with the file's name and the fix.
Every output is written to a temporary name in the same folder and renamed, so an
interrupted or failed run never leaves a half-written file behind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from biounet.durable import atomic_path, ensure_dir
from biounet.errors import BiounetError

__all__ = ["atomic_path", "ensure_dir"]  # and the readers and writers below

FLOAT32_MAX = float(np.finfo(np.float32).max)  # the network computes in float32 at most
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "weights.safetensors"


# -- listing ------------------------------------------------------------------------------


def is_image_file(path: Path) -> bool:
    return (
        path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
    )


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name."""
    if not folder.exists():
        raise BiounetError(f"{folder}: no such folder; check the path")
    if not folder.is_dir():
        raise BiounetError(f"{folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if is_image_file(p))
    if not files:
        raise BiounetError(
            f"{folder}: no images found (expected files ending in {', '.join(IMAGE_SUFFIXES)})"
        )
    return files


def pair_by_stem(images: list[Path], mask_folder: Path) -> list[tuple[Path, Path]]:
    """Match each image with the mask of the same file stem in `mask_folder`."""
    masks: dict[str, Path] = {}
    for mask in list_images(mask_folder):
        if mask.stem in masks:
            raise BiounetError(
                f"{mask}: has the same stem as {masks[mask.stem].name}; which one is the mask "
                "is ambiguous: keep one of them in the mask folder"
            )
        masks[mask.stem] = mask
    pairs = []
    for image in images:
        if image.stem not in masks:
            raise BiounetError(
                f"{image}: no mask named {image.stem}.* in {mask_folder}; "
                "masks must have the same file stem as their image"
            )
        pairs.append((image, masks[image.stem]))
    return pairs


# -- reading ------------------------------------------------------------------------------


def read_array(path: Path) -> np.ndarray:
    """Read an image file as stored (TIFF via tifffile, other formats via imageio)."""
    path = Path(path)
    if not path.exists():
        raise BiounetError(f"{path}: no such file")
    if not path.is_file():
        raise BiounetError(f"{path}: not a file")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            return tifffile.imread(path)
        import imageio.v3 as iio

        # From bytes: imageio leaves the file open when decoding fails.
        return iio.imread(path.read_bytes(), extension=path.suffix.lower())
    except Exception as exc:  # every reader fails differently; the user needs the file name
        raise BiounetError(
            f"{path}: cannot be read as an image ({exc.__class__.__name__}: "
            f"{str(exc)[:120]}); is the file complete and an image?"
        ) from None


def _squeeze(arr: np.ndarray) -> np.ndarray:
    """Drop singleton axes beyond the two image axes (e.g. (1, H, W) or (H, W, 1) -> (H, W))."""
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    while arr.ndim > 2 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return arr


def read_image(path: Path, in_channels: int | None = None) -> np.ndarray:
    """Read an image as channels-first ``(C, H, W)``.

    2-D files are gray (C=1). 3-D files are channels-last when the last axis has <= 4
    entries (RGB, RGBA PNG), channels-first when the first has <= 4 (TIFF); anything else is a
    stack and refused.

    Raises
    ------
    BiounetError
        Unreadable file, a 3-D stack, non-finite values, or a channel count that differs from
        `in_channels`.
    """
    arr = _squeeze(read_array(path))
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3 and arr.shape[-1] <= 4 and arr.shape[0] > 4:
        arr = np.moveaxis(arr, -1, 0)
    elif not (arr.ndim == 3 and arr.shape[0] <= 4):
        raise BiounetError(
            f"{path}: has shape {arr.shape}, which looks like a 3-D stack; biounet segments "
            "2-D images (gray or up to 4 channels): save each plane as its own file"
        )
    if arr.dtype.kind not in "uifb":
        raise BiounetError(f"{path}: unsupported pixel type {arr.dtype}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise BiounetError(f"{path}: contains NaN or infinite values; replace them before use")
    if arr.dtype.kind == "f" and arr.size and np.abs(arr).max() > FLOAT32_MAX:
        raise BiounetError(
            f"{path}: holds values beyond float32's range (|x| > 3.4e38); rescale the image"
        )
    if arr.dtype.kind == "b":  # a 1-bit TIFF: 0 and 1, as the integers they stand for
        arr = arr.astype(np.uint8)
    if in_channels is not None and arr.shape[0] != in_channels:
        raise BiounetError(
            f"{path}: has {arr.shape[0]} channel(s) but the model expects {in_channels}"
        )
    return arr


class LazyImage:
    """A TIFF on disk seen as a channels-first ``(C, H, W)`` array that reads on slicing.

    Uncompressed contiguous TIFFs are memory-mapped; tiled or compressed ones are read
    through tifffile's zarr store, chunk by chunk. Only basic slicing of the last two axes
    (``image[..., r0:r1, c0:c1]``) is supported, which is all overlap-tile prediction needs.
    """

    def __init__(self, path: Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise BiounetError(f"{path}: no such file")
        if path.suffix.lower() not in (".tif", ".tiff"):
            raise BiounetError(f"{path}: streaming reads TIFF files only; convert it to TIFF")
        self._store = None
        try:
            data = tifffile.memmap(path, mode="r")
        except Exception:  # compressed or tiled: tifffile raises various errors here
            try:
                import zarr

                self._store = tifffile.imread(path, aszarr=True)
                data = zarr.open(self._store, mode="r")
            except Exception as exc:
                raise BiounetError(
                    f"{path}: cannot be read as a TIFF ({exc.__class__.__name__}); is it complete?"
                ) from None
        shape = tuple(s for s in data.shape)
        if len(shape) == 2:
            self.channels_last = False
            self.shape = (1, *shape)
        elif len(shape) == 3 and shape[-1] <= 4 < shape[0]:
            self.channels_last = True
            self.shape = (shape[2], shape[0], shape[1])
        elif len(shape) == 3 and shape[0] <= 4:
            self.channels_last = False
            self.shape = shape
        else:
            raise BiounetError(f"{path}: has shape {shape}; expected one 2-D (multi-channel) image")
        self.path, self.data, self.dtype = path, data, np.dtype(data.dtype)
        # rows per stored chunk (tile or strip): a band of whole chunks decodes each once
        chunks = getattr(data, "chunks", None)
        row_axis = 1 if len(shape) == 3 and not self.channels_last else 0
        self.row_chunk = int(chunks[row_axis]) if chunks else 1

    def close(self) -> None:
        """Release the file (the zarr store keeps it open)."""
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> LazyImage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getitem__(self, key) -> np.ndarray:
        if not (isinstance(key, tuple) and len(key) == 3 and key[0] is Ellipsis):
            raise TypeError("LazyImage supports image[..., rows, cols] only")
        rows, cols = key[1], key[2]
        if self.channels_last:
            return np.moveaxis(np.asarray(self.data[rows, cols, :]), -1, 0)
        if len(self.data.shape) == 2:
            return np.asarray(self.data[rows, cols])[None]
        return np.asarray(self.data[:, rows, cols])

    def sample(self, max_pixels: int = 4_000_000) -> np.ndarray:
        """A regular subsample (every k-th row and column), for intensity statistics."""
        _, height, width = self.shape
        step = max(1, int(np.ceil(np.sqrt(height * width / max_pixels))))
        rows = [self[..., r : r + 1, :][:, :, ::step] for r in range(0, height, step)]
        return np.concatenate(rows, axis=1)


def image_pixels(path: Path) -> int:
    """Pixels per plane of an image file, from its header where possible (no full read)."""
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            with tifffile.TiffFile(path) as tif:
                shape = tif.series[0].shape
            return int(np.prod(sorted(shape)[-2:]))
        except Exception:  # unreadable: the regular reader will say why
            return 0
    return 0


def read_mask(path: Path) -> np.ndarray:
    """Read a 2-D mask as stored (binary, class indices or instance labels)."""
    arr = _squeeze(read_array(path))
    # An RGB(A) PNG of a gray mask: all colour channels equal.
    if (
        arr.ndim == 3
        and arr.shape[-1] in (3, 4)
        and all(np.array_equal(arr[..., 0], arr[..., c]) for c in range(1, 3))
    ):
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise BiounetError(f"{path}: a mask must be a 2-D image, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise BiounetError(f"{path}: mask contains NaN or infinite values")
        if not np.array_equal(arr, np.round(arr)):
            raise BiounetError(f"{path}: mask has fractional values; masks hold integer labels")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "uib":
        raise BiounetError(f"{path}: unsupported mask pixel type {arr.dtype}")
    return arr


# -- writing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PixelSize:
    """The physical size of a pixel: `y` by `x` `unit` (e.g. 0.65 by 0.65 "µm")."""

    y: float
    x: float
    unit: str = "µm"

    def tiff_options(self, ndim: int) -> dict:
        """`tifffile.imwrite` options that store it: OME-XML (Fiji/Bio-Formats, QuPath,
        napari) and, for metric units, resolution tags in pixels per centimetre."""
        options = {
            "ome": True,
            "metadata": {
                "axes": "YX" if ndim == 2 else "CYX",
                "PhysicalSizeX": self.x, "PhysicalSizeXUnit": self.unit,
                "PhysicalSizeY": self.y, "PhysicalSizeYUnit": self.unit,
            },
        }  # fmt: skip
        per_cm = _PER_CM.get(self.unit)
        if per_cm:
            options |= {"resolution": (per_cm / self.x, per_cm / self.y),
                        "resolutionunit": "CENTIMETER"}  # fmt: skip
        return options


# Spellings of micrometres in ImageJ and OME metadata (ASCII, escaped, Greek mu)
_UNITS = {"micron": "µm", "microns": "µm", "um": "µm", "\\u00B5m": "µm", "\u03bcm": "µm"}
_PER_CM = {"µm": 1e4, "nm": 1e7, "mm": 10.0, "cm": 1.0}


def read_pixel_size(path: Path) -> PixelSize | None:
    """The pixel size a TIFF states, else None.

    From OME-XML (``PhysicalSizeX``/``Y`` and their units), ImageJ's metadata (its unit and
    the resolution tags), or resolution tags in centimetres. Tags in inches are a print
    resolution (72 dpi is many writers' default), not a calibration, and are ignored.
    """
    import xml.etree.ElementTree as ET

    if Path(path).suffix.lower() not in (".tif", ".tiff"):
        return None
    try:
        size = _stated_pixel_size(path)
    except (OSError, ValueError, KeyError, ET.ParseError, tifffile.TiffFileError):
        return None  # unreadable metadata states nothing
    ok = size is not None and all(np.isfinite(v) and v > 0 for v in (size.y, size.x))
    return size if ok else None


def _stated_pixel_size(path: Path) -> PixelSize | None:
    """What the file says: OME-XML, else ImageJ metadata, else centimetre tags."""
    with tifffile.TiffFile(path) as tif:
        if tif.is_ome:
            return _ome_pixel_size(tif.ome_metadata)
        page = tif.pages[0]
        px, py = page.resolution  # pixels per unit
        if not (px > 0 and py > 0):
            return None
        unit = (tif.imagej_metadata or {}).get("unit") if tif.is_imagej else None
        if unit and unit not in ("pixel", "pixels", ""):
            return PixelSize(1 / py, 1 / px, _UNITS.get(unit, unit))
        if page.resolutionunit == tifffile.RESUNIT.CENTIMETER:
            return PixelSize(1e4 / py, 1e4 / px)
    return None


def _ome_pixel_size(xml: str | None) -> PixelSize | None:
    import xml.etree.ElementTree as ET

    if not xml:
        return None
    pixels = next((e for e in ET.fromstring(xml).iter() if e.tag.endswith("}Pixels")), None)
    if pixels is None or "PhysicalSizeX" not in pixels.attrib:
        return None
    x = float(pixels.attrib["PhysicalSizeX"])
    y = float(pixels.attrib.get("PhysicalSizeY", x))
    unit = pixels.attrib.get("PhysicalSizeXUnit", "µm")
    return PixelSize(y, x, _UNITS.get(unit, unit))


def write_tiff(
    path: Path,
    data: np.ndarray,
    pixel_size: PixelSize | None = None,
    software: str | None = None,
) -> None:
    """Write `data` as a TIFF (planes first for 3-D data), atomically; with `pixel_size`,
    as an OME-TIFF that states it; `software` goes into the Software tag (what made it)."""
    extra = pixel_size.tiff_options(data.ndim) if pixel_size is not None else {}
    with atomic_path(path) as tmp:
        tifffile.imwrite(
            tmp, data, photometric="minisblack", compression="zlib", software=software, **extra
        )


def write_png(path: Path, data: np.ndarray) -> None:
    """Write an 8-bit gray or RGB(A) image as PNG, atomically."""
    import imageio.v3 as iio

    with atomic_path(path) as tmp:
        iio.imwrite(tmp, data, extension=".png")


def json_text(obj: dict) -> str:
    """`obj` as indented JSON; NaN and infinities become null (JSON has neither)."""
    return json.dumps(_json_safe(obj), indent=2, sort_keys=False, allow_nan=False)


def write_json(path: Path, obj: dict) -> None:
    """Write `obj` as JSON (`json_text`), atomically."""
    text = json_text(obj)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")


def _json_safe(obj):
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise BiounetError(f"{path}: no such file")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BiounetError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise BiounetError(f"{path}: expected a JSON object")
    return obj


# -- tensors (safetensors: no pickles from users, ever) ----------------------------------


def save_tensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=metadata)


def load_tensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise BiounetError(f"{path}: no such file; the model directory is incomplete")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BiounetError(
            f"{path}: corrupt weights file ({str(exc)[:100]}); re-save or re-download the model"
        ) from None


def tensor_metadata(path: Path) -> dict:
    """The string metadata stored in a safetensors file's header."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise BiounetError(f"{path}: no such file; the model directory is incomplete")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise BiounetError(f"{path}: corrupt tensors file ({str(exc)[:100]})") from None


# -- model directories -------------------------------------------------------------------


def is_model_dir(folder: Path) -> bool:
    return (Path(folder) / CONFIG_NAME).is_file()


def read_model_config(folder: Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise BiounetError(f"{folder}: no such model directory")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise BiounetError(
            f"{folder}: not a biounet model directory (no {CONFIG_NAME}); "
            "create one with 'biounet init' or 'biounet train'"
        )
    return read_json(config_path)
