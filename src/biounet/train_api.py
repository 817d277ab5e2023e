"""`biounet.train`: a U-Net from images and masks in memory, in files or in folders.

The keywords are the `biounet train` flags (`biounet.options`); without ``out=`` nothing is
written anywhere, with it the model directory the command line writes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from biounet.api import Model, _progress, as_channels_first
from biounet.errors import BiounetError
from biounet.model import UNet
from biounet.modeldir import ModelInfo, load_model, resolve_model
from biounet.options import TRAIN_OPTIONS
from biounet.precision import parse_device


def train(
    images,
    masks,
    *,
    out: str | Path | None = None,
    init: str | Path | Model | None = None,
    val_images=None,
    val_masks=None,
    progress: bool | Callable[[int, int], None] | None = None,
    **options,
) -> Model:
    """Train a U-Net on images and masks; the `biounet train` flags are the keywords.

    Parameters
    ----------
    images, masks : folder, or list of arrays or files
        A folder of images and one of masks (matched by file stem), or two lists of equal
        length: images as for `Model.predict` ((H, W), or with channels first or last),
        masks (H, W) as stored (binary, instance labels or class indices).
    out : str or Path, optional
        Write the model directory `biounet train --out` writes (checkpoints, training.csv,
        curves) there. Default: nothing is written anywhere.
    init : model directory, shipped model's name, or Model, optional
        Start from its weights (and architecture) instead of He initialisation.
    val_images, val_masks : optional
        Validation data; default: the last ``val_fraction`` (0.2) of the training pairs.
    progress : bool or callable(step, steps), optional
        True: a tqdm bar on standard error.
    **options
        ``steps=``, ``max_minutes=``, ``depth=``, ``base_channels=``, ``tile=``, ``w0=``,
        ``lr=``, ``batch_size=``, ... (`biounet.options.TRAIN_OPTIONS`); an unknown one is
        refused naming the nearest.

    Returns
    -------
    Model
        The best validated weights (the last ones without validation data).

    Notes
    -----
    Started by ``torchrun`` (or any launcher that sets ``RANK``, ``LOCAL_RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``), the processes train one model
    together, as the command line does: each takes ``batch_size`` tiles of every step, rank 0
    alone writes `out` and reports progress, and every process returns the same Model.

    Examples
    --------
    >>> model = biounet.train([image], [mask], steps=200, depth=2, base_channels=16)
    >>> model.predict(image)
    """
    from biounet.checkpoints import DirectoryRecorder
    from biounet.distributed import world_from_environ
    from biounet.io import is_model_dir
    from biounet.loop import Recorder
    from biounet.trainer import configs_from_options, global_batch, run

    folders = isinstance(images, str | Path)
    first = None if folders or not len(images) else _read_item(images[0], "image")
    in_channels = options.get("in_channels") or (_channels_of(first) if first is not None else 1)
    info, config, data, extra = configs_from_options(options, in_channels)
    device = parse_device(extra.get("device", "auto"))
    start = _start(init)
    arch = sorted(k for k in options if TRAIN_OPTIONS[k][0] == "net" and k != "in_channels")
    if start is not None and arch:
        raise BiounetError(
            f"init= gives the architecture; drop {', '.join(f'`{k}`' for k in arch)} "
            "(or train a fresh network without init=)"
        )
    if start is not None:
        info = start[1].replace(training=None, weights_dtype=info.weights_dtype)
    if out is not None and is_model_dir(Path(out)):
        raise BiounetError(f"{out}: already holds a model; give another `out`")
    fraction = extra.get("val_fraction", 0.2)
    examples = _examples(images, masks, val_images, val_masks, info, data, fraction)
    recorder = Recorder() if out is None else DirectoryRecorder(Path(out))
    world = world_from_environ(os.environ)  # the launcher's contract, as torch reads it
    config = global_batch(config, world)
    bar, report = _progress(progress if world.main else None)
    try:
        net, info, _ = run(
            examples,
            info,
            config,
            data,
            recorder,
            init=start,
            init_source=None if start is None else str(getattr(init, "source", init)),
            callback=None if report is None else (lambda s: report(s.step, s.steps)),
            command="biounet.train(...)",
            device=device,
            world=world,
        )
    finally:
        if bar is not None:
            bar.close()
    return Model(
        net,
        info,
        device=str(device),
        precision=config.precision,
        engine="auto",  # as `biounet.load` gives
        source=out and Path(out),
    )


def _examples(images, masks, val_images, val_masks, info: ModelInfo, data, fraction: float):
    """The prepared training data (`biounet.trainer.Examples`) from folders or lists."""
    from biounet.trainer import array_examples, folder_examples

    if isinstance(images, str | Path):
        return folder_examples(images, masks, info, data, val_images, val_masks, fraction)
    c = info.net.in_channels

    def read(items, what):
        if items is None:
            return None
        if what == "mask":
            return [_read_item(m, "mask") for m in items]
        return [as_channels_first(_read_item(i, "image"), c) for i in items]

    return array_examples(
        read(images, "image"),
        read(masks, "mask"),
        info,
        data,
        read(val_images, "image"),
        read(val_masks, "mask"),
        fraction,
    )


def _read_item(item, what: str) -> np.ndarray:
    """An array as given, or read from its file (an image as stored, a mask as stored)."""
    from biounet.io import read_array, read_mask

    if isinstance(item, str | Path):
        return read_array(Path(item)) if what == "image" else read_mask(Path(item))
    return np.asarray(item)


def _channels_of(image: np.ndarray) -> int:
    """Channels of an image as stored: 1 for (H, W); a short first or last axis otherwise."""
    shape = [s for s in np.shape(image) if s != 1]
    if len(shape) <= 2:
        return 1
    return shape[0] if shape[0] <= 4 else shape[-1]


def _start(init) -> tuple[UNet, ModelInfo] | None:
    if init is None:
        return None
    if isinstance(init, Model):
        net = UNet(init.config)
        net.load_state_dict(init._net.state_dict())
        return net, init._info
    return load_model(resolve_model(init))
