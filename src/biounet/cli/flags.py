"""Flag groups that several commands share; every default comes from a config dataclass."""

from __future__ import annotations

import argparse
from functools import partial

from biounet.architecture import PADDINGS, UNetConfig
from biounet.cli.common import default
from biounet.configs import METHODS, TOUCHING, AugmentConfig, DataConfig, NormalizeConfig


def add_arch_flags(q: argparse.ArgumentParser) -> None:
    """The architecture (`UNetConfig`) and the model's description."""
    d = partial(default, UNetConfig)
    q.add_argument(
        "--depth", type=int, default=d("depth"), help="pooling steps (default %(default)s)"
    )
    q.add_argument(
        "--base-channels",
        type=int,
        default=d("base_channels"),
        help="channels at the first level (default %(default)s, the paper's)",
    )
    q.add_argument(
        "--in-channels",
        type=int,
        default=None,
        help="image channels (init: default 1; train: default from the first image)",
    )
    q.add_argument(
        "--classes",
        type=int,
        default=d("num_classes"),
        help="number of output classes (default %(default)s)",
    )
    q.add_argument("--class-names", help="comma-separated, e.g. interior,membrane")
    q.add_argument("--padding", choices=PADDINGS, default=d("padding"))
    q.add_argument("--batch-norm", action="store_true")
    q.add_argument(
        "--dropout",
        type=float,
        default=d("dropout"),
        help="dropout at the end of the contracting path (default %(default)s)",
    )
    q.add_argument(
        "--normalize",
        choices=METHODS,
        default=default(NormalizeConfig, "method"),
        help="intensity normalisation stored in the model (default %(default)s, 1-99.8)",
    )


def add_mask_flags(q: argparse.ArgumentParser, classes: bool = True) -> None:
    q.add_argument(
        "--mask-type",
        choices=("binary", "instances", "classes"),
        help="default: detect (<= 2 values binary, more instances)",
    )
    q.add_argument(
        "--foreground",
        type=int,
        help="stored value of the foreground in binary masks (default: the larger)",
    )
    if classes:
        q.add_argument(
            "--classes",
            type=int,
            default=default(UNetConfig, "num_classes"),
            help="number of classes (default %(default)s)",
        )


def add_weight_flags(q: argparse.ArgumentParser) -> None:
    """The paper's weight map (`DataConfig`)."""
    q.add_argument(
        "--w0",
        type=float,
        default=default(DataConfig, "border_w0"),
        help="border weight w0 of the paper's weight map (default %(default)s; 0 = off)",
    )
    q.add_argument(
        "--sigma",
        type=float,
        default=default(DataConfig, "border_sigma"),
        help="border weight sigma in px (default %(default)s)",
    )
    q.add_argument(
        "--cell-class",
        type=int,
        default=default(DataConfig, "cell_class"),
        help="class whose connected components are the cells (default %(default)s; ISBI "
        "with --foreground 0: 0, the interiors between membranes)",
    )
    q.add_argument(
        "--touching",
        choices=TOUCHING,
        default=default(DataConfig, "touching"),
        help="instance masks: contact pixels of touching cells become background "
        "(default), a third class, or stay cell",
    )


def add_elastic_flag(q: argparse.ArgumentParser) -> None:
    q.add_argument(
        "--elastic-std",
        type=float,
        default=default(AugmentConfig, "elastic_std"),
        help="px, std of the 3x3 control-point displacements (default %(default)s; 0 = off)",
    )


def augment_config(args: argparse.Namespace):
    """The augmentation the flags ask for (`AugmentConfig` checks the values)."""
    from biounet.errors import BiounetError

    try:
        return AugmentConfig(elastic=args.elastic_std > 0, elastic_std=args.elastic_std)
    except ValueError as exc:
        raise BiounetError(str(exc).replace("elastic_std", "--elastic-std")) from None


def data_config(args: argparse.Namespace):
    augment = None if getattr(args, "no_augment", True) else augment_config(args)
    return DataConfig(
        mask_type=args.mask_type,
        foreground=args.foreground,
        class_balance=not args.no_class_balance,
        border_w0=args.w0,
        border_sigma=args.sigma,
        cell_class=args.cell_class,
        touching=args.touching,
        augment=augment,
    )
