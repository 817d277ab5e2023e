"""The U-Net's architecture and size arithmetic, without building a network (no torch).

With ``padding="valid"`` (the paper's) every 3x3 convolution loses one pixel per side, so the
output is smaller than the input: 572x572 in, 388x388 out for the paper's depth 4, and only
some input sizes are valid (each max-pool must see an even size). `UNetConfig` answers those
questions (`output_size`, `input_size`, `margin`, `valid_output_sizes`) without building a
network. ``padding="same"`` keeps the size; inputs must then be a multiple of ``2**depth``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from biounet.errors import BiounetError

PADDINGS = ("valid", "same")
MAX_DEPTH = 12
# 2e9 fp32 parameters are 8 GB before gradients and optimizer state: far past any U-Net use
MAX_PARAMETERS = 2_000_000_000


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a U-Net.

    Parameters
    ----------
    depth : int
        Number of 2x2 max-pool steps (4 in the paper: five resolution levels).
    base_channels : int
        Feature channels at the first level (64 in the paper); doubled at each level down.
    in_channels : int
        Channels of the input image.
    num_classes : int
        Output channels of the final 1x1 convolution (K in the paper's softmax).
    padding : {"valid", "same"}
        "valid" is the paper's unpadded convolution; "same" zero-pads each 3x3 convolution.
    batch_norm : bool
        Batch normalisation after each 3x3 convolution (not in the paper).
    dropout : float
        Dropout probability at the end of the contracting path (the paper uses dropout there).
    """

    depth: int = 4
    base_channels: int = 64
    in_channels: int = 1
    num_classes: int = 2
    padding: str = "valid"
    batch_norm: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.padding not in PADDINGS:
            raise BiounetError(f"padding must be one of {PADDINGS}, not {self.padding!r}")
        for name in ("depth", "base_channels", "in_channels", "num_classes"):
            value = getattr(self, name)
            low = 0 if name == "depth" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise BiounetError(f"{name} must be an integer >= {low}, not {value!r}")
        if self.num_classes < 2:
            raise BiounetError("num_classes must be >= 2 (softmax over classes)")
        if self.num_classes > 256:  # masks are written as uint8 class indices
            raise BiounetError(f"num_classes must be <= 256, not {self.num_classes}")
        if self.depth > MAX_DEPTH:
            raise BiounetError(
                f"depth must be <= {MAX_DEPTH} (the smallest tile of depth {self.depth} is "
                f"{2**self.depth} px a side), not {self.depth}"
            )
        if not (isinstance(self.dropout, int | float) and 0.0 <= self.dropout < 1.0):
            raise BiounetError(f"dropout must be in [0, 1), not {self.dropout}")
        if self.parameter_count() > MAX_PARAMETERS:
            raise BiounetError(
                f"a network of depth {self.depth} and base_channels {self.base_channels} has "
                f"{self.parameter_count():,} parameters, more than the {MAX_PARAMETERS:,} "
                "biounet builds (the paper's has 31 million); lower `base_channels` or `depth`"
            )

    def parameter_count(self) -> int:
        """Trainable parameters of the network, without building it (31.0 M for the paper's)."""
        widths = [self.base_channels * 2**level for level in range(self.depth + 1)]
        bn = self.batch_norm

        def conv(cin: int, cout: int, k: int = 3) -> int:
            return k * k * cin * cout + (2 * cout if bn and k == 3 else cout)

        total = conv(self.in_channels, widths[0]) + conv(widths[0], widths[0])
        for level in range(1, self.depth + 1):
            total += conv(widths[level - 1], widths[level]) + conv(widths[level], widths[level])
        for level in range(self.depth):
            c = widths[level]
            total += 4 * widths[level + 1] * c + c  # 2x2 up-convolution, with bias
            total += conv(2 * c, c) + conv(c, c)
        return total + conv(widths[0], self.num_classes, k=1)

    def to_dict(self) -> dict:
        return asdict(self)

    # -- size arithmetic -------------------------------------------------------------------
    @property
    def conv_loss(self) -> int:
        """Pixels one 3x3 convolution removes from a side length (2 valid, 0 same)."""
        return 2 if self.padding == "valid" else 0

    @property
    def receptive_radius(self) -> int:
        """Pixels on each side that influence an output pixel (92 at depth 4).

        Input n = 2**d * b + 2**(d+3) - 4 and output 2**d * b - 4 * (2**d - 1) for the valid
        network, b the bottom size; their difference is 12 * 2**d - 8, over two sides.
        """
        return 6 * 2**self.depth - 4

    @property
    def margin(self) -> int:
        """Pixels lost on each side between input and output (92 valid at depth 4, 0 same)."""
        return self.receptive_radius if self.padding == "valid" else 0

    @property
    def size_step(self) -> int:
        """Spacing of consecutive valid sizes, and the shift-equivariance period."""
        return 2**self.depth

    def output_size(self, n: int) -> int:
        """Output side length for an input side length `n`.

        Raises `BiounetError` naming the nearest valid sizes when `n` is not a valid input.
        """
        out = self._output(n)
        if out is None:
            lower = next((m for m in range(n - 1, 0, -1) if self._output(m)), None)
            upper = next(m for m in range(max(n + 1, 1), 2**31) if self._output(m))
            hint = f"{lower} or {upper}" if lower else f"{upper}"
            raise BiounetError(
                f"input size {n} is not valid for a depth-{self.depth} {self.padding} U-Net; "
                f"use {hint}"
            )
        return out

    def _output(self, n: int) -> int | None:
        """Output side length for input `n`, or None when some layer would see a bad size."""
        size = n
        for _ in range(self.depth):
            size -= 2 * self.conv_loss
            if size <= 0 or size % 2:
                return None
            size //= 2
        size -= 2 * self.conv_loss
        for _ in range(self.depth):
            if size <= 0:
                return None
            size = 2 * size - 2 * self.conv_loss
        return size if size > 0 else None

    def is_valid_output(self, out: int) -> bool:
        return out > 0 and self._output(out + 2 * self.margin) == out

    def input_size(self, out: int) -> int:
        """Input side length that produces output side length `out` (which must be valid)."""
        if not self.is_valid_output(out):
            lower, upper = self.snap_output(out, up=False), self.snap_output(out, up=True)
            hint = f"{lower} or {upper}" if lower else f"{upper}"
            raise BiounetError(
                f"output size {out} is not valid for a depth-{self.depth} {self.padding} U-Net; "
                f"use {hint}"
            )
        return out + 2 * self.margin

    def min_output_size(self) -> int:
        """Smallest valid output side length."""
        return self.snap_output(1, up=True)

    def snap_output(self, out: int, up: bool) -> int | None:
        """Nearest valid output size <= `out` (``up=False``, None if there is none) or >= `out`."""
        if up:
            return next(o for o in range(max(out, 1), 2**31) if self.is_valid_output(o))
        return next((o for o in range(out, 0, -1) if self.is_valid_output(o)), None)

    # -- cost arithmetic (what a forward pass of an h x w input costs) -----------------------
    def _trace(self, n: int) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
        """Side lengths along one axis: per encoder level (input, conv1, conv2) and per decoder
        level, from the bottom up, (up-convolution, conv1, conv2)."""
        loss, enc, dec = self.conv_loss, [], []
        size = n
        for _ in range(self.depth + 1):
            enc.append((size, size - loss, size - 2 * loss))
            size = (size - 2 * loss) // 2
        size = enc[-1][2]
        for _ in range(self.depth):
            up = 2 * size
            dec.append((up, up - loss, up - 2 * loss))
            size = up - 2 * loss
        return enc, dec

    def forward_flops(self, height: int, width: int) -> int:
        """Floating-point operations (2 per multiply-add) of one forward pass of one image.

        Counts the convolutions, up-convolutions and the 1x1 head; pooling, ReLU and
        concatenation are negligible. The paper's network on a 572x572 tile: ~301 GFLOP.
        """
        self.output_size(height)
        self.output_size(width)
        (enc_h, dec_h), (enc_w, dec_w) = self._trace(height), self._trace(width)
        widths = [self.base_channels * 2**level for level in range(self.depth + 1)]
        macs = 0
        for level, ((_, a_h, b_h), (_, a_w, b_w)) in enumerate(zip(enc_h, enc_w, strict=True)):
            cin = self.in_channels if level == 0 else widths[level - 1]
            c = widths[level]
            macs += 9 * cin * c * a_h * a_w + 9 * c * c * b_h * b_w
        for i, ((u_h, a_h, b_h), (u_w, a_w, b_w)) in enumerate(zip(dec_h, dec_w, strict=True)):
            c = widths[self.depth - 1 - i]
            macs += 2 * c * c * u_h * u_w  # 2x2 stride-2: each output pixel sees 2c inputs
            macs += 9 * 2 * c * c * a_h * a_w + 9 * c * c * b_h * b_w
        out_h, out_w = (
            dec_h[-1][2] if dec_h else enc_h[0][2],
            dec_w[-1][2] if dec_w else enc_w[0][2],
        )
        macs += widths[0] * self.num_classes * out_h * out_w
        return 2 * macs

    def peak_activations(self, height: int, width: int) -> int:
        """Feature-map values alive at once in an inference forward pass of one image.

        For all but the smallest tiles, the peak is in the top decoder level (on small ones, in
        the contracting path), during its second convolution: the skip maps
        still held, the level's input (``C/2`` at half size), the up-convolved map ``C``, its
        concatenation with the skip ``2C`` (the call holds it) and both convolution outputs,
        where C is the level's width, and the input image. For the paper's network: 3.6 values
        per input pixel and base channel at 572 x 572, 5.6 at 2060 x 2060. Multiply by bytes
        per value and batch size; the kernels' scratch space comes on top (tests/test_model.py
        checks this against a count of live tensor storage).
        """
        self.output_size(height)
        self.output_size(width)
        (enc_h, dec_h), (enc_w, dec_w) = self._trace(height), self._trace(width)
        widths = [self.base_channels * 2**level for level in range(self.depth + 1)]
        skips = [widths[lv] * enc_h[lv][2] * enc_w[lv][2] for lv in range(self.depth + 1)]
        image = self.in_channels * height * width  # the caller holds it throughout
        peak = image + widths[0] * (enc_h[0][1] * enc_w[0][1] + enc_h[0][2] * enc_w[0][2])
        for level in range(1, self.depth + 1):
            (s_h, a_h, b_h), (s_w, a_w, b_w) = enc_h[level], enc_w[level]
            c = widths[level]
            # the pooled input (Down's Sequential holds it) and both convolution outputs
            pooled = widths[level - 1] * s_h * s_w
            alive = image + sum(skips[:level]) + pooled + c * (a_h * a_w + b_h * b_w)
            peak = max(peak, alive)
        for i, ((u_h, a_h, b_h), (u_w, a_w, b_w)) in enumerate(zip(dec_h, dec_w, strict=True)):
            level = self.depth - 1 - i
            c = widths[level]
            # input 2c at (u/2)^2 = c u^2 / 2; up-convolved c u^2; concatenation 2c u^2
            alive = (
                image
                + sum(skips[: level + 1])
                + c * ((u_h * u_w) // 2 + 3 * u_h * u_w + a_h * a_w + b_h * b_w)
            )
            peak = max(peak, alive)
        return peak


# -- building blocks (named like the paper's diagram) -------------------------------------
