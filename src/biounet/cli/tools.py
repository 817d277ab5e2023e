"""`biounet evaluate`, `weights` and `augment`: score predictions, draw the weight map and the
augmentation."""

from __future__ import annotations

import argparse
from pathlib import Path

from biounet.cli.common import data_path, default, say
from biounet.cli.flags import (
    add_elastic_flag,
    add_mask_flags,
    add_weight_flags,
    augment_config,
    data_config,
)
from biounet.configs import TASKS, EvaluateConfig
from biounet.errors import BiounetError


def add_evaluate(sub) -> None:
    q = sub.add_parser("evaluate", help="score predictions against ground truth")
    q.add_argument("pred", type=Path, help="prediction folder or file (matched by stem)")
    q.add_argument("truth", type=Path, help="ground-truth folder or file")
    q.add_argument("--task", choices=TASKS, required=True)
    q.add_argument("--classes", type=int, help="semantic: number of classes (default: detect)")
    q.add_argument(
        "--truth-foreground",
        type=int,
        help="membranes: stored truth value of membrane (default 0, the ISBI convention)",
    )
    q.add_argument(
        "--membrane-class",
        type=int,
        default=default(EvaluateConfig, "membrane_class"),
        help="membranes: predicted membrane class (default %(default)s)",
    )
    q.add_argument("--json", type=Path, help="also write the full report as JSON")
    q.set_defaults(func=cmd_evaluate)


def add_weights(sub) -> None:
    q = sub.add_parser("weights", help="draw or save the paper's weight map of a mask")
    q.add_argument("mask", type=Path)
    q.add_argument(
        "--out",
        type=Path,
        required=True,
        help="W.png: heat map over the mask (the paper's Fig. 3d); W.tif: float32 map",
    )
    add_mask_flags(q)
    q.add_argument("--no-class-balance", action="store_true")
    add_weight_flags(q)
    q.set_defaults(func=cmd_weights)


def add_augment(sub) -> None:
    q = sub.add_parser("augment", help="draw augmented samples of an image and its mask")
    q.add_argument("image", type=Path)
    q.add_argument("mask", type=Path)
    q.add_argument("--out", type=Path, required=True, help="PNG grid")
    q.add_argument("--count", type=int, default=8, help="augmented samples (default 8)")
    q.add_argument("--seed", type=int, default=0)
    add_elastic_flag(q)
    add_mask_flags(q)
    q.set_defaults(func=cmd_augment)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from biounet.evaluate import evaluate_folders, format_table, save_report

    config = EvaluateConfig(
        task=args.task,
        num_classes=args.classes,
        truth_foreground=args.truth_foreground,
        membrane_class=args.membrane_class,
    )
    report = evaluate_folders(data_path(args.pred), data_path(args.truth), config)
    print(format_table(report))
    if args.json is not None:
        save_report(args.json, report)
        say(args, f"wrote {args.json}")
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    from biounet.data import mask_weights
    from biounet.io import atomic_path, write_tiff
    from biounet.plots import weight_figure

    suffix = args.out.suffix.lower()
    if suffix not in (".png", ".tif", ".tiff"):
        raise BiounetError(f"{args.out}: give a .png (picture) or .tif (float32 map) name")
    classes, weights = mask_weights(data_path(args.mask), args.classes, data_config(args))
    if suffix == ".png":
        with atomic_path(args.out) as tmp:
            weight_figure(classes, weights).savefig(tmp, format="png", dpi=110)
    else:
        write_tiff(args.out, weights)
    say(args, f"wrote {args.out} (weights {weights.min():.2f}..{weights.max():.2f})")
    return 0


def cmd_augment(args: argparse.Namespace) -> int:
    import numpy as np

    from biounet.data import augment_examples
    from biounet.io import atomic_path, read_image, read_mask
    from biounet.masks import mask_to_classes
    from biounet.normalize import NormalizeConfig, normalize
    from biounet.plots import augment_grid

    if args.count < 1:
        raise BiounetError("--count must be >= 1")
    augment = augment_config(args)
    image_path, mask_path = data_path(args.image), data_path(args.mask)
    image = normalize(read_image(image_path), NormalizeConfig())
    mask = read_mask(mask_path)
    if mask.shape != image.shape[1:]:
        raise BiounetError(
            f"{mask_path}: mask size {mask.shape} differs from image {image.shape[1:]}"
        )
    classes, _, _ = mask_to_classes(mask, mask_path, args.mask_type, args.classes, args.foreground)
    rng = np.random.default_rng(args.seed)
    examples = [(image, classes), *augment_examples(image, classes, rng, args.count, augment)]
    with atomic_path(args.out) as tmp:
        augment_grid(examples).savefig(tmp, format="png", dpi=90)
    say(args, f"wrote {args.out} (original first, then {args.count} augmented samples)")
    return 0
