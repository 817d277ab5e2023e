"""A biounet model as a bioimage.io model package (format 0.5): what deepImageJ, ilastik,
QuPath and ``bioimageio.core`` run.

The package is described with ``bioimageio.spec``'s own classes and zipped by its
`save_bioimageio_package`; nothing of the format is written by hand. It holds:

- three weight formats of one float32 network: ``pytorch_state_dict`` (a ``.pt`` state dict,
  which torch >= 2.6 loads with ``weights_only=True``, and `biounet.model` as its
  architecture source: that module imports only torch), ``torchscript`` and ``onnx``
  (`biounet.export`, each checked against the network);
- the input ``(batch, channel, y, x)`` with sizes ``min + n * step`` on the pooling grid, and
  the output's size referring to the input's: smaller by the valid convolutions' margin, or
  the same with a halo for the padded variant;
- pre-processing that reproduces the model's stored normalisation (percentiles per image and
  channel as `scale_range`, the integer range as `scale_linear`) and a softmax over classes;
- test tensors from a real image (its central crop, and the probabilities biounet computes
  for it), a cover picture, the model's README as documentation, the paper to cite.
"""

from __future__ import annotations

import gc
import json
import keyword
import logging
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from biounet import __version__
from biounet.architecture import UNetConfig
from biounet.durable import atomic_path
from biounet.errors import BiounetError
from biounet.export import inference_copy, to_onnx, to_torchscript
from biounet.io import write_png, write_tiff
from biounet.mirror import center_crop
from biounet.model import UNet
from biounet.modeldir import ModelInfo
from biounet.normalize import NormalizeConfig, normalize
from biounet.plots import overlay, to_uint8
from biounet.tiling import default_halo

log = logging.getLogger(__name__)

PAPER_DOI = "10.1007/978-3-319-24574-4_28"
PAPER_TEXT = (
    "Ronneberger O., Fischer P., Brox T. (2015). U-Net: Convolutional Networks for Biomedical "
    "Image Segmentation. MICCAI 2015, LNCS 9351, 234-241."
)
LICENSE = "MIT"  # the project's (pyproject.toml)
MAX_TEST_SIDE = 572  # the paper's tile: test tensors stay small in the package
# Each output pixel of the test tensor may differ this much between runtimes (probabilities).
TEST_TOLERANCE = 1e-4
INPUT_ID, OUTPUT_ID = "image", "probabilities"


