"""Training runs: from image/mask pairs (folders or arrays) to a finished model.

Reads and checks the pairs, holds out validation, starts the network (fresh, from `init`, or
from a checkpoint), runs `biounet.loop.fit`, fits the instance post-processing where the
masks are instance labels, and completes the model's training record. Where the results go
is the `Recorder`'s business: a model directory (`DirectoryRecorder`) or memory.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from biounet.architecture import UNetConfig
from biounet.augment import AugmentConfig
from biounet.checkpoints import (
    CHECKPOINTS,
    LOCK_NAME,
    DirectoryRecorder,
    finite_or_none,
    newest_checkpoint,
    stored_train_config,
)
from biounet.checks import available_memory, check_fits
from biounet.data import (
    DataConfig,
    Sample,
    load_sample,
    make_sample,
    split_validation,
    tile_geometry,
)
from biounet.distributed import SOLO, World, joined, process_device, share_json, share_tensors
from biounet.errors import BiounetError
from biounet.inference import Engine
from biounet.instances import InstanceConfig, instances_from_probabilities
from biounet.io import (
    CONFIG_NAME,
    is_model_dir,
    list_images,
    pair_by_stem,
    read_image,
    read_json,
    read_mask,
)
from biounet.loop import Callback, Recorder, TrainConfig, TrainState, fit
from biounet.metrics import instance_scores, pool_instance_scores
from biounet.model import UNet
from biounet.modeldir import ModelInfo, default_class_names, load_model
from biounet.normalize import NormalizeConfig, normalize
from biounet.options import split_options
from biounet.precision import bytes_per_value, resolve_precision
from biounet.tiling import tile_memory

log = logging.getLogger(__name__)
SEED_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
# how cells grow back over the pixels carved between them in training (`InstanceConfig`)
# (networks draw the carved gaps 2 px wide or wider, so gaps of up to 3 or 5 px close)
GROWTH = (
    {"expand": 0, "gap": 0},
    {"expand": 1, "gap": 0},
    {"expand": 0, "gap": 3},
    {"expand": 0, "gap": 5},
)


def configs_from_options(
    options: dict, in_channels: int | None = None
) -> tuple[ModelInfo, TrainConfig, DataConfig, dict]:
    """The configs that training options (`biounet.options.TRAIN_OPTIONS`) describe.

    Options not given take the configs' own defaults. Returns the model's description, the
    optimisation and data settings, and the run's own options (``val_fraction``, ``device``).
    """
    try:
        return _configs(split_options(options), in_channels)
    except BiounetError:
        raise
    except ValueError as exc:  # the leaves' configs say what is wrong in their own words
        raise BiounetError(str(exc)) from None


def _configs(groups: dict, in_channels: int | None):
    net = UNetConfig(**({"in_channels": in_channels or 1} | groups.get("net", {})))
    model = groups.get("model", {})
    names = model.get("class_names")
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    info = ModelInfo(
        net,
        tuple(names) if names else default_class_names(net.num_classes),
        NormalizeConfig(**({"method": model["normalize"]} if "normalize" in model else {})),
        weights_dtype=model.get("weights_dtype", "float32"),
    )
    data_options = dict(groups.get("data", {}))
    class_balance = not data_options.pop("no_class_balance", False)
    no_augment = data_options.pop("no_augment", False)
    std = data_options.pop("elastic_std", None)
    augment = None
    if not no_augment:
        augment = (
            AugmentConfig() if std is None else AugmentConfig(elastic=std > 0, elastic_std=std)
        )
    data = DataConfig(class_balance=class_balance, augment=augment, **data_options)
    return info, TrainConfig(**groups.get("train", {})), data, groups.get("run", {})


@dataclass
class Examples:
    """Prepared training data: samples to train and validate on, and the raw instance pairs
    the post-processing is fitted on."""

    train: list[Sample]
    val: list[Sample]
    instance_pairs: list = field(default_factory=list)  # (image, mask) raw, or file paths
    record: dict = field(default_factory=dict)  # where the data came from


def folder_examples(
    images: Path,
    masks: Path,
    info: ModelInfo,
    data: DataConfig,
    val_images: Path | None = None,
    val_masks: Path | None = None,
    val_fraction: float = 0.2,
) -> Examples:
    """Image/mask folders matched by file stem; validation from `val_images`/`val_masks`,
    else the last `val_fraction` of the training files (a contiguous block)."""
    pairs = pair_by_stem(list_images(Path(images)), Path(masks))
    if val_images is not None:
        if val_masks is None:
            raise BiounetError(f"{val_images}: validation images need `val_masks` too")
        val_pairs = pair_by_stem(list_images(Path(val_images)), Path(val_masks))
        train_pairs = pairs
    else:
        train_pairs, val_pairs = split_validation(pairs, val_fraction)
    net, norm = info.net, info.normalization
    train = [load_sample(i, m, net, norm, data) for i, m in train_pairs]
    val = [load_sample(i, m, net, norm, data) for i, m in val_pairs]
    instance_pairs = [
        pair for pair, s in zip(train_pairs, train, strict=True) if s.mask_type == "instances"
    ]
    _warn_empty(train + val)
    record = {
        "images": str(images),
        "masks": str(masks),
        "train_files": [p[0].name for p in train_pairs],
        "val_files": [p[0].name for p in val_pairs],
    }
    return Examples(train, val, instance_pairs, record)


def array_examples(
    images: list[np.ndarray],
    masks: list[np.ndarray],
    info: ModelInfo,
    data: DataConfig,
    val_images: list[np.ndarray] | None = None,
    val_masks: list[np.ndarray] | None = None,
    val_fraction: float = 0.2,
) -> Examples:
    """Like `folder_examples`, from lists of (C, H, W) images and (H, W) masks in memory."""
    if len(images) != len(masks):
        raise BiounetError(f"{len(images)} images but {len(masks)} masks; give one mask each")
    pairs = list(zip(images, masks, strict=True))
    names = [f"images[{k}]" for k in range(len(pairs))]
    if val_images is not None:
        if val_masks is None or len(val_masks) != len(val_images):
            raise BiounetError("val_images need as many val_masks")
        val_pairs, val_names = (
            list(zip(val_images, val_masks, strict=True)),
            [f"val_images[{k}]" for k in range(len(val_images))],
        )
        train_pairs, train_names = pairs, names
    else:
        train_pairs, val_pairs = split_validation(pairs, val_fraction)
        train_names, val_names = names[: len(train_pairs)], names[len(train_pairs) :]

    def sample(name: str, pair) -> Sample:
        return make_sample(name, *pair, info.net, info.normalization, data, f"masks of {name}")

    train = [sample(n, p) for n, p in zip(train_names, train_pairs, strict=True)]
    val = [sample(n, p) for n, p in zip(val_names, val_pairs, strict=True)]
    instance_pairs = [
        pair for pair, s in zip(train_pairs, train, strict=True) if s.mask_type == "instances"
    ]
    _warn_empty(train + val)
    record = {"images": "arrays", "train_files": train_names, "val_files": val_names}
    return Examples(train, val, instance_pairs, record)


def _warn_empty(samples: list[Sample]) -> None:
    """Say which masks hold no foreground at all (a wrong --foreground or an empty export)."""
    empty = [s.name for s in samples if not (s.classes > 0).any()]
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        everything = (
            " (all of them: check the foreground value and the mask type)"
            if len(empty) == len(samples)
            else ""
        )
        log.warning("%d mask(s) hold no foreground: %s%s", len(empty), shown, everything)


def run(
    examples: Examples,
    info: ModelInfo,
    config: TrainConfig,
    data: DataConfig,
    recorder: Recorder,
    *,
    init: tuple[UNet, ModelInfo] | None = None,
    init_source: str | None = None,
    resume: bool = False,
    callback: Callback | None = None,
    command: str | None = None,
    device: torch.device | None = None,
    world: World = SOLO,
) -> tuple[UNet, ModelInfo, TrainState]:
    """Train on `examples` and return the kept network (best validated, else last), its
    completed `ModelInfo` and the final `TrainState`.

    `init`: a network and its info to start from (`init_source` names it in the record).
    `world`: this process's place among data-parallel training processes, which split each
    step's ``config.batch_size`` tiles (the global batch: `global_batch`) evenly. Rank 0
    alone writes; every process returns the same network and info.
    """
    device = process_device(world, device or torch.device("cpu"))
    _check_training_memory(info, config, device, world)
    if init is not None and not resume:
        model, init_info = init
        # a stored membrane post-processing and TTA were chosen for the initial weights
        post = {k: v for k, v in (init_info.postprocess or {}).items()
                if k not in ("membranes", "tta")} or None  # fmt: skip
        info = init_info.replace(training=None, weights_dtype=info.weights_dtype, postprocess=post)
    else:
        torch.manual_seed(config.seed)
        model = UNet(info.net)
    if examples.instance_pairs:
        # Trained on instance masks: `predict --output instances` needs no further flags.
        # A default until the end of training, when it is fitted on training images.
        post = {**(info.postprocess or {}), "instances": _default_post(data).to_dict()}
        info = info.replace(postprocess=post)
    info = info.replace(
        training={
            "command": command,
            **examples.record,
            "init": init_source,
            "train_config": asdict(config),
            "data_config": asdict(data),
        }
    )
    if not world.main:
        recorder = Recorder()  # rank 0 writes
    try:
        with joined(world, device):
            state = fit(
                model,
                info,
                examples.train,
                examples.val,
                config,
                recorder,
                resume=resume,
                augment=data.augment,
                callback=callback,
                device=device,
                world=world,
            )
            if world.main:
                kept, info = _finish(
                    examples, info, config, data, recorder, state, device, world.size
                )
            return _shared_result(world, kept if world.main else None, info, state)
    finally:
        recorder.close()  # the lock, whatever happened


def _shared_result(world: World, kept: UNet | None, info: ModelInfo, state: TrainState):
    """Rank 0's kept network and completed info, in every process."""
    if not world.distributed:
        return kept, info, state
    shared = share_json(world, {"info": info.to_dict(), "step": state.step})
    info = ModelInfo.from_dict(shared["info"], "the model of training rank 0")
    weights = share_tensors(world, kept.state_dict() if world.main else None)
    if not world.main:
        kept = UNet(info.net)
        kept.load_state_dict(weights)
    return kept, info, state


