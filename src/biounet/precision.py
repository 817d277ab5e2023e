"""Numeric precision policy: bf16 autocast where the hardware has fast bf16 matrix units.

This CPU family's AMX units run bf16 matrix products ~5x faster than fp32, so ``auto`` picks
bf16 on CPUs with AMX or AVX512-BF16 and on CUDA devices that support it, and fp32 elsewhere.
Elsewhere bf16 is emulated: on an AVX2 AMD EPYC a bf16 convolution ran ~9x slower than fp32
(docs/benchmarks.md, "AVX2"), so asking for it there is warned about.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

from biounet.errors import BiounetError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
log = logging.getLogger(__name__)


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has AMX tiles or AVX512-BF16 (PyTorch's own capability probes)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn "auto" into a concrete "fp32", "bf16" or "fp16" for `device`."""
    if precision not in PRECISIONS:
        raise BiounetError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise BiounetError("fp16 is for CUDA devices; use `precision` bf16 or fp32 on CPU")
        if precision == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
            _warn_slow_bf16()
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bf16"
    return "fp32"


@functools.cache
def _warn_slow_bf16() -> None:
    log.warning(
        "bf16 on this CPU (no AVX512-BF16 or AMX) is emulated and runs several times slower "
        "than fp32: use precision auto or fp32"
    )


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast context for a resolved precision ("fp32" means no autocast)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def bytes_per_value(precision: str) -> int:
    """Bytes of one activation value for a resolved precision."""
    return 4 if precision == "fp32" else 2


def memory_format(precision: str) -> torch.memory_format:
    """The layout a network trains in: channels_last lets oneDNN/cuDNN use their fastest
    reduced-precision convolutions. (fp32 training stays in the default layout: on the AVX2
    CPU measured, channels_last made fp32 training steps 15-25 % slower.)"""
    return torch.contiguous_format if precision == "fp32" else torch.channels_last


def cpu_capability() -> str:
    """The widest vector instruction set PyTorch's kernels use here: "AVX2", "AVX512",
    "DEFAULT" (older x86, or others), or an ARM one ("SVE256", ...)."""
    return torch.backends.cpu.get_cpu_capability()


def inference_format(precision: str, device: torch.device) -> torch.memory_format:
    """The layout a network predicts in: `memory_format`, and channels_last for fp32 on AVX2
    CPUs (no AVX-512), where oneDNN's fp32 inference convolutions ran 1.3-1.6x faster in it
    (an AVX2 AMD EPYC, the paper's network and the shipped ISBI model, docs/benchmarks.md,
    "AVX2"). The other CPUs were measured in the default layout only."""
    if precision == "fp32" and device.type == "cpu" and cpu_capability() == "AVX2":
        return torch.channels_last
    return memory_format(precision)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DEVICES = ("auto", "cpu", "cuda")


def parse_device(name: str) -> torch.device:
    """The device named by `name`: auto (CUDA where torch sees a GPU, else CPU), cpu or cuda."""
    if name not in DEVICES:
        raise BiounetError(f"device must be one of {DEVICES}, not {name!r}")
    if name == "auto":
        return default_device()
    if name == "cuda" and not torch.cuda.is_available():
        raise BiounetError(
            "--device cuda: torch sees no CUDA device (CPU-only build or no GPU); "
            "use --device auto or cpu"
        )
    return torch.device(name)