def smallest_input(net: UNetConfig) -> int:
    """The package's smallest input side; every ``net.size_step`` more is valid too.

    Valid network: the input of the smallest output. Padded: the first multiple of the
    pooling period that leaves an output pixel inside the halo on both sides.
    """
    if net.padding == "valid":
        return net.input_size(net.min_output_size())
    step = net.size_step
    return -(-(2 * default_halo(net) + 1) // step) * step


def test_side(net: UNetConfig, height: int, width: int) -> int:
    """The largest package input side that fits an image of `height` x `width` (<= 572)."""
    smallest, step = smallest_input(net), net.size_step
    fit = min(height, width, max(MAX_TEST_SIDE, smallest))
    if fit < smallest:
        raise BiounetError(
            f"the sample image is {height}x{width}, smaller than the network's smallest input "
            f"{smallest}x{smallest}; give a larger sample image"
        )
    return smallest + (fit - smallest) // step * step


def test_tensors(net: UNet, info: ModelInfo, sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The package's test input (the sample's central valid crop, raw values as float32,
    ``(1, C, S, S)``) and the probabilities biounet computes for it ``(1, K, S', S')``."""
    side = test_side(info.net, *sample.shape[-2:])
    top, left = (sample.shape[-2] - side) // 2, (sample.shape[-1] - side) // 2
    crop = np.ascontiguousarray(sample[:, top : top + side, left : left + side])
    x = torch.from_numpy(normalize(crop, info.normalization))[None]
    with torch.inference_mode():
        probs = torch.softmax(inference_copy(net)(x), dim=1)
    return crop[None].astype(np.float32), probs.numpy()


def write_package(
    net: UNet, info: ModelInfo, sample: np.ndarray, out: Path, *, name: str, readme: str | None
) -> Path:
    """Write the bioimage.io package of a model as the zip file `out`.

    Parameters
    ----------
    net, info : the model (`biounet.modeldir.load_model`)
    sample : ndarray, shape (C, H, W)
        A real image the model is for, raw intensities; its centre gives the test tensors.
    out : Path
        The zip file to write (replaced atomically).
    name : str
        The package's name (e.g. the model folder's).
    readme : str, optional
        Markdown documentation (the model's README); a summary is written where None.
    """
    from bioimageio.spec import save_bioimageio_package
    from pydantic import ValidationError

    test_side(info.net, *sample.shape[-2:])  # refuses a too small sample before any work
    name = package_name(name)
    # bioimageio.spec 0.5 leaves the files it hashes open for the garbage collector to close;
    # that says nothing about the package, which is complete and closed when written.
    with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix=".biounet-bio-") as work:
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            descr = describe(net, info, sample, Path(work), name=name, readme=readme)
        except ValidationError as exc:  # what bioimage.io allows that biounet does not check
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            message = (
                f"the package description is invalid at {where}: {first['msg']}; "
                "choose another package name, or rename the model's classes"
            )
            raise BiounetError(message) from None
        packed = save_bioimageio_package(descr, output_path=Path(work) / "package.zip")
        with atomic_path(Path(out)) as tmp:
            shutil.copyfile(packed, tmp)
        del descr
        gc.collect()
    return Path(out)


def package_name(name: str) -> str:
    """`name` as bioimage.io takes it: 5 to 128 letters, digits, spaces and ``_+-()``.

    Examples
    --------
    >>> package_name("mito.v2")
    'mito-v2'
    >>> package_name("em")
    'biounet em'
    """
    clean = re.sub(r"[^A-Za-z0-9_+\- ()]", "-", name).strip()[:128]
    return clean if len(clean) >= 5 else f"biounet {clean}".strip()[:128]


def describe(
    net: UNet, info: ModelInfo, sample: np.ndarray, work: Path, *, name: str, readme: str | None
):
    """The `ModelDescr` of the package, its files written into `work`."""
    from bioimageio.spec.model import v0_5 as bio

    test_in, test_out = test_tensors(net, info, sample)
    docs = _with_postprocessing(_with_validation(readme or _summary(info, name), info), info)
    files = _write_files(net, info, test_in, test_out, work, docs)
    config = info.net
    weights = bio.WeightsDescr(
        pytorch_state_dict=bio.PytorchStateDictWeightsDescr(
            source=files["state_dict"],
            architecture=bio.ArchitectureFromFileDescr(
                source=files["architecture"], callable="from_fields", kwargs=config.to_dict()
            ),
            pytorch_version=bio.Version(torch.__version__.split("+")[0]),
        ),
        torchscript=bio.TorchscriptWeightsDescr(
            source=files["torchscript"],
            parent="pytorch_state_dict",
            pytorch_version=bio.Version(torch.__version__.split("+")[0]),
        ),
        onnx=bio.OnnxWeightsDescr(
            source=files["onnx"], parent="pytorch_state_dict", opset_version=files["opset"]
        ),
    )
    return bio.ModelDescr(
        name=name,
        description=_description(info),
        authors=[bio.Author(name="biounet contributors")],
        cite=[bio.CiteEntry(text=PAPER_TEXT, doi=bio.Doi(PAPER_DOI))],
        license=bio.LicenseId(LICENSE),
        documentation=bio.FileDescr(source=files["readme"]),
        covers=[bio.FileDescr(source=files["cover"])],
        tags=["unet", "segmentation", "2d", "biounet", *_class_tags(info)],
        inputs=[_input(bio, info, sample.dtype, files["test_input"])],
        outputs=[_output(bio, info, files["test_output"])],
        weights=weights,
        config=bio.Config(
            bioimageio=bio.BioimageioConfig(
                reproducibility_tolerance=[
                    bio.ReproducibilityTolerance(
                        absolute_tolerance=TEST_TOLERANCE, relative_tolerance=TEST_TOLERANCE
                    )
                ],
                architecture_type="U-Net",
            )
        ),
    )


def _input(bio, info: ModelInfo, dtype: np.dtype, test_tensor: Path):
    config, channels = info.net, info.net.in_channels
    smallest = smallest_input(config)
    return bio.InputTensorDescr(
        id=bio.TensorId(INPUT_ID),
        axes=[
            bio.BatchAxis(),
            bio.ChannelAxis(channel_names=[bio.Identifier(f"c{i}") for i in range(channels)]),
            *(
                bio.SpaceInputAxis(
                    id=bio.AxisId(a),
                    size=bio.ParameterizedSize(min=smallest, step=config.size_step),
                )
                for a in ("y", "x")
            ),
        ],
        description=_input_description(info, dtype),
        test_tensor=bio.FileDescr(source=test_tensor),
        sample_tensor=bio.FileDescr(source=test_tensor.with_suffix(".tif")),
        data=bio.IntervalOrRatioDataDescr(type="float32"),
        preprocessing=_preprocessing(bio, info, dtype),
    )


def _input_description(info: ModelInfo, dtype: np.dtype) -> str:
    norm = info.normalization
    if norm.method == "percentile":
        return (
            f"raw intensities, any range: per image and channel, the {norm.low:g}th and "
            f"{norm.high:g}th percentiles become 0 and 1"
        )
    if norm.method == "dtype" and np.issubdtype(dtype, np.integer):
        return (
            f"raw {np.dtype(dtype).name} intensities, divided by {np.iinfo(dtype).max} "
            f"(give {np.dtype(dtype).name} images: the scale is that type's range)"
        )
    return "intensities as the model was trained on them (no normalisation)"


def _preprocessing(bio, info: ModelInfo, dtype: np.dtype) -> list:
    """The stored normalisation as bioimage.io steps (`biounet.normalize`'s formulas)."""
    norm, steps = info.normalization, []
    if norm.method == "percentile":
        kwargs = bio.ScaleRangeKwargs(
            axes=[bio.AxisId("y"), bio.AxisId("x")],
            min_percentile=norm.low,
            max_percentile=norm.high,
        )
        steps.append(bio.ScaleRangeDescr(kwargs=kwargs))
    elif norm.method == "dtype" and np.issubdtype(dtype, np.integer):
        gain = 1.0 / float(np.iinfo(dtype).max)
        steps.append(bio.ScaleLinearDescr(kwargs=bio.ScaleLinearKwargs(gain=gain)))
    return steps


def _output(bio, info: ModelInfo, test_tensor: Path):
    config = info.net
    if config.padding == "valid":  # smaller than the input by the margin on each side
        space = [
            bio.SpaceOutputAxis(
                id=bio.AxisId(a),
                size=bio.SizeReference(
                    tensor_id=bio.TensorId(INPUT_ID),
                    axis_id=bio.AxisId(a),
                    offset=-2 * config.margin,
                ),
            )
            for a in ("y", "x")
        ]
    else:  # the padded variant: as large, with the pixels zero padding reaches as halo
        space = [
            bio.SpaceOutputAxisWithHalo(
                id=bio.AxisId(a),
                halo=default_halo(config),
                size=bio.SizeReference(tensor_id=bio.TensorId(INPUT_ID), axis_id=bio.AxisId(a)),
            )
            for a in ("y", "x")
        ]
    names = [bio.Identifier(_identifier(n)) for n in info.class_names]
    return bio.OutputTensorDescr(
        id=bio.TensorId(OUTPUT_ID),
        description=_shorten("class probabilities: " + ", ".join(info.class_names)),
        axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=names), *space],
        test_tensor=bio.FileDescr(source=test_tensor),
        sample_tensor=bio.FileDescr(source=test_tensor.with_suffix(".tif")),
        data=bio.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
        postprocessing=[bio.SoftmaxDescr(kwargs=bio.SoftmaxKwargs(axis=bio.AxisId("channel")))],
    )


