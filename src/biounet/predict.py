"""Prediction: files in, masks or probability maps out, via overlap-tile inference."""

from __future__ import annotations

import glob
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from biounet.bundle import ModelInfo, load_model
from biounet.errors import BiounetError
from biounet.io import ensure_dir, is_image_file, list_images, read_image, write_png, write_tiff
from biounet.model import UNet
from biounet.normalize import normalize
from biounet.plots import overlay, to_uint8
from biounet.precision import default_device, resolve_precision
from biounet.tiling import model_forward, plan_tiles, predict_tiled

log = logging.getLogger(__name__)
OUTPUTS = ("mask", "prob")


@dataclass(frozen=True)
class PredictConfig:
    """How to predict.

    Parameters
    ----------
    tile : int, optional
        Output tile side, snapped down to a valid size (default: see `biounet.tiling`).
    batch_size : int
        Tiles per forward pass.
    precision : {"auto", "fp32", "bf16", "fp16"}
    output : {"mask", "prob"}
        "mask": uint8 class indices; "prob": float32 softmax, one plane per class.
    overlay : bool
        Also write ``STEM_overlay.png``: the mask in colour over the image.
    halo : int, optional
        Discarded tile border for the padded ("same") variant (default: receptive radius).
    tta : bool
        Test-time augmentation: average the probabilities over the 8 rotations/flips of the
        image (the paper averaged over rotated versions of the input). 8x the compute.
    """

    tile: int | None = None
    batch_size: int = 1
    precision: str = "auto"
    output: str = "mask"
    overlay: bool = False
    halo: int | None = None
    tta: bool = False

    def __post_init__(self) -> None:
        if self.output not in OUTPUTS:
            raise BiounetError(f"output must be one of {OUTPUTS}, not {self.output!r}")
        if self.batch_size < 1:
            raise BiounetError("batch size must be >= 1")


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files, folders (their images) and glob patterns -> image files, in the given order."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(list_images(path))
        elif path.is_file():
            files.append(path)
        elif glob.has_magic(str(item)):
            matches = sorted(Path(p) for p in glob.glob(str(item)) if is_image_file(Path(p)))
            if not matches:
                raise BiounetError(f"{item}: the pattern matches no image files")
            files.extend(matches)
        else:
            raise BiounetError(f"{item}: no such file or folder")
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems and stems[f.stem] != f:
            raise BiounetError(
                f"{f}: has the same name stem as {stems[f.stem]}; outputs would overwrite each "
                "other, so predict them into different --out folders"
            )
        stems[f.stem] = f
    return files


def predict_array(
    model: UNet,
    info: ModelInfo,
    image: np.ndarray,
    config: PredictConfig,
    device: torch.device | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Class probabilities for one raw image.

    Parameters
    ----------
    image : ndarray, shape (C, H, W), raw intensities
        Normalised here exactly as during training (the model's stored normalisation).

    Returns
    -------
    ndarray of float32, shape (K, H, W), softmax probabilities
    """
    device = device or default_device()
    precision = resolve_precision(config.precision, device)
    forward = model_forward(model.to(device), precision, device)
    x = normalize(image, info.normalization)
    views = dihedral_views() if config.tta else [(0, False)]
    total = None
    for k, flip in views:
        view = np.rot90(x, k, axes=(1, 2))
        view = np.ascontiguousarray(view[:, :, ::-1] if flip else view)
        plan = plan_tiles(info.net, view.shape[1:], config.tile, config.halo)
        probs = softmax(
            predict_tiled(
                forward, view, plan, info.net.num_classes, config.batch_size, progress=progress
            )
        )
        probs = np.rot90(probs[:, :, ::-1] if flip else probs, -k, axes=(1, 2))
        total = probs if total is None else total + probs
    return np.ascontiguousarray(total / len(views), dtype=np.float32)


def dihedral_views() -> list[tuple[int, bool]]:
    """The 8 rotations by multiples of 90 degrees, each with and without a mirror flip."""
    return [(k, flip) for k in range(4) for flip in (False, True)]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over axis 0, in place, float32."""
    logits -= logits.max(axis=0, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=0, keepdims=True)
    return logits


def predict_files(
    model_dir: Path,
    inputs: list[str | Path],
    out_dir: Path,
    config: PredictConfig,
    device: torch.device | None = None,
    on_file: Callable[[Path, int, int], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Predict every input image and write ``out_dir/STEM.tif`` (and overlays).

    All inputs are checked (exist, readable, right channels) before the first output is
    written. Returns the written paths.
    """
    model, info = load_model(Path(model_dir))
    files = expand_inputs(inputs)
    resolve_precision(config.precision, device or default_device())
    if config.tile is not None:
        plan_tiles(info.net, (1, 1), config.tile, config.halo)  # refuse a bad tile up front
    for f in files:
        read_image(f, info.net.in_channels)
    ensure_dir(Path(out_dir))
    written = []
    for i, f in enumerate(files):
        if on_file is not None:
            on_file(f, i, len(files))
        image = read_image(f, info.net.in_channels)
        probs = predict_array(model, info, image, config, device, progress)
        target = Path(out_dir) / f"{f.stem}.tif"
        classes = probs.argmax(0).astype(np.uint8)
        write_tiff(target, classes if config.output == "mask" else probs)
        written.append(target)
        if config.overlay:
            png = Path(out_dir) / f"{f.stem}_overlay.png"
            write_png(png, overlay(to_uint8(normalize(image, info.normalization)), classes))
            written.append(png)
        log.info("wrote %s", target)
    return written
