"""The U-Net of Ronneberger, Fischer and Brox (2015): the network, block by block.

Its architecture and size arithmetic (`UNetConfig`) live in `biounet.architecture`.

This module imports nothing but torch, so that it also serves, as it is, as the architecture
source of an exported bioimage.io package (`from_fields`), loadable where biounet is not
installed.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

if TYPE_CHECKING:
    from biounet.architecture import UNetConfig

__all__ = ["BatchDropout2d", "UNet", "from_fields"]


class DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by (batch norm and) ReLU."""

    def __init__(self, cin: int, cout: int, padding: str, batch_norm: bool) -> None:
        pad = 1 if padding == "same" else 0
        layers: list[nn.Module] = []
        for c in (cin, cout):
            layers.append(nn.Conv2d(c, cout, 3, padding=pad, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class Down(nn.Sequential):
    """2x2 max-pool with stride 2, then a double convolution with twice the channels."""

    def __init__(self, cin: int, cout: int, padding: str, batch_norm: bool) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(cin, cout, padding, batch_norm))


class Up(nn.Module):
    """2x2 up-convolution halving the channels, crop-and-concatenate the skip, double conv."""

    def __init__(self, cin: int, cout: int, padding: str, batch_norm: bool) -> None:
        super().__init__()
        self.upconv = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        self.conv = DoubleConv(2 * cout, cout, padding, batch_norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.upconv(x)
        return self.conv(torch.cat([crop_like(skip, x), x], dim=1))


def crop_like(skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The central window of `skip` the size of `x` (the paper's "cropping" of the skips).

    The valid network's size differences are even, so the crop is symmetric. Written with
    tensor sizes only (no Python ints), so traced exports keep height and width dynamic.
    """
    top = (skip.shape[-2] - x.shape[-2]) // 2
    left = (skip.shape[-1] - x.shape[-1]) // 2
    return skip[..., top : top + x.shape[-2], left : left + x.shape[-1]]


class BatchDropout2d(nn.Module):
    """Channel dropout (as `nn.Dropout2d`) whose masks can be rows of a larger batch's.

    In data-parallel training each process holds rows ``offset : offset + B`` of a global
    batch of ``total`` rows (`rows`). Drawing the global batch's masks and keeping those
    rows makes N processes drop exactly the channels one process with the whole batch drops.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        # (offset, total); None: the batch itself. Typed for TorchScript, which scripts the
        # network for export (`biounet.export`).
        self.rows: Optional[tuple[int, int]] = None  # noqa: UP045

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        rows = self.rows
        offset, total = (0, x.shape[0]) if rows is None else rows
        keep = torch.empty((total, x.shape[1], 1, 1), dtype=x.dtype, device=x.device)
        keep.bernoulli_(1.0 - self.p)
        return x * keep[offset : offset + x.shape[0]] / (1.0 - self.p)


class UNet(nn.Module):
    """The U-Net: a contracting path, a bottleneck and an expanding path with skips.

    Input ``(N, in_channels, H, W)`` float; output ``(N, num_classes, H', W')`` logits, with
    ``H' = config.output_size(H)`` (H - 184 for the paper's depth 4 valid network).
    """

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        if config is None:
            from biounet.architecture import UNetConfig

            config = UNetConfig()
        self.config = config
        c, p, bn = config.base_channels, config.padding, config.batch_norm
        widths = [c * 2**level for level in range(config.depth + 1)]
        self.inc = DoubleConv(config.in_channels, widths[0], p, bn)
        self.downs = nn.ModuleList(
            Down(widths[i], widths[i + 1], p, bn) for i in range(config.depth)
        )
        self.dropout = BatchDropout2d(config.dropout) if config.dropout else nn.Identity()
        self.ups = nn.ModuleList(
            Up(widths[i + 1], widths[i], p, bn) for i in reversed(range(config.depth))
        )
        self.head = nn.Conv2d(widths[0], config.num_classes, 1)
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = self.dropout(skips.pop())
        for up in self.ups:
            x = up(x, skips.pop())
        return self.head(x)

    def reset_parameters(self) -> None:
        """He initialisation as in the paper: normal with std sqrt(2 / N), N = fan-in."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                fan_in = m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]
                if isinstance(m, nn.ConvTranspose2d):
                    # Each output pixel of a stride-2 2x2 up-convolution sees one input pixel
                    # per input channel, so its fan-in is the number of input channels.
                    fan_in = m.weight.shape[0]
                with torch.no_grad():
                    m.weight.normal_(0.0, math.sqrt(2.0 / fan_in))
                    if m.bias is not None:
                        m.bias.zero_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_conv_layers(self) -> int:
        """Convolutions, up-convolutions included (the paper counts 23 at depth 4)."""
        return sum(isinstance(m, nn.Conv2d | nn.ConvTranspose2d) for m in self.modules())


def from_fields(**fields) -> UNet:
    """The network of `UNetConfig` ``fields`` (depth, base_channels, ...), given by name.

    For loaders that know no `UNetConfig`: a bioimage.io package names this function and the
    fields as its architecture. The fields are taken as they are: biounet checks them (as a
    `UNetConfig`) when it writes the package; a loader without biounet does not.
    """
    return UNet(SimpleNamespace(**fields))
