"""`biounet export`: a model as a bioimage.io package, ONNX or TorchScript file."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from biounet.cli.common import DATA_ENV, data_path, model_path, say
from biounet.errors import BiounetError

FORMATS = ("bioimageio", "onnx", "torchscript")  # biounet.export.FORMATS, without torch


def add_parser(sub) -> None:
    q = sub.add_parser("export", help="write a model as a bioimage.io package, ONNX or TorchScript")
    q.add_argument("model_dir", type=Path, help="a model directory, or a shipped model's name")
    q.add_argument(
        "--format",
        choices=FORMATS,
        default="bioimageio",
        help="bioimageio (default): a model zip with all three weight formats; "
        "onnx, torchscript: the network alone",
    )
    q.add_argument(
        "--out", type=Path, required=True, help="the file to write (PKG.zip for bioimageio)"
    )
    q.add_argument(
        "--sample",
        type=Path,
        metavar="IMAGE",
        help="bioimageio: a real image for the test tensors (default: the model's "
        f"first training image, where it was or in NAME/images of ${DATA_ENV} or ../shared/data)",
    )
    q.add_argument("--name", help="bioimageio: the package's name (default: the folder's)")
    q.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from biounet.api import load
    from biounet.io import read_image
    from biounet.modeldir import load_info

    folder = model_path(args.model_dir)
    if args.format != "bioimageio" and (args.sample or args.name):
        raise BiounetError(f"--sample and --name are for --format bioimageio, not {args.format}")
    if args.format == "bioimageio" and args.out.suffix.lower() != ".zip":
        raise BiounetError(f"{args.out}: a bioimage.io package is a .zip file; name it so")
    sample = None
    if args.format == "bioimageio":
        info = load_info(folder)
        found = args.sample or sample_image(folder, info.training)
        if found is None:
            raise BiounetError(
                f"{folder}: no sample image found for the package's test tensors; give --sample "
                f"IMAGE (a real image the model is for) or set {DATA_ENV} to the data folder"
            )
        sample = read_image(found, info.net.in_channels)
        from biounet.bioimageio_package import test_side

        try:  # before the model is loaded, and naming the file
            test_side(info.net, *sample.shape[-2:])
        except BiounetError as exc:
            raise BiounetError(f"{found}: {exc}") from None
    model = load(folder, device="cpu", precision="fp32")
    model.export(args.out, args.format, sample=sample, name=args.name)
    say(args, f"wrote {args.out} ({args.format}, from {folder})")
    return 0


# Where `make demo` and the tests find the real data when $BIOUNET_DATA is not set.
DEFAULT_DATA = Path("..") / "shared" / "data"


def sample_image(folder: Path, training: dict | None) -> Path | None:
    """The model's first training image still on disk: in the recorded folder (a relative
    one also under $BIOUNET_DATA), else by name in ``NAME/images`` of the data folder
    ($BIOUNET_DATA, else ../shared/data as for ``make demo``), NAME the model folder's."""
    training = training or {}
    names, images = training.get("train_files") or [], training.get("images")
    root = Path(os.environ.get(DATA_ENV) or DEFAULT_DATA)
    places = [data_path(Path(images))] if images else []
    places.append(root / folder.resolve().name / "images")
    for place in places:
        for name in names[:8]:
            if (place / name).is_file():
                return place / name
    return None
