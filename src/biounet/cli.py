"""Command line: maps flags onto the components' configs, draws progress bars, reports errors.

A `BiounetError` becomes one line on stderr and exit code 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import sys
from pathlib import Path

from biounet import __version__
from biounet.errors import BiounetError

DATA_ENV = "BIOUNET_DATA"
log = logging.getLogger("biounet")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except BiounetError as exc:
        print(f"biounet: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("biounet: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="biounet",
        description="The U-Net of Ronneberger et al. (2015): train, predict, inspect.",
    )
    p.add_argument("--version", action="version", version=f"biounet {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("init", help="create an untrained model directory")
    q.add_argument("model_dir", type=Path, help="the model directory to create")
    _arch_flags(q)
    q.add_argument("--seed", type=int, default=0, help="seed of the He initialisation")
    q.add_argument("--force", action="store_true", help="overwrite an existing model")
    q.set_defaults(func=cmd_init)

    q = sub.add_parser("info", help="show a model's configuration, size and valid tiles")
    q.add_argument("model_dir", type=Path, help="a model directory, or a shipped model's name")
    q.set_defaults(func=cmd_info)

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
        help="fraction of files held out (the last ones by name) (default 0.2)",
    )
    q.add_argument(
        "--init", type=Path, help="start from this model's weights (a directory or a name)"
    )
    q.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted training in --out exactly where it stopped",
    )
    _arch_flags(q)
    _mask_flags(q, classes=False)
    q.add_argument(
        "--no-class-balance",
        action="store_true",
        help="do not weight pixels by inverse class frequency",
    )
    _weight_flags(q)
    q.add_argument(
        "--no-augment",
        action="store_true",
        help="plain crops: no elastic deformation, rotation, flips, gray values",
    )
    q.add_argument(
        "--elastic-std",
        type=float,
        default=10.0,
        help="px, std of the 3x3 control-point displacements (default 10; 0 = off)",
    )
    q.add_argument(
        "--steps", type=int, help="training steps (default 2000; with --resume: the stored)"
    )
    q.add_argument(
        "--max-minutes", type=float, help="wall-clock budget: stop at --steps or after this"
    )
    q.add_argument(
        "--save-dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="storage precision of weights.safetensors (float16 halves a shipped model)",
    )
    q.add_argument("--batch-size", type=int, default=1)
    q.add_argument("--tile", type=int, default=388, help="output tile side (default 388)")
    q.add_argument(
        "--optimizer",
        choices=("adam", "sgd"),
        default="adam",
        help="adam (default) or sgd with --momentum 0.99 as in the paper",
    )
    q.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate (default 0.001)",
    )
    q.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default="constant",
        help="cosine: decay the learning rate to 0 over --steps or --max-minutes, "
        "whichever ends first (default constant)",
    )
    q.add_argument(
        "--dice",
        type=float,
        default=0.0,
        metavar="WEIGHT",
        help="add WEIGHT x soft Dice loss (1 - mean Dice over classes) to the weighted "
        "cross-entropy (default 0, the paper's loss)",
    )
    q.add_argument("--momentum", type=float, default=0.99)
    q.add_argument("--weight-decay", type=float, default=0.0)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--val-every", type=int, default=200)
    q.add_argument("--checkpoint-every", type=int, default=200)
    q.add_argument(
        "--workers",
        type=int,
        help="data loader processes for augmentation and weights (default: 0 on <= 2 cores, "
        "where a worker competes with the compute threads; else up to 4)",
    )
    q.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    _device_flag(q)
    q.set_defaults(func=cmd_train)

    q = sub.add_parser("evaluate", help="score predictions against ground truth")
    q.add_argument("pred", type=Path, help="prediction folder or file (matched by stem)")
    q.add_argument("truth", type=Path, help="ground-truth folder or file")
    q.add_argument("--task", choices=("membranes", "semantic", "instances"), required=True)
    q.add_argument("--classes", type=int, help="semantic: number of classes (default: detect)")
    q.add_argument(
        "--truth-foreground",
        type=int,
        help="membranes: stored truth value of membrane (default 0, the ISBI convention)",
    )
    q.add_argument(
        "--membrane-class", type=int, default=1, help="membranes: predicted membrane class (1)"
    )
    q.add_argument("--json", type=Path, help="also write the full report as JSON")
    q.set_defaults(func=cmd_evaluate)

    q = sub.add_parser("weights", help="draw or save the paper's weight map of a mask")
    q.add_argument("mask", type=Path)
    q.add_argument(
        "--out",
        type=Path,
        required=True,
        help="W.png: heat map over the mask (the paper's Fig. 3d); W.tif: float32 map",
    )
    _mask_flags(q)
    q.add_argument("--no-class-balance", action="store_true")
    _weight_flags(q)
    q.set_defaults(func=cmd_weights)

    q = sub.add_parser("augment", help="draw augmented samples of an image and its mask")
    q.add_argument("image", type=Path)
    q.add_argument("mask", type=Path)
    q.add_argument("--out", type=Path, required=True, help="PNG grid")
    q.add_argument("--count", type=int, default=8, help="augmented samples (default 8)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--elastic-std", type=float, default=10.0)
    _mask_flags(q)
    q.set_defaults(func=cmd_augment)

    q = sub.add_parser("predict", help="segment images with a model")
    q.add_argument("model_dir", type=Path, help="a model directory, or a shipped model's name")
    q.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    q.add_argument("--out", type=Path, required=True, help="output folder")
    q.add_argument(
        "--tile",
        type=int,
        help="output tile side, snapped down to a valid size (default: the tile with the least "
        "computation per image that fits --memory-mb)",
    )
    q.add_argument("--batch-size", type=int, default=1, help="tiles per forward pass")
    q.add_argument(
        "--memory-mb",
        type=float,
        default=1024,
        help="MiB of feature maps per batch of tiles for the automatic tile size (default 1024; "
        "torch and the model take ~0.3-0.5 GB more)",
    )
    q.add_argument(
        "--output",
        choices=("mask", "prob", "instances"),
        default="mask",
        help="mask: uint8 class TIFF; prob: float32 TIFF, one plane per class; instances: "
        "uint16 labels 1..N (touching cells separated as the model config says)",
    )
    q.add_argument("--overlay", action="store_true", help="also write STEM_overlay.png")
    q.add_argument(
        "--stream",
        action="store_true",
        help="read and write TIFF masks or instances tile by tile whatever their size "
        "(automatic above 16 megapixels): memory stays flat for images of any size; instances "
        "need 4 x (classes + 1) bytes per pixel of temporary disk in the output folder",
    )
    q.add_argument(
        "--instance-margin",
        type=int,
        default=128,
        help="px of context around each 1024 px block when streaming instances: must exceed "
        "the widest clump of touching cells (default 128)",
    )
    q.add_argument(
        "--tta",
        action="store_true",
        help="average over the 8 rotations/flips of each image (8x slower, smoother borders)",
    )
    q.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    _device_flag(q)
    q.set_defaults(func=cmd_predict)
    return p


def _device_flag(q: argparse.ArgumentParser) -> None:
    q.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),  # biounet.precision.DEVICES, without importing torch
        help="auto (default): the GPU where torch sees one, else the CPU",
    )


def _arch_flags(q: argparse.ArgumentParser) -> None:
    q.add_argument("--depth", type=int, default=4, help="pooling steps (default 4, the paper's)")
    q.add_argument("--base-channels", type=int, default=64, help="channels at the first level")
    q.add_argument(
        "--in-channels",
        type=int,
        default=None,
        help="image channels (init: default 1; train: default from the first image)",
    )
    q.add_argument("--classes", type=int, default=2, help="number of output classes")
    q.add_argument("--class-names", help="comma-separated, e.g. interior,membrane")
    q.add_argument("--padding", choices=("valid", "same"), default="valid")
    q.add_argument("--batch-norm", action="store_true")
    q.add_argument(
        "--dropout", type=float, default=0.0, help="dropout at the end of the contracting path"
    )
    q.add_argument(
        "--normalize",
        choices=("percentile", "dtype", "none"),
        default="percentile",
        help="intensity normalisation stored in the model (default percentile 1-99.8)",
    )


def _mask_flags(q: argparse.ArgumentParser, classes: bool = True) -> None:
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
        q.add_argument("--classes", type=int, default=2, help="number of classes (default 2)")


def _weight_flags(q: argparse.ArgumentParser) -> None:
    q.add_argument(
        "--w0",
        type=float,
        default=10.0,
        help="border weight w0 of the paper's weight map (default 10; 0 = off)",
    )
    q.add_argument("--sigma", type=float, default=5.0, help="border weight sigma in px (5)")
    q.add_argument(
        "--cell-class",
        type=int,
        default=1,
        help="class whose connected components are the cells (default 1; ISBI "
        "with --foreground 0: 0, the interiors between membranes)",
    )
    q.add_argument(
        "--touching",
        choices=("background", "class", "keep"),
        default="background",
        help="instance masks: contact pixels of touching cells become background "
        "(default), a third class, or stay cell",
    )


def _augment_config(args: argparse.Namespace):
    from biounet.augment import AugmentConfig

    if args.elastic_std < 0:
        raise BiounetError("--elastic-std must be >= 0")
    return AugmentConfig(elastic=args.elastic_std > 0, elastic_std=args.elastic_std)


def _data_config(args: argparse.Namespace):
    from biounet.data import DataConfig

    augment = None
    if not getattr(args, "no_augment", True):
        augment = _augment_config(args)
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


def _model_info(args: argparse.Namespace, in_channels: int):
    from biounet.model import UNetConfig
    from biounet.modeldir import ModelInfo, default_class_names
    from biounet.normalize import NormalizeConfig

    net = UNetConfig(
        depth=args.depth,
        base_channels=args.base_channels,
        in_channels=in_channels,
        num_classes=args.classes,
        padding=args.padding,
        batch_norm=args.batch_norm,
        dropout=args.dropout,
    )
    names = (
        tuple(n.strip() for n in args.class_names.split(","))
        if args.class_names
        else default_class_names(args.classes)
    )
    return ModelInfo(net, names, NormalizeConfig(method=args.normalize))


def _data_path(path: Path | None) -> Path | None:
    """A relative path that does not exist here is looked up under $BIOUNET_DATA."""
    if path is None or path.is_absolute() or path.exists():
        return path
    root = os.environ.get(DATA_ENV)
    if root and (Path(root) / path).exists():
        return Path(root) / path
    return path


def as_flags(message: str) -> str:
    """A config's message worded with the flags that set its fields.

    Field and option names with an underscore are replaced wherever they appear
    (``max_minutes`` -> ``--max-minutes``, ``border_w0`` -> ``--w0``); a one-word name only
    where it opens the message as its subject ("steps must be >= 1" -> "--steps must ...").
    """
    from biounet.options import TRAIN_OPTIONS, flag

    names = {field: option for option, (_, field) in TRAIN_OPTIONS.items()}
    names.update({option: option for option in TRAIN_OPTIONS})
    joined = [n for n in sorted(names, key=len, reverse=True) if "_" in n]
    message = re.sub(
        r"(?<![\w/.-])(" + "|".join(joined) + r")(?![\w/-])",
        lambda m: flag(names[m.group(1)]),
        message,
    )
    first = message.split(" ", 1)[0]
    if first in names and message.startswith(f"{first} must"):
        message = flag(names[first]) + message[len(first) :]
    return message


def _model_path(source: Path) -> Path:
    """A model directory: a path that exists, else a shipped model's name, else a model
    directory under $BIOUNET_DATA (where a data folder may carry a shipped model's name)."""
    from biounet.io import is_model_dir
    from biounet.modeldir import resolve_model, shipped_model_dirs

    found = _data_path(source)
    if not source.exists() and str(source) not in shipped_model_dirs() and is_model_dir(found):
        return found
    return resolve_model(source)


def cmd_init(args: argparse.Namespace) -> int:
    import torch

    from biounet.io import is_model_dir
    from biounet.model import UNet
    from biounet.modeldir import save_model

    if is_model_dir(args.model_dir) and not args.force:
        raise BiounetError(f"{args.model_dir}: already holds a model; use --force to overwrite")
    if args.model_dir.exists() and not args.model_dir.is_dir():
        raise BiounetError(f"{args.model_dir}: is a file, not a folder; choose another path")
    info = _model_info(args, args.in_channels or 1)
    torch.manual_seed(args.seed)
    model = UNet(info.net)
    info = info.replace(
        training={"command": _command_line(args), "note": "untrained (He init)", "seed": args.seed}
    )
    save_model(args.model_dir, model, info)
    print(f"created untrained model in {args.model_dir} ({model.num_parameters():,} parameters)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from biounet.modeldir import load_model
    from biounet.tiling import valid_tiles

    model, info = load_model(_model_path(args.model_dir))
    net = info.net
    print(json.dumps(info.to_dict(), indent=2))
    print(f"parameters: {model.num_parameters():,}")
    print(f"conv layers: {model.num_conv_layers()}")
    print(f"margin per side: {net.margin} px")
    tiles = [f"{t_in}->{t_out}" for t_in, t_out in valid_tiles(net, 6)]
    print(f"valid tiles (input->output): {', '.join(tiles)}, ... every {net.size_step} px")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from biounet.io import list_images, read_image
    from biounet.options import TRAIN_OPTIONS
    from biounet.precision import parse_device
    from biounet.trainer import configs_from_options, train_from_folders

    images, masks = _data_path(args.images), _data_path(args.masks)
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
    bar = tqdm(total=config.steps, unit="step", dynamic_ncols=True, disable=None)

    def on_step(s) -> None:
        bar.total = s.steps
        bar.n = s.step
        post = {"loss": f"{s.loss:.4f}", "tiles/s": f"{s.tiles_per_s:.2f}"}
        if s.val:
            post["val_dice"] = f"{s.val['dice']:.3f}"
        bar.set_postfix(post, refresh=False)
        bar.refresh()

    try:
        state = train_from_folders(
            images,
            masks,
            args.out,
            info,
            config,
            data,
            val_images=_data_path(args.val_images),
            val_masks=_data_path(args.val_masks),
            val_fraction=args.val_fraction,
            init=_model_path(args.init) if args.init is not None else None,
            resume=args.resume,
            resume_overrides={
                k: v
                for k, v in (("steps", args.steps), ("max_minutes", args.max_minutes))
                if v is not None
            },
            callback=on_step,
            command=_command_line(args),
            device=parse_device(args.device),
        )
    finally:
        bar.close()
    skipped = f" ({state.skipped} updates skipped: non-finite loss)" if state.skipped else ""
    print(f"trained {state.step} steps{skipped}; model in {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from biounet.evaluate import EvaluateConfig, evaluate_folders, format_table, save_report

    config = EvaluateConfig(
        task=args.task,
        num_classes=args.classes,
        truth_foreground=args.truth_foreground,
        membrane_class=args.membrane_class,
    )
    report = evaluate_folders(_data_path(args.pred), _data_path(args.truth), config)
    print(format_table(report))
    if args.json is not None:
        save_report(args.json, report)
        print(f"wrote {args.json}")
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    from biounet.data import mask_weights
    from biounet.io import atomic_path, write_tiff
    from biounet.plots import weight_figure

    suffix = args.out.suffix.lower()
    if suffix not in (".png", ".tif", ".tiff"):
        raise BiounetError(f"{args.out}: give a .png (picture) or .tif (float32 map) name")
    classes, weights = mask_weights(args.mask, args.classes, _data_config(args))
    if suffix == ".png":
        with atomic_path(args.out) as tmp:
            weight_figure(classes, weights).savefig(tmp, format="png", dpi=110)
    else:
        write_tiff(args.out, weights)
    print(f"wrote {args.out} (weights {weights.min():.2f}..{weights.max():.2f})")
    return 0


def cmd_augment(args: argparse.Namespace) -> int:
    import numpy as np

    from biounet.data import augment_examples
    from biounet.io import atomic_path, mask_to_classes, read_image, read_mask
    from biounet.normalize import NormalizeConfig, normalize
    from biounet.plots import augment_grid

    if args.count < 1:
        raise BiounetError("--count must be >= 1")
    image = normalize(read_image(args.image), NormalizeConfig())
    mask = read_mask(args.mask)
    if mask.shape != image.shape[1:]:
        raise BiounetError(
            f"{args.mask}: mask size {mask.shape} differs from image {image.shape[1:]}"
        )
    classes, _, _ = mask_to_classes(mask, args.mask, args.mask_type, args.classes, args.foreground)
    augment = _augment_config(args)
    rng = np.random.default_rng(args.seed)
    examples = [(image, classes), *augment_examples(image, classes, rng, args.count, augment)]
    with atomic_path(args.out) as tmp:
        augment_grid(examples).savefig(tmp, format="png", dpi=90)
    print(f"wrote {args.out} (original first, then {args.count} augmented samples)")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from biounet.precision import parse_device
    from biounet.predict import PredictConfig, predict_files

    if args.stream and (args.output == "prob" or args.tta or args.overlay):
        raise BiounetError(
            "--stream writes masks or instances only: drop --output prob, --tta "
            "and --overlay, or drop --stream"
        )
    config = PredictConfig(
        tile=args.tile,
        batch_size=args.batch_size,
        precision=args.precision,
        output=args.output,
        overlay=args.overlay,
        tta=args.tta,
        memory_mb=args.memory_mb,
        instance_margin=args.instance_margin,
        **({"stream_pixels": 0} if args.stream else {}),
    )
    bar = tqdm(unit="tile", dynamic_ncols=True, disable=None, leave=False)

    def on_file(path: Path, i: int, n: int) -> None:
        bar.set_description(f"{i + 1}/{n} {path.name}")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    inputs = [
        str(_data_path(Path(i))) if not any(c in i for c in "*?[") else i for i in args.inputs
    ]
    try:
        written = predict_files(
            _model_path(args.model_dir),
            inputs,
            args.out,
            config,
            device=parse_device(args.device),
            on_file=on_file,
            progress=progress,
        )
    finally:
        bar.close()
    n_images = sum(1 for w in written if w.suffix == ".tif")
    print(f"wrote {n_images} {args.output} file(s) to {args.out}")
    return 0


def _command_line(args: argparse.Namespace) -> str:
    return "biounet " + " ".join(shlex.quote(a) for a in args.argv)
