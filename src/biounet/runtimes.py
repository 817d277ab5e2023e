"""Inference runtimes besides torch eager, and which one is fastest where (`choose`).

Why: a U-Net's forward pass is a fixed graph of convolutions, and on CPUs the runtimes built
for fixed graphs run it faster than torch eager (docs/benchmarks.md, "Engines"): OpenVINO in
bf16 on CPUs with AVX512-BF16 or AMX, OpenVINO or ONNX Runtime in fp32 elsewhere. On CPUs
without fast bf16, NNPACK's Winograd convolutions (`biounet.winograd`, engine "nnpack", part
of PyTorch's CPU builds) beat both (docs/benchmarks.md, "AVX2"). On CUDA devices torch is the
engine. Both runtimes are optional extras (``biounet[openvino]``, ``biounet[onnxruntime]``);
without them every engine choice ends at nnpack or torch.

A runtime gets the network once: a float32 copy is converted (OpenVINO: `ov.convert_model`
from the torch module; ONNX Runtime: `biounet.export.to_onnx`), checked against torch before
it is kept (`biounet.export.check_exported`: within 1e-4 of the logits' range at two input
sizes), and stored in the cache folder under a digest of the runtime, its version, biounet's
model code, the architecture and the weights (never in a model directory), with the SHA-256
of its files.
Later runs load it from there after comparing those checksums (0.1 s for the base-64 network,
where running a check again took 0.9 s of every run's start): an entry damaged on disk is
converted again, never used. A cache folder that cannot be written is not fatal: the graph is
converted for this run only.

This module, like the model directory's, knows the file names of what it keeps.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from biounet.architecture import UNetConfig
from biounet.configs import ENGINES
from biounet.durable import ensure_dir, remove_leftovers, temp_prefix
from biounet.errors import BiounetError
from biounet.precision import cpu_capability, cpu_has_fast_bf16, resolve_precision

log = logging.getLogger(__name__)
Forward = Callable[[np.ndarray], np.ndarray]

# What each runtime needs (its extra). ONNX Runtime runs the ONNX export, which torch's
# exporter writes with onnx and onnxscript.
PACKAGES = {"openvino": ("openvino",), "onnxruntime": ("onnxruntime", "onnx", "onnxscript")}
PRECISIONS = {"torch": ("fp32", "bf16", "fp16"), "nnpack": ("fp32",),
              "openvino": ("fp32", "bf16"), "onnxruntime": ("fp32",)}  # fmt: skip
# Fastest first, per CPU class and resolved precision: measured with `bench/engines.py`
# (docs/benchmarks.md, "Engines", where the figures and the machines are). Not listed: torch.
FASTEST = {
    ("amx", "bf16"): ("openvino", "torch"),
    ("amx", "fp32"): ("onnxruntime", "openvino", "torch"),
    ("avx512_bf16", "bf16"): ("openvino", "torch"),
    ("avx512_bf16", "fp32"): ("openvino", "onnxruntime", "torch"),
    ("avx2", "fp32"): ("nnpack", "openvino", "onnxruntime", "torch"),
    # not measured: the runtimes, as on the measured classes without nnpack (NNPACK has no
    # AVX-512 kernels, where oneDNN has)
    ("avx512", "fp32"): ("openvino", "onnxruntime", "torch"),
    ("other", "fp32"): ("openvino", "onnxruntime", "torch"),
}
# Winograd's transforms cost per channel, its savings per pair of channels: on the AVX2 CPU
# measured, nnpack ran the paper's network (base 64) 1.35x faster than OpenVINO fp32 and a
# base-48 one 1.09x, but a base-32 one (the shipped models) 1.2x slower, with more memory.
NNPACK_MIN_CHANNELS = 48
# Converted graphs of the same network, by runtime: bump to re-convert after a change here.
CONVERSION = 2  # 2: entries sealed with their files' checksums


def cpu_class() -> str:
    """This CPU's class for `FASTEST`, by PyTorch's own CPU probes: "amx" (Intel AMX tiles),
    "avx512_bf16" (AVX512-BF16 without AMX), "avx512" (AVX-512 without BF16), "avx2" (AVX2,
    no AVX-512) or "other" (older x86, ARM)."""
    if bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()):
        return "amx"
    if cpu_has_fast_bf16():
        return "avx512_bf16"
    capability = cpu_capability()
    return {"AVX2": "avx2", "AVX512": "avx512"}.get(capability, "other")


def installed() -> tuple[str, ...]:
    """The engines this environment can run: torch, nnpack where this torch has NNPACK for
    this CPU, then the runtimes whose extra is there."""
    from biounet.winograd import available

    nnpack = ("nnpack",) if available() else ()
    runtimes = (name for name, mods in PACKAGES.items() if all(map(_importable, mods)))
    return ("torch", *nnpack, *runtimes)


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def choose(
    engine: str,
    precision: str,
    device: torch.device,
    net: UNetConfig | None = None,
    skip: tuple[str, ...] = (),
) -> tuple[str, str]:
    """The engine and resolved precision a prediction runs with.

    Parameters
    ----------
    engine : {"auto", "torch", "nnpack", "openvino", "onnxruntime"}
        "auto": the fastest installed engine for `device`, this CPU class and the precision
        (`FASTEST`); torch on CUDA and where no runtime is installed.
    precision : {"auto", "fp32", "bf16", "fp16"}
        "auto": bf16 where the device has fast bf16, else fp32 (nnpack, ONNX Runtime: fp32).
    net : UNetConfig, optional
        The network: "auto" passes over nnpack for networks narrower than
        `NNPACK_MIN_CHANNELS` (default: the paper's width).
    skip : tuple of str
        Engines "auto" passes over (one that failed).

    Raises
    ------
    BiounetError
        For an engine that is not installed, or cannot run on `device` at `precision`.
    """
    if engine not in ENGINES:
        raise BiounetError(f"engine must be one of {ENGINES}, not {engine!r}")
    if engine == "auto":
        resolved = resolve_precision(precision, device)
        if device.type != "cpu":
            return "torch", resolved
        ready = installed()
        ranked = FASTEST.get((cpu_class(), resolved), ("torch",))
        if net is not None and net.base_channels < NNPACK_MIN_CHANNELS:
            skip = (*skip, "nnpack")
        ready = tuple(e for e in ready if e not in skip)
        return next(e for e in (*ranked, "torch") if e in ready), resolved
    if engine == "torch":
        return engine, resolve_precision(precision, device)
    if device.type != "cpu":
        raise BiounetError(f"engine {engine} runs on the CPU: use device cpu or engine torch")
    if engine not in installed():
        if engine == "nnpack":
            from biounet.winograd import UNAVAILABLE

            raise BiounetError(UNAVAILABLE)
        missing = [m for m in PACKAGES[engine] if not _importable(m)]
        raise BiounetError(
            f"engine {engine} needs {', '.join(missing)}: pip install 'biounet[{engine}]', "
            "or use engine auto or torch"
        )
    if PRECISIONS[engine] == ("fp32",) and precision == "auto":
        return engine, "fp32"
    # bf16 is checked here first: resolving it would also warn of slow bf16 before the error
    resolved = precision if precision == "bf16" else resolve_precision(precision, device)
    if resolved not in PRECISIONS[engine]:
        raise BiounetError(
            f"engine {engine} runs {' or '.join(PRECISIONS[engine])} on the CPU, not "
            f"{resolved}: use precision {PRECISIONS[engine][0]} or auto, or another engine"
        )
    if resolved == "bf16" and not cpu_has_fast_bf16():
        raise BiounetError(
            f"engine {engine} runs bf16 only on CPUs with AVX512-BF16 or AMX, which this one "
            "lacks: use precision fp32 or auto"
        )
    return engine, resolved


def default_cache() -> Path:
    """Where converted graphs are kept unless told otherwise: ~/.cache/biounet (a temporary
    folder's where there is no home folder)."""
    try:
        return Path.home() / ".cache" / "biounet"
    except RuntimeError:
        return Path(tempfile.gettempdir()) / "biounet-cache"


def runtime_version(engine: str) -> str:
    """The runtime's version, from its module (its distribution may be named otherwise:
    onnxruntime-gpu, openvino-nightly)."""
    module = importlib.import_module(PACKAGES[engine][0])
    return str(getattr(module, "__version__", None) or getattr(module, "get_version", str)())


def digest(net: torch.nn.Module, engine: str) -> str:
    """What a converted graph is kept under: the runtime and its version, biounet's and
    torch's versions and the source of the code the graph is traced from (a development
    checkout changes it without a new version), architecture, weights."""
    from biounet import __version__, architecture, export, model

    config = json.dumps(net.config.to_dict(), sort_keys=True)
    about = f"{CONVERSION} {engine} {runtime_version(engine)} {__version__} {torch.__version__}"
    h = hashlib.sha256(f"{about} {config}".encode())
    for module in (model, architecture, export):
        h.update(inspect.getsource(module).encode())
    for name, value in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().to("cpu", torch.float32).contiguous().numpy())  # no copy
    return h.hexdigest()[:24]


def runtime_forward(
    engine: str, net: torch.nn.Module, precision: str, cache: Path | None = None
) -> Forward:
    """`net` run by `engine` (openvino or onnxruntime) at `precision`, as a numpy batch
    function ``(B, C, h, w) float32 -> (B, K, h', w') float32``, like
    `biounet.tiling.model_forward`. The graph is converted on the first call (or loaded from
    `cache`, default `default_cache`) and kept for the calls after it."""
    if engine not in PACKAGES:
        raise BiounetError(f"no runtime called {engine!r}; runtimes: {', '.join(PACKAGES)}")
    make = _OpenVino if engine == "openvino" else _OnnxRuntime
    return make(net, precision, Path(cache) if cache is not None else default_cache())


# One set-up at a time in a process: torch's tracing is not thread-safe, and a second model
# of the same network then finds the first one's entry. Processes meet at the rename.
_SETTING_UP = threading.Lock()


class _Converted:
    """A runtime's forward, converting `net` on first use (thread-safe)."""

    engine = ""

    def __init__(self, net: torch.nn.Module, precision: str, cache: Path) -> None:
        from biounet.export import inference_copy

        self.net, self.precision, self.cache = inference_copy(net), precision, cache
        self.threads = torch.get_num_threads()  # the one knob: torch's (OMP_NUM_THREADS)
        self._lock = threading.Lock()
        self._ready = False
        self._failed: str | None = None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            if self._failed is not None:  # said once; not converted again on every call
                raise BiounetError(self._failed)
            if not self._ready:
                try:
                    with _SETTING_UP:
                        self._setup()
                except BiounetError as exc:
                    self._failed = str(exc)
                    raise
                except Exception as exc:  # the runtime's own errors, in one line
                    self._failed = (
                        f"engine {self.engine} could not convert the network "
                        f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}); "
                        "use engine torch"
                    )
                    raise BiounetError(self._failed) from None
                self._ready = True
        return self.run(np.ascontiguousarray(batch, dtype=np.float32))

    def _setup(self) -> None:
        folder = self.cache / self.engine / digest(self.net, self.engine)
        if folder.is_dir():
            try:
                self._load_checked(folder)
                log.info("%s: graph loaded from %s", self.engine, folder)
                return
            except Exception as exc:  # a damaged cache entry is converted again
                log.warning("%s: cannot use %s (%s); converting again", self.engine, folder,
                            str(exc).splitlines()[0][:200])  # fmt: skip
                _discard(folder)
        if _writable(folder.parent):
            remove_leftovers(folder.parent)  # of converters killed on this host
            tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(folder.name), suffix=".part",
                                        dir=folder.parent))  # fmt: skip
            try:
                self._convert(tmp)
                _seal(tmp)
                _keep(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            self._load_checked(folder)
            log.info("%s: graph converted into %s", self.engine, folder)
            return
        log.warning("%s: cannot write the cache folder %s; converting for this run only",
                    self.engine, folder.parent)  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="biounet-") as tmp:
            self._convert(Path(tmp))
            self.load(Path(tmp))

    def _load_checked(self, folder: Path) -> None:
        """Load a kept graph whose files are those checked against torch when it was kept:
        an entry damaged on disk (or by hand) is never used."""
        _check_seal(folder)
        self.load(folder)

    def _convert(self, folder: Path) -> None:
        from biounet.export import _quiet_torch

        with _quiet_torch():
            self.convert(folder)

    # per runtime
    def convert(self, folder: Path) -> None:
        """Write the converted graph into `folder`, checked against the network
        (`biounet.export.check_exported`)."""
        raise NotImplementedError

    def load(self, folder: Path) -> None:
        """Hold the graph in `folder` in memory (the files may go afterwards)."""
        raise NotImplementedError

    def checker(self) -> Forward:
        """An fp32 forward of the loaded graph, for `check_exported`."""
        raise NotImplementedError

    def run(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def _keep(tmp: Path, folder: Path) -> None:
    """Rename a converted graph into place; where another process was faster, its entry (the
    same graph) stays and this one goes."""
    try:
        os.rename(tmp, folder)
    except OSError as exc:
        if not folder.is_dir():
            raise BiounetError(f"cannot keep the converted graph in {folder}: {exc}") from None


SEAL = "sha256.json"


def _checksums(folder: Path) -> dict[str, str]:
    """SHA-256 of every file in `folder` but the seal, by name."""
    sums = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.is_symlink():
            raise BiounetError(f"{path}: a converted graph holds plain files only")
        if path.name != SEAL:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 24):
                    h.update(block)
            sums[path.name] = h.hexdigest()
    return sums