def _write_files(
    net: UNet, info: ModelInfo, test_in: np.ndarray, test_out: np.ndarray, work: Path, readme: str
) -> dict:
    """The package's files in `work`, by role."""
    import biounet.model

    clone = inference_copy(net)
    files = {
        "state_dict": work / "weights.pt",
        "architecture": work / "unet.py",
        "torchscript": work / "weights_torchscript.pt",
        "onnx": work / "weights.onnx",
        "test_input": work / "test_input.npy",
        "test_output": work / "test_output.npy",
        "cover": work / "cover.png",
        "readme": work / "README.md",
    }
    torch.save(clone.state_dict(), files["state_dict"])
    files["architecture"].write_text(Path(biounet.model.__file__).read_text())
    to_torchscript(clone, files["torchscript"])
    files["opset"] = to_onnx(clone, files["onnx"])
    for role, tensor in (("test_input", test_in), ("test_output", test_out)):
        np.save(files[role], tensor)
        write_tiff(files[role].with_suffix(".tif"), tensor)  # the "sample" viewers show
    write_cover(files["cover"], test_in[0], test_out[0], info)
    files["readme"].write_text(readme)
    return files


def write_cover(path: Path, image: np.ndarray, probs: np.ndarray, info: ModelInfo) -> None:
    """The cover (2:1): the test image's centre, and the same with the classes coloured.

    `image` ``(C, S, S)`` raw, `probs` ``(K, S', S')``.
    """
    side = probs.shape[-1]
    shown = normalize(center_crop(image, (side, side)), NormalizeConfig())  # for the eye only
    gray = to_uint8(shown)
    left = np.repeat(gray[..., None], 3, axis=-1)
    write_png(path, np.concatenate([left, overlay(gray, probs.argmax(0))], axis=1))


