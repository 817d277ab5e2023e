"""The one inference engine: image -> normalised -> (TTA views) -> tiled forward -> softmax.

Every prediction goes through `Engine`: `biounet.Model.predict`, `biounet predict` (whole
images and files streamed tile by tile), validation during training and the fit of the
instance post-processing. An engine sets a network up once (device, precision, memory format,
inference mode, and what runs it: torch, or a runtime of `biounet.runtimes`); the tile loop
itself is `biounet.tiling.tile_outputs`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from biounet.architecture import UNetConfig
from biounet.configs import Tiling
from biounet.errors import BiounetError
from biounet.model import UNet
from biounet.normalize import NormalizeConfig, normalize
from biounet.precision import default_device, memory_format
from biounet.runtimes import choose, runtime_forward
from biounet.tiling import (
    Forward,
    TilePlan,
    model_forward,
    plan_for,
    predict_tiled,
    tile_outputs,
)
from biounet.winograd import overhead_bytes, winograd_forward

Progress = Callable[[int, int], None]
log = logging.getLogger(__name__)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over axis 0, in place, float32."""
    logits -= logits.max(axis=0, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=0, keepdims=True)
    return logits


def engine_plan(
    net: UNetConfig, shape: tuple[int, int], tiling: Tiling, precision: str, runtime: str
) -> TilePlan:
    """`plan_for` as `runtime` runs it: the automatic tile's memory budget leaves room for
    what the engine holds beyond the torch engine (nnpack: its transformed kernels)."""
    if runtime == "nnpack" and tiling.tile is None:
        held = overhead_bytes(net) / 2**20
        tiling = replace(tiling, memory_mb=max(tiling.memory_mb - held, 1.0))
    return plan_for(net, shape, tiling, precision)


class Engine:
    """A network set up for inference on one device at one precision.

    Parameters
    ----------
    model : UNet
        Moved to `device`, put in eval mode and in the precision's memory format: give the
        engine a network of its own (training hands its network back with ``model.train()``).
    device : torch.device, optional
        Default: CUDA where torch sees a GPU, else the CPU.
    precision : {"auto", "fp32", "bf16", "fp16"}
    net : UNetConfig, optional
        The architecture, for the tile arithmetic (default: ``model.config``).
    engine : {"torch", "auto", "nnpack", "openvino", "onnxruntime"}
        What runs the network (`biounet.runtimes.choose`); default torch, the one engine for
        networks that change (validation during training). The runtimes convert a copy of
        the network on the first forward pass, or load it from `cache`.
    cache : path, optional
        The runtimes' cache folder (default `biounet.runtimes.default_cache`).
    training : bool
        `model` is a network in training (validation): torch runs it in its training layout
        (`biounet.precision.memory_format`) rather than the inference layout, so that
        validating leaves its training unchanged.
    """

    def __init__(
        self,
        model: UNet,
        device: torch.device | None = None,
        precision: str = "auto",
        net: UNetConfig | None = None,
        engine: str = "torch",
        cache: str | Path | None = None,
        training: bool = False,
    ) -> None:
        self.device = device or default_device()
        self.net: UNetConfig = net or model.config
        self.runtime, self.precision = choose(engine, precision, self.device, self.net)
        try:
            self.forward = self._make_forward(model, cache, training)
        except BiounetError as e:
            if engine != "auto" or self.runtime != "nnpack":
                raise
            log.warning("%s; predicting with the next engine", e)
            self.runtime, _ = choose("auto", self.precision, self.device, skip=("nnpack",))
            self.forward = self._make_forward(model, cache, training)
        if engine != "torch":  # chosen for the user: say what
            log.info("predicting with %s", self.describe())

    def describe(self) -> str:
        """What computes, for logs and files' metadata, e.g. "engine openvino, bf16, cpu"."""
        return f"engine {self.runtime}, {self.precision}, {self.device}"

    def _make_forward(self, model: UNet, cache: str | Path | None, training: bool) -> Forward:
        """The forward pass of `self.runtime` (nnpack: checked; a failed check raises)."""
        if self.runtime == "torch":
            fmt = memory_format(self.precision) if training else None
            return model_forward(model.to(self.device), self.precision, self.device, fmt)
        if self.runtime == "nnpack":
            return winograd_forward(model)
        return runtime_forward(self.runtime, model, self.precision, cache)

    def plan(self, shape: tuple[int, int], tiling: Tiling) -> TilePlan:
        return engine_plan(self.net, shape, tiling, self.precision, self.runtime)

    def logits(
        self,
        image: np.ndarray,
        tiling: Tiling | None = None,
        progress: Progress | None = None,
        tta: bool = False,
    ) -> np.ndarray:
        """Stitched raw outputs of a normalised image.

        Parameters
        ----------
        image : ndarray of float32, shape (C, H, W)
            Already normalised.
        tta : bool
            Each tile averaged over its 8 rotations and flips (`biounet.tta`): the log of the
            mean probabilities.

        Returns
        -------
        ndarray of float32, shape (K, H, W)
        """
        tiling = tiling or Tiling()
        plan = self.plan(image.shape[1:], tiling)
        return predict_tiled(
            self.forward, image, plan, self.net.num_classes, tiling.batch_size, progress, tta
        )

    def probabilities(
        self,
        image: np.ndarray,
        normalization: NormalizeConfig | None,
        tiling: Tiling | None = None,
        tta: bool = False,
        progress: Progress | None = None,
    ) -> np.ndarray:
        """Class probabilities of one image.

        Parameters
        ----------
        image : ndarray, shape (C, H, W)
            Raw intensities, normalised here with `normalization` (the model's stored one);
            ``normalization=None``: already normalised, float32.
        tta : bool
            Average the probabilities over the 8 rotations and flips of the image (tile by
            tile, as the whole image's views give them: `biounet.tta`). 8x the compute.
        progress : callable(done, total), optional
            Tiles done of all tiles.

        Returns
        -------
        ndarray of float32, shape (K, H, W), softmax over K
        """
        x = image if normalization is None else normalize(image, normalization)
        return softmax(self.logits(x, tiling, progress, tta))

    def blocks(
        self,
        image,
        plan: TilePlan,
        origins: Iterable[tuple[int, int]],
        keep: tuple[int, int],
        tiling: Tiling,
        prepare: Callable[[np.ndarray], np.ndarray] | None = None,
        progress: Progress | None = None,
        total: int | None = None,
        tta: bool = False,
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """Logit blocks of an image read window by window (`biounet.tiling.tile_outputs`)."""
        return tile_outputs(self.forward, image, plan, origins, keep, tiling.batch_size,
                            prepare, progress, total, tta)  # fmt: skip
