"""The network in formats other tools run: TorchScript and ONNX, height and width left free.

Both are made from a float32 copy on the CPU in inference mode, and checked against it before
they count as written (`check_exported`): an export that computes something else is an error,
not a file. The ONNX graph comes from torch's own exporter (`torch.export`), with the batch,
height and width dynamic; the skip crops are written with tensor sizes (`model.crop_like`) so
no input size is baked in. Any valid input size of the network then runs (``UNetConfig``'s
``valid_tiles``); the output is the network's logits, ``(N, classes, H', W')``.

The bioimage.io package, which holds both and the state dict, is `biounet.bioimageio_package`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from biounet.architecture import UNetConfig
from biounet.durable import atomic_path
from biounet.errors import BiounetError
from biounet.model import UNet
from biounet.tiling import valid_tiles

FORMATS = ("bioimageio", "onnx", "torchscript")
# fp32 logits of a trained network agree to ~1e-5 between runtimes; 1e-4 leaves room for
# other CPUs' summation orders while still catching any real difference (a wrong crop, a
# baked-in size) by orders of magnitude.
TOLERANCE = 1e-4
OPSET = 18  # torch's exporter's own default; onnxruntime >= 1.14 runs it
INPUT_NAME, OUTPUT_NAME = "image", "logits"


# What each format needs beyond biounet's own dependencies (the "export" extra).
TOOLS = {
    "onnx": ("onnx", "onnxscript", "onnxruntime"),
    "torchscript": (),
    "bioimageio": ("onnx", "onnxscript", "onnxruntime", "bioimageio.spec"),
}


def check_export_tools(format: str) -> None:
    """Refuse, before any work, an export whose libraries are not installed."""
    missing = [m for m in TOOLS[format] if not _installed(m)]
    if missing:
        raise BiounetError(
            f"exporting {format} needs {', '.join(missing)}: pip install 'biounet[export]'"
        )


def _installed(module: str) -> bool:
    import importlib.util

    try:  # a dotted name raises where its parent package is missing
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def inference_copy(net: UNet) -> UNet:
    """A float32 copy of `net` on the CPU in inference mode (the caller's net is untouched)."""
    clone = copy.deepcopy(net).to("cpu", torch.float32).eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def check_sizes(net: UNetConfig, count: int = 2) -> list[int]:
    """The `count` smallest valid input sides: what an export is checked at."""
    return [t_in for t_in, _ in valid_tiles(net, count)]


@contextlib.contextmanager
def _quiet_torch():
    """torch deprecates `torch.jit` and warns from inside its exporter about its own internals;
    neither says anything about the file written, and this package runs warnings as errors."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "onnx_ir", "onnxscript")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", module="torch")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def to_torchscript(net: UNet, path: Path) -> Path:
    """Write `net` as a scripted TorchScript module (``torch.jit.load`` runs it anywhere)."""
    clone = inference_copy(net)
    with _quiet_torch():
        scripted = torch.jit.script(clone)
    check_exported(clone, _torchscript_runner(scripted), "TorchScript")
    with atomic_path(Path(path)) as tmp, _quiet_torch():
        torch.jit.save(scripted, str(tmp))
    return Path(path)


def to_onnx(net: UNet, path: Path) -> int:
    """Write `net` as ONNX with dynamic batch, height and width; returns the opset version."""
    import onnx  # the export extra

    clone = inference_copy(net)
    config: UNetConfig = clone.config
    side = check_sizes(config, 1)[0]
    example = torch.zeros(1, config.in_channels, side, side)
    dims = {
        0: torch.export.Dim("batch"),
        2: torch.export.Dim("height"),
        3: torch.export.Dim("width"),
    }
    with atomic_path(Path(path)) as tmp, _quiet_torch():
        program = torch.onnx.export(
            clone,
            (example,),
            dynamo=True,
            opset_version=OPSET,
            verbose=False,
            dynamic_shapes={"x": dims},
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
        )
        program.save(str(tmp), external_data=False)
        proto = onnx.load(str(tmp))
        onnx.checker.check_model(proto)
        check_exported(clone, onnx_runner(tmp), "ONNX")
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def check_exported(
    net: UNet, run, what: str, sizes: list[int] | None = None, batch: int = 2
) -> float:
    """Largest |difference| of `run`'s logits from `net`'s at `sizes` (non-square inputs,
    batches of `batch`); raises `BiounetError` past `TOLERANCE`, relative to the logits'
    range."""
    config: UNetConfig = net.config
    sizes = sizes or check_sizes(config)
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for h, w in zip(sizes, sizes[1:] + sizes[:1], strict=True):
        x = torch.rand(batch, config.in_channels, h, w, generator=generator)
        with torch.inference_mode():
            want = net(x).numpy()
        got = np.asarray(run(x.numpy()))
        if got.shape != want.shape:
            raise BiounetError(
                f"the {what} export gives shape {got.shape} at input {h}x{w}, not {want.shape}"
            )
        scale = max(1.0, float(np.abs(want).max()))
        worst = max(worst, float(np.abs(got - want).max()) / scale)
    if not worst <= TOLERANCE:
        raise BiounetError(
            f"the {what} export differs from the network by {worst:.2e} (more than "
            f"{TOLERANCE:g}); nothing was written"
        )
    return worst


def _torchscript_runner(module):
    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()

    return run


def onnx_runner(path: Path):
    """A function running the ONNX file at `path` on numpy input with onnxruntime."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its notes on unused initialisers are noise
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {INPUT_NAME: x})[0]

    return run


def torchscript_runner(path: Path):
    """A function running the TorchScript file at `path` on numpy input."""
    with _quiet_torch():
        module = torch.jit.load(str(path), map_location="cpu")
    return _torchscript_runner(module.eval())