def _description(info: ModelInfo) -> str:
    net = info.net
    kind = "the paper's valid" if net.padding == "valid" else "a padded"
    return (
        f"U-Net (Ronneberger et al. 2015), {kind} variant, depth {net.depth}, "
        f"{net.base_channels} base channels, trained with biounet {__version__}: "
        f"per-pixel probabilities of {', '.join(info.class_names)}."
    )


def _summary(info: ModelInfo, name: str) -> str:
    """Documentation for a model folder without a README."""
    return f"# {name}\n\n{_description(info)}\n\nMade with biounet {__version__}.\n"


def _with_validation(readme: str, info: ModelInfo) -> str:
    """The documentation with a "Validation" section (bioimage.io asks for one): the scores
    training recorded, where the README has no such section of its own."""
    if any(
        line.lstrip("#").strip().lower().startswith("validation")
        for line in readme.splitlines()
        if line.startswith("#")
    ):
        return readme
    training = info.training or {}
    lines = ["", "## Validation", ""]
    if training.get("best_val_dice") is not None:
        held_out = len(training.get("val_files") or [])
        lines.append(
            f"During training, on {held_out} held-out images: best Dice of the foreground "
            f"classes {training['best_val_dice']:.4f} (biounet's validation)."
        )
    else:
        lines.append("No validation was recorded with this model.")
    lines += [
        "",
        "This package's test output is biounet's own prediction of its test input;",
        "`bioimageio test` reproduces it to 1e-4 with each weight format.",
        "",
    ]
    return readme.rstrip("\n") + "\n" + "\n".join(lines)


def _with_postprocessing(readme: str, info: ModelInfo) -> str:
    """The documentation with what `biounet predict` adds to the network from the model's
    stored ``postprocess``, which runtimes of this package (deepImageJ, ilastik, QuPath) do not
    do: they run the network and its softmax alone."""
    post = info.postprocess or {}
    steps = []
    if post.get("tta"):
        steps.append("averages the probabilities of the image's 8 flips and 90-degree rotations")
    if post.get("membranes"):
        steps.append(
            "draws membrane masks as the argmax plus one-pixel watershed lines that close the "
            "gaps between cells (`biounet.membranes`, settings "
            f"`{json.dumps(post['membranes'], sort_keys=True)}`)"
        )
    if post.get("instances"):
        steps.append(
            "labels instances (`--output instances`) with "
            f"`{json.dumps(post['instances'], sort_keys=True)}`"
        )
    if not steps:
        return readme
    note = (
        f"`biounet predict` on the model folder also {'; '.join(steps)}. This package holds "
        "the network and its softmax alone, as bioimage.io runtimes run it."
    )
    return readme.rstrip("\n") + "\n\n## Outside this package\n\n" + note + "\n"


def _class_tags(info: ModelInfo) -> list[str]:
    return [n.lower() for n in info.class_names if n.lower() not in ("background", "class0")]


def _identifier(text: str) -> str:
    """A channel name bioimage.io accepts: a Python identifier, not a keyword."""
    word = "".join(c if c.isalnum() else "_" for c in text)
    word = word if word[:1].isalpha() else f"c_{word}"
    return f"{word}_" if keyword.iskeyword(word) else word


def _shorten(text: str, limit: int = 128) -> str:
    """bioimage.io's tensor descriptions hold at most 128 characters."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
