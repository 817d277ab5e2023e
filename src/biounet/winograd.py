"""The U-Net's forward pass with Winograd convolutions (NNPACK): the fp32 engine of CPUs
without fast bf16.

Why by hand: on such CPUs (AVX2: most laptops) the 3x3 convolutions are nearly all of a
U-Net's work, and no maintained runtime runs them with Winograd's algorithm there: oneDNN
(under torch and OpenVINO) has Winograd kernels for AVX-512 only, and ONNX Runtime runs
direct convolutions. NNPACK, built into PyTorch's CPU builds, has them (F(6x6, 3x3): 64
multiplications per 6x6 outputs and channel pair where a direct convolution needs 324; the
transforms cost per channel, so the gain grows with the width), but torch hands a
convolution to it only for batches of 16 or more, which a tile loop never has. So this
module runs the network `biounet.model.UNet` describes layer for layer: NNPACK for every
3x3 convolution (`torch._nnpack_spatial_convolution`, with batch norm folded into it), and
for the rest what was measured fastest around it on the same CPU: max-pool as two strided
maxima, each up-convolution as one matrix product written straight into the buffer it is
concatenated in, the 1x1 head as a matrix product. On an AVX2
AMD EPYC that ran the paper's network (base 64) 2.0x faster than torch eager fp32 and 1.3x
faster than OpenVINO fp32, but a base-32 one slower than OpenVINO (docs/benchmarks.md,
"AVX2"; `biounet.runtimes.NNPACK_MIN_CHANNELS`).

Winograd rounds differently from a direct convolution: the logits stay within 1e-5 of their
range of torch fp32's. Each forward is checked against the network at the two smallest
valid sizes when it is made (`biounet.export.check_exported`, as the runtimes' conversions
are), in batches of one and two (NNPACK runs them through different functions), so a torch
build whose NNPACK misbehaves is refused, not used.
"""

from __future__ import annotations

import os
import platform
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from biounet.architecture import UNetConfig
from biounet.errors import BiounetError
from biounet.model import UNet
from biounet.precision import cpu_capability

Forward = Callable[[np.ndarray], np.ndarray]
UNAVAILABLE = (
    "engine nnpack needs a PyTorch build with NNPACK on a CPU it runs on (x86 with AVX2, or "
    "ARM): use engine auto or torch"
)
_INIT = threading.Lock()
_WORKER: dict[int, ThreadPoolExecutor] = {}  # by process: a forked child needs its own


def available() -> bool:
    """Whether this torch build has NNPACK and it starts on this CPU (it needs AVX2 on x86).
    The probe also initialises NNPACK, without which its convolutions fail."""
    probe = getattr(torch, "_nnpack_available", None)
    if probe is None or not hasattr(torch, "_nnpack_spatial_convolution"):
        return False
    if platform.machine().lower() in ("x86_64", "amd64") and cpu_capability() == "DEFAULT":
        return False  # no AVX2: probing would only print NNPACK's "unsupported hardware"
    with _INIT:
        try:
            return bool(probe())
        except RuntimeError:
            return False


@dataclass(frozen=True)
class _Conv:
    """A 3x3 convolution with its batch norm folded in, then ReLU."""

    weight: torch.Tensor
    bias: torch.Tensor
    pad: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        try:
            y = torch._nnpack_spatial_convolution(x, self.weight, self.bias, [self.pad] * 2, [1, 1])
        except RuntimeError as e:  # NNPACK's own failures (memory, its thread pool)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BiounetError(f"engine nnpack failed ({first}): use engine torch") from None
        return y.relu_()


