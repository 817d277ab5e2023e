"""`biounet train`: flags onto the training options, progress with an ETA, one closing line."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

from biounet.cli.common import (
    DATA_ENV,
    Progress,
    add_device_flag,
    add_precision_flag,
    as_flags,
    command_line,
    data_path,
    default,
    model_path,
    say,
)
from biounet.cli.flags import add_arch_flags, add_elastic_flag, add_mask_flags, add_weight_flags
from biounet.configs import LR_SCHEDULES, OPTIMIZERS, TrainConfig
from biounet.errors import BiounetError


def add_parser(sub) -> None:
    q = sub.add_parser("train", help="train on folders of images and masks")
    q.add_argument(
        "--images",
        type=Path,
        required=True,
        help=f"folder of images (relative paths also tried under ${DATA_ENV})",
    )
    q.add_argument(
        "--masks",
        type=Path,
        required=True,
        help="folder of masks with the same file stems as the images",
    )
    q.add_argument("--out", type=Path, required=True, help="model directory to write")
    q.add_argument(
        "--val-images", type=Path, help="validation images (default: a held-out block of --images)"
    )
    q.add_argument("--val-masks", type=Path)
    q.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="fraction of files held out (the last ones by name) (default %(default)s)",
    )
    q.add_argument(
        "--init", type=Path, help="start from this model's weights (a directory or a name)"
    )
    q.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted training in --out exactly where it stopped",
    )
    add_arch_flags(q)
    add_mask_flags(q, classes=False)
    q.add_argument(
        "--no-class-balance",
        action="store_true",
        help="do not weight pixels by inverse class frequency",
    )
    add_weight_flags(q)
    q.add_argument(
        "--no-augment",
        action="store_true",
        help="plain crops: no elastic deformation, rotation, flips, gray values",
    )
    add_elastic_flag(q)
    _optimisation_flags(q)
    q.add_argument(
        "--save-dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="storage precision of weights.safetensors (float16 halves a shipped model)",
    )
    q.add_argument(
        "--workers",
        type=int,
        help="data loader processes for augmentation and weights (default: 0 on <= 2 cores, "
        "where a worker competes with the compute threads; else up to 4)",
    )
    add_precision_flag(q)
    add_device_flag(q)
    q.set_defaults(func=cmd_train)


def _optimisation_flags(q: argparse.ArgumentParser) -> None:
    """`TrainConfig`'s fields; ``--steps`` and ``--max-minutes`` default to the stored ones
    under ``--resume``."""

    def d(name: str):
        return default(TrainConfig, name)

    q.add_argument(
        "--steps",
        type=int,
        help=f"training steps (default {d('steps')}; with --resume: the stored)",
    )
    q.add_argument(
        "--max-minutes", type=float, help="wall-clock budget: stop at --steps or after this"
    )
    q.add_argument("--batch-size", type=int, default=d("batch_size"))
    q.add_argument(
        "--tile", type=int, default=d("tile"), help="output tile side (default %(default)s)"
    )
    q.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=d("optimizer"),
        help="adam (default) or sgd with --momentum 0.99 as in the paper",
    )
    q.add_argument("--lr", type=float, default=d("lr"), help="learning rate (default %(default)s)")
    q.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default=d("lr_schedule"),
        help="cosine: decay the learning rate to 0 over --steps or --max-minutes, "
        "whichever ends first (default %(default)s)",
    )
    q.add_argument(
        "--dice",
        type=float,
        default=d("dice"),
        metavar="WEIGHT",
        help="add WEIGHT x soft Dice loss (1 - mean Dice over classes) to the weighted "
        "cross-entropy (default %(default)s, the paper's loss)",
    )
    q.add_argument("--momentum", type=float, default=d("momentum"))
    q.add_argument("--weight-decay", type=float, default=d("weight_decay"))
    q.add_argument("--seed", type=int, default=d("seed"))
    q.add_argument("--val-every", type=int, default=d("val_every"))
    q.add_argument("--checkpoint-every", type=int, default=d("checkpoint_every"))


def cmd_train(args: argparse.Namespace) -> int:
    from biounet.distributed import world_from_environ
    from biounet.io import list_images, read_image
    from biounet.options import TRAIN_OPTIONS
    from biounet.precision import parse_device
    from biounet.trainer import configs_from_options, train_from_folders

    world = world_from_environ(os.environ)  # started by torchrun or srun: one of N processes
    if not world.main:  # rank 0 logs, draws progress and prints the closing line
        args.quiet = True
        logging.getLogger("biounet").setLevel(logging.ERROR)
    images, masks = data_path(args.images), data_path(args.masks)
    in_channels = args.in_channels
    if in_channels is None and not args.resume and args.init is None:
        in_channels = read_image(list_images(images)[0]).shape[0]
    options = {k: getattr(args, k) for k in TRAIN_OPTIONS if getattr(args, k, None) is not None}
    if args.workers is None:
        cores = os.cpu_count() or 1
        options["workers"] = 0 if cores <= 2 else min(4, cores - 2)
    options.pop("device", None)
    try:
        info, config, data, _ = configs_from_options(options, in_channels)
    except BiounetError as exc:
        raise BiounetError(as_flags(str(exc))) from None
    progress = Progress(args)
    t0 = time.monotonic()
    stop = _StopOnInterrupt()

    def on_step(s) -> bool:
        fraction = s.step / s.steps
        if config.max_minutes:  # whichever of --steps and --max-minutes ends first
            fraction = max(fraction, (time.monotonic() - t0) / (60 * config.max_minutes))
        text = f"step {s.step}/{s.steps} loss {s.loss:.4f}"
        if s.val:
            text += f" val Dice {s.val['dice']:.3f}"
        progress.update(fraction, text, force=s.val is not None)
        return not stop.requested  # Ctrl-C: checkpoint at this step boundary, then stop

    try:
        state = train_from_folders(
            images,
            masks,
            args.out,
            info,
            config,
            data,
            val_images=data_path(args.val_images),
            val_masks=data_path(args.val_masks),
            val_fraction=args.val_fraction,
            init=model_path(args.init) if args.init is not None else None,
            resume=args.resume,
            resume_overrides={
                k: v
                for k, v in (("steps", args.steps), ("max_minutes", args.max_minutes))
                if v is not None
            },
            callback=on_step,
            command=command_line(args),
            device=parse_device(args.device),
            world=world,
        )
    finally:
        progress.close()
        stop.restore()
    if stop.requested:
        raise KeyboardInterrupt  # after its checkpoint: --resume continues from there
    skipped = f" ({state.skipped} updates skipped: non-finite loss)" if state.skipped else ""
    best = state.best_val_dice
    scored = f", best validation Dice {best:.3f}" if math.isfinite(best) else ""
    say(args, f"trained {state.step} steps{skipped}{scored}; model in {args.out}")
    return 0


class _StopOnInterrupt:
    """The first Ctrl-C asks training to stop at the next step boundary (with a checkpoint);
    a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("biounet: stopping after this step (Ctrl-C again to abort)", file=sys.stderr)

    def restore(self) -> None:
        signal.signal(signal.SIGINT, self._previous)
