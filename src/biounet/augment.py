"""The paper's data augmentation, expressed as a coordinate map per training tile.

Ronneberger et al. (2015) train on random tiles with shifts, rotations, flips, gray-value
changes and, above all, smooth elastic deformations: random displacements on a coarse 3 x 3
grid of control points (Gaussian, 10 px standard deviation), interpolated bicubically to a
per-pixel field. Here every geometric part is folded into one *coordinate map*: for each pixel
of the tile, the (row, col) position in the image it is read from. The map is sampled once per
tile (`sample_coordinates`) and applied to the image, the labels and the weight map alike
(`warp`), so they stay aligned and no whole-image warp is ever computed.

Conventions
-----------
* A tile of shape ``(h, w)`` centred at image position ``center = (r, c)`` covers, without
  augmentation, the rows ``r - h // 2 ... r - h // 2 + h - 1`` and the analogous columns, i.e.
  tile pixel ``(h // 2, w // 2)`` sits on `center` (`identity_coordinates`).
* Rotation, flips and scaling act about the tile's geometric centre, ``((h - 1) / 2,
  (w - 1) / 2)`` in tile pixels. The target window of a valid-convolution network is the
  central crop of the input tile; take its coordinates with `center_crop` from the map sampled
  for the *input* tile, so that both see the same deformation.
* Outside the image, values are extrapolated by mirroring (the paper's choice, as in its
  overlap-tile strategy), with SciPy's ``mode="mirror"``: reflection about the first and last
  pixel centre, the edge pixel not repeated (NumPy's ``pad(mode="reflect")``). Unlike
  ``mode="reflect"``, this never creates a flat two-pixel run at the edge, and a mirrored image
  stays continuous for spline interpolation.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from biounet.configs import AugmentConfig
from biounet.mirror import center_crop

__all__ = [
    "AugmentConfig",
    "adjust_gray",
    "center_crop",
    "elastic_displacement",
    "identity_coordinates",
    "sample_coordinates",
    "warp",
]

# Extra context cut around the sampled region for spline orders >= 2: their prefilter is a
# global recursive filter whose boundary effect decays like |pole|^k (worst pole 0.43 at
# order 5), so 40 px puts the error of working on a window below 1e-14 of the image range.
_SPLINE_MARGIN = 40


def identity_coordinates(tile_shape: tuple[int, int], center: tuple[float, float]) -> np.ndarray:
    """Coordinate map of the plain, unaugmented tile.

    Parameters
    ----------
    tile_shape : tuple of int
        ``(h, w)`` of the tile.
    center : tuple of float
        Image position ``(row, col)`` of tile pixel ``(h // 2, w // 2)``.

    Returns
    -------
    ndarray of float64, shape (2, h, w)
        ``coords[:, i, j] == (center[0] - h // 2 + i, center[1] - w // 2 + j)``.
    """
    h, w = _check_shape(tile_shape)
    rows = center[0] - h // 2 + np.arange(h, dtype=np.float64)
    cols = center[1] - w // 2 + np.arange(w, dtype=np.float64)
    coords = np.empty((2, h, w), dtype=np.float64)
    coords[0] = rows[:, None]
    coords[1] = cols[None, :]
    return coords


def elastic_displacement(
    tile_shape: tuple[int, int], rng: np.random.Generator, grid: int = 3, std: float = 10.0
) -> np.ndarray:
    """Smooth random displacement field over a tile, the paper's elastic deformation.

    Displacements are drawn i.i.d. from N(0, std^2) for both axes at ``grid x grid`` control
    points spread evenly over the tile (first and last at the tile's edge pixels) and
    interpolated by an interpolating cubic B-spline (SciPy's spline interpolation, order 3),
    which passes exactly through the control values and is twice continuously differentiable.
    Beyond the outer control points the control grid is mirrored (``mode="mirror"``), so the
    field levels off at the tile edges instead of extrapolating a trend. The tensor-product
    spline is separable, so it is evaluated as ``B_r @ control @ B_c.T`` with 1-D basis
    matrices, far cheaper than per-pixel 2-D interpolation.

    Parameters
    ----------
    tile_shape : tuple of int
        ``(h, w)``.
    rng : numpy.random.Generator
        Source of the ``2 * grid * grid`` Gaussian draws.
    grid : int
        Control points per axis, >= 2.
    std : float
        Standard deviation of the control-point displacements, in pixels.

    Returns
    -------
    ndarray of float64, shape (2, h, w)
        Row and column displacement of each tile pixel.
    """
    h, w = _check_shape(tile_shape)
    if grid < 2:
        raise ValueError(f"grid must be >= 2, got {grid}")
    control = rng.normal(0.0, std, size=(2, grid, grid))
    basis_r = _spline_basis(h, grid)
    basis_c = _spline_basis(w, grid)
    return np.einsum("ia,kab,jb->kij", basis_r, control, basis_c)


def sample_coordinates(
    tile_shape: tuple[int, int],
    center: tuple[float, float],
    rng: np.random.Generator,
    config: AugmentConfig | None = None,
) -> np.ndarray:
    """Draw one augmentation and return its coordinate map for a tile.

    The source position of tile pixel ``p`` is ``center_img + A @ (p - p0) + shift + d(p)``,
    with ``p0`` the tile's geometric centre, ``center_img`` its image position, ``A`` the
    product of rotation, 1/scale and flips, and ``d`` the elastic field. With every geometric
    augmentation off (or ``elastic_std == 0``) this is exactly `identity_coordinates`.

    Parameters
    ----------
    tile_shape : tuple of int
        ``(h, w)`` of the (input) tile.
    center : tuple of float
        Image position ``(row, col)`` of tile pixel ``(h // 2, w // 2)``.
    rng : numpy.random.Generator
        The only source of randomness; the same state gives the same map.
    config : AugmentConfig, optional
        Defaults to ``AugmentConfig()`` (the paper's settings).

    Returns
    -------
    ndarray of float64, shape (2, h, w)
        Source (row, col) in the image for every tile pixel; may lie outside the image
        (`warp` mirrors there).
    """
    config = AugmentConfig() if config is None else config
    h, w = _check_shape(tile_shape)
    coords = identity_coordinates((h, w), center)
    if config.is_geometric_identity:
        return coords

    matrix = np.eye(2)
    if config.flip:
        flips = np.where(rng.random(2) < 0.5, -1.0, 1.0)
        matrix = np.diag(flips)
    lo, hi = config.scale_range
    if (lo, hi) != (1.0, 1.0):
        matrix = matrix / rng.uniform(lo, hi)
    if config.rotate:
        theta = rng.uniform(0.0, 2.0 * math.pi)
        cos, sin = math.cos(theta), math.sin(theta)
        matrix = np.array([[cos, -sin], [sin, cos]]) @ matrix

    # Add (A - I) u rather than A u: exact zeros where A is the identity keep plain and flipped
    # crops on integer coordinates, which `warp` then samples bit-exactly.
    u_r = np.arange(h, dtype=np.float64)[:, None] - (h - 1) / 2
    u_c = np.arange(w, dtype=np.float64)[None, :] - (w - 1) / 2
    delta = matrix - np.eye(2)
    coords[0] += delta[0, 0] * u_r + delta[0, 1] * u_c
    coords[1] += delta[1, 0] * u_r + delta[1, 1] * u_c

    if config.max_shift > 0:
        coords += rng.uniform(-config.max_shift, config.max_shift, size=2)[:, None, None]
    if config.elastic and config.elastic_std > 0:
        coords += elastic_displacement((h, w), rng, config.elastic_grid, config.elastic_std)
    return coords


def warp(
    array: np.ndarray,
    coords: np.ndarray,
    order: int = 3,
    mode: str = "mirror",
    cval: float = 0.0,
) -> np.ndarray:
    """Sample an image, label map or weight map at a coordinate map.

    Parameters
    ----------
    array : ndarray, shape (H, W) or (C, H, W)
        Any dtype; channels share the coordinates.
    coords : ndarray, shape (2, h, w)
        Source (row, col) per output pixel, e.g. from `sample_coordinates`.
    order : int
        Spline order, 0..5: 3 (cubic, the paper's bicubic) or 1 for images and weight maps,
        0 (nearest neighbour) for labels, so class values and instance ids are copied, never
        mixed.
    mode : str
        How positions outside the image are filled, a `scipy.ndimage.map_coordinates` mode.
        Default ``"mirror"`` (see the module notes); other modes go straight to SciPy.
    cval : float
        Fill value for ``mode="constant"`` / ``"grid-constant"``.

    Returns
    -------
    ndarray, shape (h, w) or (C, h, w)
        Order 0: the dtype of `array`, values drawn from `array`. Order >= 1: float, the dtype
        of `array` if floating, else ``result_type(dtype, float32)``. Cubic interpolation
        can overshoot the input range slightly near sharp edges.

    Notes
    -----
    With ``mode="mirror"``, coordinates are first folded into the image (the mirrored spline
    is symmetric about the edge pixels, so this is exact). Integer positions, which every
    spline order interpolates exactly, are then read by indexing: plain and flipped crops are
    bit-exact and cheap. Otherwise only the window around the folded positions is
    interpolated, so the cost does not grow with the image size.
    """
    array = np.asarray(array)
    coords = np.asarray(coords, dtype=np.float64)
    if array.ndim not in (2, 3):
        raise ValueError(f"array must have shape (H, W) or (C, H, W), got {array.shape}")
    if coords.ndim != 3 or coords.shape[0] != 2:
        raise ValueError(f"coords must have shape (2, h, w), got {coords.shape}")
    if not 0 <= order <= 5:
        raise ValueError(f"order must be in 0..5, got {order}")
    stack = array if array.ndim == 3 else array[None]
    n_rows, n_cols = stack.shape[1:]
    out_dtype = stack.dtype if order == 0 else np.result_type(stack.dtype, np.float32)

    if mode == "mirror":
        rows = _fold_mirror(coords[0], n_rows)
        cols = _fold_mirror(coords[1], n_cols)
        r_int, c_int = np.rint(rows), np.rint(cols)
        if order == 0 or (np.array_equal(r_int, rows) and np.array_equal(c_int, cols)):
            out = stack[:, r_int.astype(np.intp), c_int.astype(np.intp)].astype(out_dtype)
        else:
            margin = 1 if order == 1 else _SPLINE_MARGIN
            r0 = max(int(np.floor(rows.min())) - margin, 0)
            r1 = min(int(np.ceil(rows.max())) + margin + 1, n_rows)
            c0 = max(int(np.floor(cols.min())) - margin, 0)
            c1 = min(int(np.ceil(cols.max())) + margin + 1, n_cols)
            local = np.stack([rows - r0, cols - c0])
            out = np.stack(
                [
                    ndimage.map_coordinates(
                        channel[r0:r1, c0:c1], local, output=out_dtype, order=order, mode=mode
                    )
                    for channel in stack
                ]
            )
    else:
        # map_coordinates cannot write booleans; nearest-neighbour on uint8 is lossless.
        work = stack.view(np.uint8) if stack.dtype == np.bool_ else stack
        work_dtype = work.dtype if order == 0 else out_dtype
        out = np.stack(
            [
                ndimage.map_coordinates(
                    channel, coords, output=work_dtype, order=order, mode=mode, cval=cval
                )
                for channel in work
            ]
        ).astype(out_dtype)
    return out if array.ndim == 3 else out[0]


def adjust_gray(
    image: np.ndarray, rng: np.random.Generator, config: AugmentConfig | None = None
) -> np.ndarray:
    """Random gray-value change: gamma, then contrast, then brightness.

    With ``x`` the image and ``[lo, hi]`` its value range, the result is
    ``y = lo + (hi - lo) * ((x - lo) / (hi - lo)) ** gamma``, then
    ``m + contrast * (y - m) + brightness`` with ``m`` the mean of ``y``. Taking gamma on the
    tile's own range keeps it defined for any normalisation (negative values included) and
    leaves the range unchanged. All channels get the same change.

    Parameters
    ----------
    image : ndarray of floating dtype, shape (H, W) or (C, H, W)
    rng : numpy.random.Generator
        Three draws (gamma, contrast, brightness) when ``config.gray`` is on, none otherwise.
    config : AugmentConfig, optional
        Ranges and the on/off switch; defaults to ``AugmentConfig()``.

    Returns
    -------
    ndarray, same shape and dtype as `image`
        A new array; equal to `image` when ``config.gray`` is off.
    """
    config = AugmentConfig() if config is None else config
    image = np.asarray(image)
    if not np.issubdtype(image.dtype, np.floating):
        raise TypeError(f"adjust_gray expects a floating-point image, got {image.dtype}")
    if not config.gray:
        return image.copy()
    gamma = math.exp(rng.uniform(math.log(config.gamma_range[0]), math.log(config.gamma_range[1])))
    contrast = rng.uniform(*config.contrast_range)
    brightness = rng.uniform(*config.brightness_range)

    x = image.astype(np.float64)
    lo, hi = float(x.min()), float(x.max())
    if hi > lo:
        x = lo + (hi - lo) * ((x - lo) / (hi - lo)) ** gamma
    mean = x.mean()
    x = mean + contrast * (x - mean) + brightness
    return x.astype(image.dtype)


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    h, w = (int(s) for s in shape)
    if h < 1 or w < 1:
        raise ValueError(f"shape must be positive, got {tuple(shape)}")
    return h, w


def _spline_basis(n_out: int, n_ctrl: int) -> np.ndarray:
    """``(n_out, n_ctrl)`` weights of an interpolating cubic spline through `n_ctrl` points.

    Column ``j`` is the spline through the unit vector ``e_j`` sampled at `n_out` positions
    spread evenly from the first to the last control point.
    """
    positions = np.linspace(0.0, n_ctrl - 1, n_out)[None, :]
    basis = np.empty((n_out, n_ctrl), dtype=np.float64)
    for j in range(n_ctrl):
        unit = np.zeros(n_ctrl)
        unit[j] = 1.0
        basis[:, j] = ndimage.map_coordinates(unit, positions, order=3, mode="mirror")
    return basis


def _fold_mirror(x: np.ndarray, n: int) -> np.ndarray:
    """Map positions on the mirrored infinite axis into ``[0, n - 1]``."""
    if n == 1:
        return np.zeros_like(x)
    period = 2.0 * (n - 1)
    x = np.mod(np.abs(x), period)
    return np.where(x > n - 1, period - x, x)