def _seal(folder: Path) -> None:
    """Write the checksums of a converted graph's files beside them, before it is kept."""
    (folder / SEAL).write_text(json.dumps(_checksums(folder), indent=1))


def _check_seal(folder: Path) -> None:
    """Raise `BiounetError` unless the files of `folder` are the ones sealed in it."""
    try:
        sealed = json.loads((folder / SEAL).read_text())
    except (OSError, ValueError):
        raise BiounetError(f"{folder}: its checksums ({SEAL}) are missing or unreadable") from None
    if _checksums(folder) != sealed:
        raise BiounetError(f"{folder}: its files differ from the checksums kept with them")


def _discard(folder: Path) -> None:
    """Take a damaged entry out of the way: renamed first (a reader sees it whole or not at
    all), then removed."""
    # named as `remove_leftovers` knows, should a kill come before the removal
    gone = folder.with_name(f"{temp_prefix(folder.name)}gone.tmp")
    try:
        os.rename(folder, gone)
    except OSError:
        return  # another process took it away already
    shutil.rmtree(gone, ignore_errors=True)


def _writable(folder: Path) -> bool:
    """Whether files can be created in `folder` (made if missing)."""
    try:
        ensure_dir(folder)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except (OSError, BiounetError):
        return False


class _OnnxRuntime(_Converted):
    engine = "onnxruntime"
    FILE = "model.onnx"

    def convert(self, folder: Path) -> None:
        from biounet.export import to_onnx

        to_onnx(self.net, folder / self.FILE)  # checked there, by onnxruntime

    def _session(self, folder: Path):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        # Its arena keeps every tile's peak: 1.78 GB against 0.99 GB without it for one
        # 700 px tile of the base-64 network, for 9 % more time (bench/engines.py machine).
        options.enable_cpu_mem_arena = False
        return onnxruntime.InferenceSession(
            str(folder / self.FILE), options, providers=["CPUExecutionProvider"]
        )

    def load(self, folder: Path) -> None:
        self.session = self._session(folder)  # holds the graph: the file may go

    def checker(self) -> Forward:
        return self.run

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"image": batch})[0]


