"""Windows of images: mirror extrapolation (the paper's way of supplying missing border
context) and centred crops.

A window may reach any distance beyond the image: indices are reflected about the first and
last pixel (``numpy.pad(mode="reflect")`` semantics, edge pixel not repeated) and repeat with
period ``2 * (n - 1)``. Written by hand because `numpy.pad` builds the whole padded image,
while overlap-tile prediction and training need one window at a time.
"""

from __future__ import annotations

import numpy as np


def mirror_indices(start: int, stop: int, n: int) -> np.ndarray:
    """Source indices in ``[0, n)`` for positions ``start..stop-1`` of a mirrored axis.

    Parameters
    ----------
    start, stop : int
        Window bounds on the infinite mirrored axis (may be negative or >= n).
    n : int
        Length of the real axis, >= 1.

    Returns
    -------
    ndarray of int64, shape (stop - start,)
    """
    idx = np.arange(start, stop, dtype=np.int64)
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= n, period - idx, idx)


def mirror_crop(image: np.ndarray, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Window ``[y0, y0+h) x [x0, x0+w)`` of the last two axes of `image`, mirrored outside.

    Parameters
    ----------
    image : array-like, shape (..., H, W)
        A numpy array, memory map or any array that supports basic slicing (zarr): only the
        rows and columns the window needs are read.
    y0, x0 : int
        Top-left corner of the window; may lie outside the image.
    h, w : int
        Window size; may exceed the image.

    Returns
    -------
    ndarray, shape (..., h, w), same dtype as `image`
    """
    height, width = image.shape[-2:]
    if y0 >= 0 and y0 + h <= height and x0 >= 0 and x0 + w <= width:
        return np.array(image[..., y0 : y0 + h, x0 : x0 + w])
    rows = mirror_indices(y0, y0 + h, height)
    cols = mirror_indices(x0, x0 + w, width)
    r0, c0 = int(rows.min()), int(cols.min())
    block = np.asarray(image[..., r0 : int(rows.max()) + 1, c0 : int(cols.max()) + 1])
    return np.take(np.take(block, rows - r0, axis=-2), cols - c0, axis=-1)


def center_crop(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Central ``shape`` window of the last two axes, aligned with the tile convention.

    Tile pixel ``(h // 2, w // 2)`` of the input lands on pixel ``(h_out // 2, w_out // 2)`` of
    the crop, so cropping ``identity_coordinates(tile_shape, c)`` gives
    ``identity_coordinates(shape, c)``. Use it to take the target window's coordinates from the
    map sampled for the input tile.

    The skip connections of the valid U-Net use it too: their size differences are even, so
    this is the symmetric crop there.

    Parameters
    ----------
    array : ndarray or torch.Tensor, shape (..., h, w)
    shape : tuple of int
        ``(h_out, w_out)``, each no larger than the input's.

    Returns
    -------
    same type as `array`, shape (..., h_out, w_out), a view
    """
    h, w = array.shape[-2:]
    h_out, w_out = (int(s) for s in shape)
    if h_out < 1 or w_out < 1:
        raise ValueError(f"crop shape must be positive, got {tuple(shape)}")
    if h_out > h or w_out > w:
        raise ValueError(f"crop {shape} is larger than the array's last axes {(h, w)}")
    r0 = h // 2 - h_out // 2
    c0 = w // 2 - w_out // 2
    return array[..., r0 : r0 + h_out, c0 : c0 + w_out]
