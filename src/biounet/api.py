"""The Python interface: `load` a model, `Model.predict` numpy arrays, list the shipped
`models` (`biounet.train` is in `biounet.train_api`).

One object, one call, any array layout; numpy in, numpy out, with the same values and dtypes
that ``biounet predict`` writes for the same image.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np

from biounet.architecture import UNetConfig
from biounet.configs import DEFAULT_MEMORY_MB, OUTPUTS, PredictConfig, Tiling
from biounet.errors import BiounetError
from biounet.inference import Engine
from biounet.model import UNet
from biounet.modeldir import (
    ModelInfo,
    describe,
    load_model,
    resolve_model,
    save_model,
    shipped_model_dirs,
)
from biounet.normalize import normalize
from biounet.precision import parse_device
from biounet.predict import output_array, wants_tta
from biounet.tiling import valid_tiles


def models() -> dict[str, str]:
    """The models that come with biounet: ``{name: one-line description}``.

    Examples
    --------
    >>> sorted(biounet.models())
    ['bbbc039', 'isbi2012']
    """
    return {name: describe(folder) for name, folder in shipped_model_dirs().items()}


def load(
    source: str | Path,
    device: str = "auto",
    precision: str = "auto",
    engine: str = "auto",
    cache: str | Path | None = None,
) -> Model:
    """Load a model directory, or a shipped model by name.

    Parameters
    ----------
    source : str or Path
        A model directory (``config.json`` + ``weights.safetensors``), or the name of a shipped
        model (`models`); an existing path wins over a name.
    device : {"auto", "cpu", "cuda"}
        "auto": CUDA where torch sees a GPU, else the CPU.
    precision : {"auto", "fp32", "bf16", "fp16"}
        "auto": bf16 on CPUs with fast bf16 and on GPUs, fp32 elsewhere.
    engine : {"auto", "torch", "nnpack", "openvino", "onnxruntime"}
        What runs the network. "auto": the fastest installed one for the device, the CPU
        class and the precision (nnpack, PyTorch's own Winograd convolutions, on AVX2 CPUs
        for networks of 48 base channels or more; else OpenVINO, when ``biounet[openvino]``
        is installed; torch on GPUs and where nothing faster is there).
    cache : str or Path, optional
        Where OpenVINO and ONNX Runtime keep the converted network (default
        ``~/.cache/biounet``); converted on the first prediction, loaded from there after.

    Returns
    -------
    Model

    Examples
    --------
    >>> model = biounet.load("isbi2012")
    >>> mask = model.predict(image)  # (H, W) uint8: 0 = cell interior, 1 = membrane
    """
    folder = resolve_model(source)
    net, info = load_model(folder)
    return Model(
        net, info, device=device, precision=precision, engine=engine, cache=cache, source=folder
    )


class Model:
    """A U-Net with everything prediction needs: architecture, weights, classes, normalisation.

    Made by `load` (or `biounet.train`). The network is the model's own: nothing a caller
    passes in is changed, and `predict` may be called from several threads at once.

    Parameters
    ----------
    net : UNet
        Taken over by the model (moved to `device`, set to inference).
    info : ModelInfo
    device, precision, engine, cache
        As for `load`; `engine` here defaults to torch.
    source : Path, optional
        Where it was loaded from.
    """

    def __init__(
        self,
        net: UNet,
        info: ModelInfo,
        *,
        device: str = "auto",
        precision: str = "auto",
        engine: str = "torch",
        cache: str | Path | None = None,
        source: Path | None = None,
    ) -> None:
        self._net, self._info, self.source = net, info, source
        self._cache = None if cache is None else str(cache)
        self._engine = Engine(net, parse_device(device), precision, info.net, engine, cache)

    def __repr__(self) -> str:
        net = self._info.net
        return (
            f"biounet.Model(depth={net.depth}, base_channels={net.base_channels}, "
            f"classes={list(self.classes)}, device={self.device!r}, precision={self.precision!r}, "
            f"engine={self.engine!r})"
        )

    # -- what it is ------------------------------------------------------------------------

    @property
    def config(self) -> UNetConfig:
        """The architecture (depth, width, channels, classes, padding, ...)."""
        return self._info.net

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names; class ``k`` of a mask is ``classes[k]``."""
        return self._info.class_names

    @property
    def in_channels(self) -> int:
        return self._info.net.in_channels

    @property
    def margin(self) -> int:
        """Pixels per side a valid network's output is smaller than its input (0 if padded)."""
        return self._info.net.margin

    @property
    def training(self) -> dict | None:
        """How it was trained (command, files, settings, validation scores); a copy."""
        return copy.deepcopy(self._info.training)

    @property
    def device(self) -> str:
        return str(self._engine.device)

    @property
    def precision(self) -> str:
        """The resolved precision: "fp32", "bf16" or "fp16"."""
        return self._engine.precision

    @property
    def engine(self) -> str:
        """What runs the network: "torch", "openvino" or "onnxruntime"."""
        return self._engine.runtime

    def valid_tiles(self, up_to: int) -> list[tuple[int, int]]:
        """Usable tile sizes as ``(input side, output side)`` pairs, outputs up to `up_to`.

        Examples
        --------
        >>> biounet.load("isbi2012").valid_tiles(120)[:2]
        [(204, 20), (220, 36)]
        """
        # Valid outputs lie at least one pooling period apart: this many cover `up_to`.
        count = max(up_to, 0) // self.config.size_step + 1
        return [t for t in valid_tiles(self.config, count) if t[1] <= up_to]

    # -- what it does ----------------------------------------------------------------------

    def predict(
        self,
        image,
        output: str = "mask",
        *,
        tta: bool | None = None,
        tile: int | None = None,
        batch_size: int = 1,
        memory_mb: float = DEFAULT_MEMORY_MB,
        channel_axis: int | None = None,
        progress: bool | Callable[[int, int], None] | None = None,
    ):
        """Segment one 2-D image of any size (overlap-tile prediction, no seams).

        Parameters
        ----------
        image : array-like of real numbers
            (H, W) for a one-channel model; with C channels, (C, H, W) or (H, W, C), or any
            axis given by `channel_axis`. Singleton axes are dropped. Raw intensities: the
            model's own normalisation is applied. A dask array gives a lazy dask array: its
            blocks are computed wherever dask runs (threads, processes, a cluster) and equal
            the in-memory result (`biounet.graph`: float images above 16 megapixels are
            normalised from a subsample; instances match where clumps fit the 128 px
            margin); the normalisation statistics are computed at this call, once.
        output : {"mask", "prob", "instances"}
        tta : bool, optional
            Average over the 8 rotations and flips (8x the compute), tile by tile. Default:
            as the model's config stores it (``postprocess.tta``), else off.
        tile : int, optional
            Output tile side (default: the cheapest within `memory_mb`).
        batch_size : int
            Tiles per forward pass.
        memory_mb : float
            Feature-map budget per batch of tiles, for the automatic tile size.
        channel_axis : int, optional
            Default: a leading, else a trailing axis whose size is `in_channels`.
        progress : bool or callable(done, total), optional
            True: a tqdm bar on standard error; a callable gets tiles done and total.

        Returns
        -------
        ndarray, or dask array for a dask input
            "mask": (H, W) uint8 class indices; "prob": (K, H, W) float32 probabilities;
            "instances": (H, W) labels 0 (background), 1..N, uint16 (uint32 beyond 65535;
            always uint32 from a dask input, whose object count is not known in advance).

        Examples
        --------
        >>> labels = biounet.load("bbbc039").predict(nuclei, output="instances")
        >>> int(labels.max())  # the number of nuclei found
        """
        if output not in OUTPUTS:
            raise BiounetError(f"output must be one of {', '.join(OUTPUTS)}, not {output!r}")
        tiling = Tiling(tile, None, batch_size, memory_mb)
        raw = as_channels_first(image, self.in_channels, channel_axis)
        if _is_dask(raw):
            from biounet.graph import NetSpec, predict_graph

            config = PredictConfig(
                tile=tile,
                batch_size=batch_size,
                memory_mb=memory_mb,
                precision=self.precision,
                tta=tta,
            )
            spec = NetSpec.of(self._net, self._info, self._engine, self._cache)
            return predict_graph(raw, spec, self._info, config, output)
        x = normalize(raw, self._info.normalization)
        bar, report = _progress(progress)
        try:
            views = wants_tta(PredictConfig(tta=tta), self._info)
            probs = self._engine.probabilities(x, None, tiling, views, report)
        finally:
            if bar is not None:
                bar.close()
        return output_array(probs, self._info, output)

    def save(self, path: str | Path) -> None:
        """Write a model directory (``config.json`` + ``weights.safetensors``) at `path`."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise BiounetError(f"{path}: is a file, not a folder; choose another path")
        save_model(path, self._net, self._info)

    def export(
        self,
        path: str | Path,
        format: str = "bioimageio",
        *,
        sample=None,
        name: str | None = None,
        channel_axis: int | None = None,
    ) -> Path:
        """Write the model for other tools: a bioimage.io package, ONNX or TorchScript.

        Every export is float32 and checked against the network before it is written.

        Parameters
        ----------
        path : str or Path
            The file to write: a ``.zip`` for "bioimageio", else any name (``.onnx``,
            ``.pt``).
        format : {"bioimageio", "onnx", "torchscript"}
            "bioimageio": a model package (format 0.5) with all three weight formats, its
            pre- and post-processing and test tensors; "onnx": the network, dynamic batch,
            height and width; "torchscript": the network, scripted.
        sample : array-like, optional
            "bioimageio" only, and required there: a real image the model is for (any
            layout `predict` takes); its centre becomes the package's test input.
        name : str, optional
            The package's name (default: the model folder's name).

        Returns
        -------
        Path

        Examples
        --------
        >>> model = biounet.load("bbbc039")
        >>> model.export("bbbc039.zip", sample=nuclei)  # bioimageio test bbbc039.zip
        """
        from biounet.export import FORMATS, check_export_tools, to_onnx, to_torchscript

        if format not in FORMATS:
            raise BiounetError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
        from biounet.durable import remove_leftovers

        path = Path(path)
        _check_export_path(path, self.source)
        check_export_tools(format)
        remove_leftovers(path.parent)  # what a killed export left beside its file
        if format == "onnx":
            to_onnx(self._net, path)
        elif format == "torchscript":
            to_torchscript(self._net, path)
        else:
            from biounet.bioimageio_package import write_package

            if path.suffix.lower() != ".zip":
                raise BiounetError(f"{path}: a bioimage.io package is a .zip file; name it so")
            if sample is None:
                raise BiounetError("a bioimage.io package needs `sample`, a real image")
            raw = as_channels_first(sample, self.in_channels, channel_axis)
            readme = self.source / "README.md" if self.source else None
            write_package(
                self._net,
                self._info,
                np.asarray(raw),
                path,
                name=name or (self.source.name if self.source else "biounet-model"),
                readme=readme.read_text() if readme and readme.is_file() else None,
            )
        return path


def as_channels_first(image, channels: int, channel_axis: int | None = None) -> np.ndarray:
    """`image` as a (C, H, W) array of real numbers, without copying where it can.

    Raises
    ------
    TypeError
        Not an array of real numbers (complex, strings, objects).
    BiounetError
        A shape that is not one 2-D image with `channels` channels, or non-finite values.
    """
    lazy = _is_dask(image)  # checked for NaN block by block when computed
    arr = image if lazy else np.asarray(image)
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    if arr.dtype.kind not in "uif":
        raise TypeError(f"image must hold real numbers, not {arr.dtype}")
    if not lazy and arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise BiounetError("image holds NaN or infinite values; replace them before predicting")
    big = not lazy and arr.dtype.kind == "f" and arr.size
    if big and np.abs(arr).max() > np.finfo(np.float32).max:
        raise BiounetError("image holds values beyond float32's range (|x| > 3.4e38); rescale it")
    if channel_axis is not None:
        if not -arr.ndim <= channel_axis < arr.ndim:
            raise BiounetError(f"channel_axis {channel_axis} is out of range for {arr.shape}")
        arr = np.moveaxis(arr, channel_axis, 0)
        arr = arr.reshape(arr.shape[0], *_image_shape(arr.shape[1:]))
    else:
        arr = arr.reshape(_image_shape(arr.shape))
        if arr.ndim == 2 and channels == 1:
            arr = arr[None]
        elif arr.ndim == 3 and arr.shape[0] != channels and arr.shape[-1] == channels:
            arr = np.moveaxis(arr, -1, 0)
    if arr.ndim != 3 or arr.shape[0] != channels or min(arr.shape[1:]) < 1:
        want = "(H, W)" if channels == 1 else f"({channels}, H, W) or (H, W, {channels})"
        raise BiounetError(
            f"image has shape {np.shape(image)}; this model takes one 2-D image {want} "
            "(give channel_axis= for another layout)"
        )
    return arr


def _check_export_path(path: Path, model_dir: Path | None) -> None:
    """Refuse, before any work, a path an export cannot or must not be written to."""
    import os

    if path.is_dir():
        raise BiounetError(f"{path}: is a folder; give the file to write")
    parent = next((p for p in (path.absolute(), *path.absolute().parents) if p.exists()), None)
    if parent is not None and parent != path.absolute():
        if not parent.is_dir():
            raise BiounetError(f"{parent}: is a file, not a folder; choose another path")
        if not os.access(parent, os.W_OK):
            raise BiounetError(f"{parent}: cannot be written to; choose another path")
    inside = model_dir is not None and path.absolute().parent == model_dir.absolute()
    if inside and path.exists():
        raise BiounetError(f"{path}: is a file of the model itself; write the export elsewhere")


def _is_dask(image) -> bool:
    return hasattr(image, "__dask_graph__") and hasattr(image, "chunks")


def _image_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """`shape` without singleton axes beyond the two image axes, dropped from the front, then
    from the back: (1, H, W) and (H, W, 1) give (H, W); a one-pixel-high (1, W) image stays."""
    shape = list(shape)
    while len(shape) > 2 and shape[0] == 1:
        shape.pop(0)
    while len(shape) > 2 and shape[-1] == 1:
        shape.pop()
    return tuple(shape)


def _progress(progress):
    """(tqdm bar or None, callable or None) for `Model.predict`'s `progress` argument."""
    if progress is None or progress is False:
        return None, None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(unit="tile", leave=False)

        def report(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        return bar, report
    if callable(progress):
        return None, progress
    raise TypeError("progress must be None, True or a callable(done, total)")