@dataclass(frozen=True)
class _Up:
    """A 2x2 up-convolution as the matrix (4 * cout, cin), rows ordered (cout, dy, dx): the
    transposed view of the weight (cin, cout, 2, 2), no copy."""

    matrix: torch.Tensor
    bias: torch.Tensor

    def into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Write the up-convolution of `x` (N, cin, h, w) into `out` (N, cout, 2h, 2w)."""
        n, cin, h, w = x.shape
        cout = self.bias.shape[0]
        for i in range(n):  # one 2-D product per image: no batched-product copies
            y = torch.mm(self.matrix, x[i].reshape(cin, h * w)).view(cout, 2, 2, h, w)
            out[i].view(cout, h, 2, w, 2).copy_(y.permute(0, 3, 1, 4, 2))
        out += self.bias.view(1, cout, 1, 1)


def _double(block: nn.Sequential, pad: int) -> tuple[_Conv, _Conv]:
    """The two folded convolutions of a `biounet.model.DoubleConv`."""
    convs, layers = [], list(block)
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Conv2d):
            weight = layer.weight.detach().float()
            bias = layer.bias.detach().float() if layer.bias is not None else None
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            if isinstance(nxt, nn.BatchNorm2d):  # y = (conv - mean) * gamma / std + beta
                scale = nxt.weight.detach() / torch.sqrt(nxt.running_var + nxt.eps)
                weight = weight * scale.view(-1, 1, 1, 1)
                base = bias if bias is not None else torch.zeros_like(scale)
                bias = (base - nxt.running_mean) * scale + nxt.bias.detach()
            convs.append(_Conv(weight.contiguous(), bias.contiguous(), pad))
    return convs[0], convs[1]


def _pool(x: torch.Tensor) -> torch.Tensor:
    """2x2 max-pool, stride 2, odd rows and columns dropped as `nn.MaxPool2d` does (two
    strided maxima: 3x faster than torch's max-pool on the AVX2 CPU measured)."""
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    rows = torch.maximum(x[..., 0:h:2, :w], x[..., 1:h:2, :w])
    return torch.maximum(rows[..., 0::2], rows[..., 1::2])


class WinogradUNet:
    """A `UNet`'s inference forward with NNPACK's convolutions: ``(N, C, H, W) float32 ->
    (N, K, H', W')`` logits, equal to ``net(x)`` within Winograd's rounding.

    Parameters
    ----------
    net : UNet
        A float32 network on the CPU in eval mode; the convolutions' weights are taken as
        they are (shared where no batch norm is folded in: no copy), so the network must
        not change afterwards. Call `available` first.

    Examples
    --------
    >>> from biounet.architecture import UNetConfig
    >>> net = UNet(UNetConfig(depth=2, base_channels=8)).eval()
    >>> x = torch.rand(1, 1, 92, 92)
    >>> bool(abs(WinogradUNet(net)(x) - net(x)).max() < 1e-4) if available() else True
    True
    """

    def __init__(self, net: UNet) -> None:
        pad = 1 if net.config.padding == "same" else 0
        self.inc = _double(net.inc, pad)
        self.downs = [_double(down[1], pad) for down in net.downs]
        self.ups = []
        for up in net.ups:
            w = up.upconv.weight.detach().float()  # (cin, cout, 2, 2)
            matrix = w.reshape(w.shape[0], -1).t()  # torch.mm takes it transposed as it is
            self.ups.append((_Up(matrix, up.upconv.bias.detach().float()), _double(up.conv, pad)))
        head = net.head.weight.detach().float()
        self.head = head.view(head.shape[0], -1).contiguous()
        self.head_bias = net.head.bias.detach().float().view(-1, 1)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        first, second = self.inc
        skips = [second(first(x.contiguous()))]
        for first, second in self.downs:
            skips.append(second(first(_pool(skips[-1]))))
        x = skips.pop()
        for up, (first, second) in self.ups:
            x = second(first(self._up_and_concat(up, x, skips.pop())))
        n, c, h, w = x.shape
        out = torch.empty(n, self.head.shape[0], h * w)
        for i in range(n):
            torch.addmm(self.head_bias, self.head, x[i].reshape(c, h * w), out=out[i])
        return out.view(n, -1, h, w)

    @staticmethod
    def _up_and_concat(up: _Up, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """[central crop of `skip`, up-convolution of `x`] along channels, as
        `biounet.model.Up` concatenates them, written into one buffer."""
        n, cout = x.shape[0], up.bias.shape[0]
        h, w = 2 * x.shape[-2], 2 * x.shape[-1]
        top, left = (skip.shape[-2] - h) // 2, (skip.shape[-1] - w) // 2
        both = torch.empty(n, skip.shape[1] + cout, h, w)
        both[:, : skip.shape[1]].copy_(skip[..., top : top + h, left : left + w])
        up.into(x, both[:, skip.shape[1] :])
        return both


def overhead_bytes(net: UNetConfig) -> int:
    """Memory the engine holds beyond what the torch engine holds (the network's weights,
    and the feature maps `biounet.tiling.tile_memory` counts): NNPACK's transformed kernels
    of the widest layer (8 x 8 values per pair of channels), which its workspace keeps
    between calls, and with batch norm the folded copy of the weights."""
    widest = net.base_channels * 2**net.depth
    folded = net.parameter_count() if net.batch_norm else 0
    return 4 * (folded + 64 * widest * widest)


def _worker() -> ThreadPoolExecutor:
    """The one thread every nnpack forward runs in (made on first use)."""
    with _INIT:
        pid = os.getpid()
        if pid not in _WORKER:
            _WORKER[pid] = ThreadPoolExecutor(1, thread_name_prefix="biounet-nnpack")
        return _WORKER[pid]


def winograd_forward(net: UNet) -> Forward:
    """`net` as a numpy batch function ``(B, C, h, w) float32 -> (B, K, h', w') float32``
    (like `biounet.tiling.model_forward`) running `WinogradUNet`, checked against `net`.

    `net` is the engine's own network, as for the torch engine: it is put in eval mode,
    float32 on the CPU in the default layout (a network that a torch engine put in
    channels-last, e.g. after training's post-processing fit, comes back), and its weights
    are used where they are (a copy of the paper's network would hold another 124 MB, which
    the automatic tile would have to give up).

    Raises
    ------
    BiounetError
        Where this torch has no NNPACK, or its results differ from the network's.
    """
    from biounet.export import check_exported

    if not available():
        raise BiounetError(UNAVAILABLE)
    reference = net.to("cpu", torch.float32, memory_format=torch.contiguous_format).eval()
    fast = WinogradUNet(reference)
    # Every call, of every engine, runs in one thread: NNPACK keeps its workspace (~0.5 GB
    # for the paper's network at a 700 px tile) per thread, and the tile loop's new thread
    # per image kept another copy in each (measured: a peak of 2.0 GB against 1.4 GB
    # predicting a 3072 px image on the AVX2 EPYC).
    worker = _worker()

    def run(batch: np.ndarray) -> np.ndarray:
        return fast(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))).numpy()

    def forward(batch: np.ndarray) -> np.ndarray:
        return worker.submit(run, batch).result()

    try:
        for batch in (1, 2):
            check_exported(reference, forward, "NNPACK", batch=batch)
    except BiounetError as e:
        if str(e).startswith("engine nnpack failed"):
            raise
        raise BiounetError(
            "engine nnpack: this PyTorch's NNPACK gives results that differ from the "
            "network's; use engine auto or torch"
        ) from None
    return forward