def _finish(examples, info, config, data, recorder, state, device, world_size=1):
    """The training record, the kept network and its post-processing, after `fit`."""
    device = device or torch.device("cpu")
    info = info.replace(
        training=info.training
        | {
            # Where and how it ran: the command line under --device auto does not say.
            "device": device.type,
            "precision": resolve_precision(config.precision, device),
            "steps_done": state.step,
            "best_val_dice": finite_or_none(state.best_val_dice),
            "skipped_updates": state.skipped,
            "processes": world_size,
            "last": state.history[-1] if state.history else None,
        }
    )
    kept = recorder.kept_network(info)  # the weights saved, which may be the best validated
    if examples.instance_pairs:
        post = fit_postprocess(kept, info, examples.instance_pairs, data, config.precision, device)
        info = info.replace(postprocess={**(info.postprocess or {}), "instances": post.to_dict()})
    recorder.on_end(info)
    return kept, info


def _check_training_memory(
    info: ModelInfo, config: TrainConfig, device: torch.device, world: World = SOLO
) -> None:
    """Refuse, before allocating, a tile, batch and network that cannot fit in memory.

    Estimate: the forward pass's feature maps (`tile_memory`) three times over (the
    backward pass keeps them and makes gradients of the same size), the float64 coordinate
    maps of augmentation, and weights, gradients and two Adam moments.
    """
    geometry = tile_geometry(info.net, config.tile)
    side = geometry.tile_in
    precision = resolve_precision(config.precision, device)
    batch = max(config.batch_size // world.size, 1)  # this process's part of each step
    maps = tile_memory(info.net, (side, side), batch, bytes_per_value(precision))
    need = 3 * maps + 4 * 8 * side * side * batch
    need += 16 * info.net.parameter_count()
    cuda = device.type == "cuda"
    free = torch.cuda.mem_get_info(device)[0] if cuda else available_memory()
    check_fits(need, free, f"training with {batch} tile(s) of {side} px",
               "lower `tile` or `batch_size`")  # fmt: skip


def train_from_folders(
    images: Path,
    masks: Path,
    out_dir: Path,
    info: ModelInfo,
    config: TrainConfig,
    data: DataConfig,
    *,
    val_images: Path | None = None,
    val_masks: Path | None = None,
    val_fraction: float = 0.2,
    init: Path | None = None,
    resume: bool = False,
    resume_overrides: dict | None = None,
    callback: Callback | None = None,
    command: str | None = None,
    device: torch.device | None = None,
    world: World = SOLO,
) -> TrainState:
    """Train on image/mask folders (matched by file stem) into the model directory `out_dir`.

    With `resume`, the stored training and data settings are used, except for the
    `TrainConfig` fields in `resume_overrides` (e.g. more steps). Under data-parallel
    training (`world`) every process reads the folders (and, to resume, `out_dir`'s stored
    settings); rank 0 alone writes `out_dir`.
    """
    out_dir = Path(out_dir)
    started = any((out_dir / n).exists() for n in (CONFIG_NAME, CHECKPOINTS, LOCK_NAME))
    if resume and not started:
        raise BiounetError(f"{out_dir}: no training to resume here; check `out`, or drop `resume`")
    again = resume and newest_checkpoint(out_dir) is None
    if again:
        # Killed before its first checkpoint was complete: nothing to lose, start again with
        # the settings it recorded (config.json comes just before that checkpoint).
        log.warning("%s: no complete checkpoint yet; training from step 0", out_dir)
        resume = False
    from_record = resume or (again and is_model_dir(out_dir))
    if from_record:  # a resume splits the stored global batch over the processes it has
        stored = (read_json(out_dir / CONFIG_NAME).get("training") or {}).get("train_config")
        if resume:
            stored = stored_train_config(out_dir)
        config = TrainConfig(**((stored or {}) | (resume_overrides or {})))
        info = ModelInfo.from_dict(read_json(out_dir / CONFIG_NAME), out_dir / CONFIG_NAME)
        training = info.training or {}
        if training.get("data_config"):
            data = DataConfig.from_dict(training["data_config"])
        if again and training.get("init"):
            init = Path(training["init"])
    elif is_model_dir(out_dir) and (init is None or Path(init).resolve() != out_dir.resolve()):
        raise BiounetError(
            f"{out_dir}: already holds a model; use --resume to continue its training, "
            "--init to start from its weights, or another --out"
        )
    if not from_record:
        config = global_batch(config, world)
    start = load_model(Path(init)) if init is not None and not resume else None
    if start is not None:
        info = start[1].replace(training=None, weights_dtype=info.weights_dtype)
    examples = folder_examples(images, masks, info, data, val_images, val_masks, val_fraction)
    _, _, state = run(
        examples,
        info,
        config,
        data,
        DirectoryRecorder(out_dir),
        init=start,
        init_source=str(init) if init else None,
        resume=resume,
        callback=callback,
        command=command,
        device=device,
        world=world,
    )
    return state


def global_batch(config: TrainConfig, world: World) -> TrainConfig:
    """`config` with the tiles of a step over all processes: `batch_size` is per process on
    the command line and in `biounet.train`, global in the loop and in the stored record."""
    return replace(config, batch_size=config.batch_size * world.size)


def _default_post(data: DataConfig) -> InstanceConfig:
    """Post-processing for a model trained with `data`: 3 classes where contacts are a class."""
    return InstanceConfig(border_class=2 if data.touching == "class" else None)


@torch.no_grad()
def fit_postprocess(
    model: UNet,
    info: ModelInfo,
    pairs: list,
    data: DataConfig,
    precision: str = "auto",
    device: torch.device | None = None,
    max_images: int = 20,
) -> InstanceConfig:
    """Instance post-processing fitted to a trained model on (training) image/mask pairs.

    `pairs`: (image file, mask file) or (image (C, H, W), instance mask (H, W)) arrays.
    Tries seeds at each of `SEED_THRESHOLDS` with each of `GROWTH`: no growth, 1 px of growth
    everywhere, or the carved contacts closed (``gap``) and outlines as drawn (how far cells
    must grow back depends on how large the network draws them, which depends on the
    training), and keeps the one with the best pooled mean AP over IoU 0.5:0.95 on up to
    `max_images` evenly spaced pairs, scored against their uncarved instance masks (ties: the
    first, so the simpler growth).
    """
    engine = Engine(model, device or torch.device("cpu"), precision, info.net)
    pairs = pairs[:: -(-len(pairs) // max_images)]
    configs = [
        replace(_default_post(data), seed_threshold=seed, **growth)
        for seed in SEED_THRESHOLDS
        for growth in GROWTH
    ]
    scores: list[list[dict]] = [[] for _ in configs]
    for image, truth in pairs:
        if isinstance(image, str | Path):
            image, truth = read_image(image, info.net.in_channels), read_mask(truth)
        probs = engine.probabilities(normalize(image, info.normalization), None)
        for config, found in zip(configs, scores, strict=True):
            found.append(instance_scores(instances_from_probabilities(probs, config), truth))
    mean_ap = [pool_instance_scores(found)["mean_ap"] for found in scores]
    best = configs[int(np.argmax(mean_ap))]
    log.info("post-processing fitted on %d image(s): %s, mean AP %.3f", len(pairs), best,
             max(mean_ap))  # fmt: skip
    return best
