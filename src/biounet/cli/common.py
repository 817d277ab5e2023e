"""What every command shares: data-path lookup, model names, flags from config defaults,
config messages worded as flags, progress on a terminal or in a log.

No torch here: ``--help``, ``--version`` and argument errors answer before it is imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import shlex
import sys
import time
from pathlib import Path

DATA_ENV = "BIOUNET_DATA"
ENGINE_ENV, CACHE_ENV = "BIOUNET_ENGINE", "BIOUNET_CACHE"


def default(config: type, name: str):
    """The default of a config dataclass's field: the one source of the CLI's defaults."""
    for f in dataclasses.fields(config):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            return f.default_factory()  # type: ignore[misc]
    raise KeyError(name)


def data_path(path: Path | None) -> Path | None:
    """A relative path that does not exist here is looked up under $BIOUNET_DATA."""
    if path is None or path.is_absolute() or path.exists():
        return path
    root = os.environ.get(DATA_ENV)
    if root and (Path(root) / path).exists():
        return Path(root) / path
    return path


def data_input(item: str) -> str:
    """A file, folder or glob pattern, looked up under $BIOUNET_DATA where it finds nothing."""
    root = os.environ.get(DATA_ENV)
    if not glob.has_magic(item):
        return str(data_path(Path(item)))
    if root and not Path(item).is_absolute() and not glob.glob(item):
        there = str(Path(root) / item)
        if glob.glob(there):
            return there
    return item


def model_path(source: Path) -> Path:
    """A model directory: a path that exists, else a shipped model's name, else a model
    directory under $BIOUNET_DATA (where a data folder may carry a shipped model's name)."""
    from biounet.io import is_model_dir
    from biounet.modeldir import resolve_model, shipped_model_dirs

    found = data_path(source)
    if not is_model_dir(source) and str(source) not in shipped_model_dirs() and is_model_dir(found):
        return found
    return resolve_model(source)


def as_flags(message: str) -> str:
    """A library message worded with the flags of the options it names.

    Library messages name options as Python keywords in backticks: ```name``` -> ``--name``
    (config fields an option sets become that option's flag: ```border_w0``` -> ``--w0``);
    a name that opens the message as its subject becomes a flag too ("max_minutes must be
    > 0" -> "--max-minutes must be > 0"). Nothing else is touched: file names, config.json
    keys and values stay as they are.
    """
    from biounet.options import all_option_names, flag

    options = all_option_names()
    names = "|".join(sorted(options, key=len, reverse=True))
    message = re.sub(rf"`({names})`", lambda m: flag(options[m[1]]), message)
    first = message.split(" ", 1)[0]
    if first in options and message.startswith(f"{first} must"):
        message = flag(options[first]) + message[len(first) :]
    return message


def command_line(args: argparse.Namespace) -> str:
    return "biounet " + " ".join(shlex.quote(a) for a in args.argv)


def add_device_flag(q: argparse.ArgumentParser) -> None:
    q.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),  # biounet.precision.DEVICES, without importing torch
        help="auto (default): the GPU where torch sees one, else the CPU",
    )


def add_precision_flag(q: argparse.ArgumentParser) -> None:
    q.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),  # biounet.precision.PRECISIONS
        help="auto (default): bf16 where the CPU or GPU has fast bf16, else fp32",
    )


def add_engine_flag(q: argparse.ArgumentParser) -> None:
    from biounet.configs import ENGINES

    engine = os.environ.get(ENGINE_ENV) or "auto"
    q.add_argument(
        "--engine",
        default=engine,
        choices=ENGINES,
        help=f"what runs the network (default {engine}: ${ENGINE_ENV}, else auto): auto picks "
        "the fastest installed one for the device, CPU and precision (nnpack, PyTorch's "
        "Winograd convolutions, on AVX2 CPUs for networks of 48+ base channels; else "
        "OpenVINO where biounet[openvino] is installed; torch on GPUs); OpenVINO and ONNX "
        "Runtime convert "
        f"the network once into ${CACHE_ENV} (default ~/.cache/biounet)",
    )


def engine_cache() -> str | None:
    """The runtimes' cache folder: $BIOUNET_CACHE, else None (the library's default)."""
    return os.environ.get(CACHE_ENV) or None


class Progress:
    """Progress of a run: a tqdm bar on a terminal, a line every `every_s` seconds in a log
    (off a terminal), nothing with ``--quiet``."""

    def __init__(self, args: argparse.Namespace, every_s: float = 30.0) -> None:
        self.quiet = getattr(args, "quiet", False)
        self.tty = sys.stderr.isatty()
        self.every_s = every_s
        self.t0 = self.last = time.monotonic()
        self.bar = None
        if self.tty and not self.quiet:
            from tqdm import tqdm

            # Counted in thousandths of the run, shown as a percentage: the description says
            # which step or file; the ETA covers whichever limit ends the run first.
            fmt = "{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}"
            self.bar = tqdm(total=1000, bar_format=fmt, dynamic_ncols=True, leave=False)

    def update(self, fraction: float, text: str, force: bool = False) -> None:
        """`fraction` of the run done (0..1), with `text` (what is being done)."""
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.n = int(1000 * min(max(fraction, 0.0), 1.0))
            self.bar.set_description_str(text, refresh=False)
            self.bar.refresh()
            return
        now = time.monotonic()
        if force or now - self.last >= self.every_s:
            self.last = now
            elapsed = now - self.t0
            eta = elapsed * (1 - fraction) / fraction if fraction > 0 else float("nan")
            print(
                f"biounet: {text} ({100 * fraction:.0f} %, {_duration(elapsed)} so far, "
                f"ETA {_duration(eta)})",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN: nothing done yet
        return "?"
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}:{m:02d}:{s:02d}" if hours else f"{m}:{s:02d}"


def say(args: argparse.Namespace, line: str) -> None:
    """A summary line on standard output, unless --quiet."""
    if not getattr(args, "quiet", False):
        print(line)