class _OpenVino(_Converted):
    """OpenVINO compiles the graph for each batch shape (static shapes run fastest; ~0.1-0.5 s
    each) and keeps the last few used, each with its idle infer requests (one per concurrent
    caller; a request holds its activations, so few shapes are kept)."""

    engine = "openvino"
    FILE = "model.xml"  # and model.bin
    SHAPES = 4  # a plan's tile and its last smaller batch, each also turned (TTA, non-square)
    HINTS = {"fp32": "f32", "bf16": "bf16"}

    def convert(self, folder: Path) -> None:
        import openvino

        from biounet.export import check_exported

        side = _check_side(self.net)
        example = torch.zeros(1, self.net.config.in_channels, side, side)
        with torch.no_grad():
            model = openvino.convert_model(self.net, example_input=example)
        openvino.save_model(model, str(folder / self.FILE), compress_to_fp16=False)
        self.load(folder)
        check_exported(self.net, self.checker(), "OpenVINO")

    def checker(self) -> Forward:
        return lambda x: self._compile(x.shape, "fp32")(x)[0]

    def load(self, folder: Path) -> None:
        import openvino

        self.core = openvino.Core()
        self.model = self.core.read_model(str(folder / self.FILE))
        self.compiled: dict[tuple[int, ...], tuple] = {}

    def _compile(self, shape: tuple[int, ...], precision: str):
        model = self.model.clone()
        model.reshape({0: list(shape)})
        return self.core.compile_model(
            model,
            "CPU",
            {
                "INFERENCE_PRECISION_HINT": self.HINTS[precision],
                "INFERENCE_NUM_THREADS": self.threads,
                "PERFORMANCE_HINT": "LATENCY",
            },
        )

    def run(self, batch: np.ndarray) -> np.ndarray:
        compiled, idle = self._for_shape(batch.shape)
        with self._lock:
            request = idle.pop() if idle else compiled.create_infer_request()
        try:
            return np.array(request.infer({0: batch})[0], dtype=np.float32, copy=True)
        finally:
            with self._lock:
                idle.append(request)

    def _for_shape(self, shape: tuple[int, ...]) -> tuple:
        with self._lock:
            if shape in self.compiled:
                self.compiled[shape] = self.compiled.pop(shape)  # the most recent, last
            else:
                if len(self.compiled) >= self.SHAPES:
                    self.compiled.pop(next(iter(self.compiled)))  # the least recently used
                self.compiled[shape] = (self._compile(shape, self.precision), [])
            return self.compiled[shape]


def _check_side(net: torch.nn.Module) -> int:
    from biounet.export import check_sizes

    return check_sizes(net.config, 1)[0]
