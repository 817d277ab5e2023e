"""Intensity normalisation, stored with the model so that prediction normalises as training did.

Microscopy images are often 12-bit data in 16-bit containers, so scaling by the dtype's range
would squash them; the default maps each channel's 1st..99.8th percentile to 0..1, as
microscopy tools (CSBDeep, StarDist) do.
"""

from __future__ import annotations

import numpy as np

from biounet.configs import METHODS, NormalizeConfig

__all__ = ["METHODS", "NormalizeConfig", "apply_normalization", "normalization_params", "normalize"]


def normalize(image: np.ndarray, config: NormalizeConfig) -> np.ndarray:
    """Normalise an image channel by channel.

    Parameters
    ----------
    image : ndarray, shape (C, H, W), any real dtype
    config : NormalizeConfig

    Returns
    -------
    ndarray of float32, shape (C, H, W)
    """
    offset, scale = normalization_params(image, config)
    return apply_normalization(image, offset, scale)


def normalization_params(
    image: np.ndarray, config: NormalizeConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(offset, scale)`` such that normalised = (x - offset) / scale.

    Parameters
    ----------
    image : ndarray, shape (C, H, W)
        The image, or a representative subsample of it (for images too large to hold).

    Returns
    -------
    offset, scale : ndarray of float32, shape (C,)
    """
    channels = image.shape[0]
    if config.method == "dtype" and np.issubdtype(image.dtype, np.integer):
        return np.zeros(channels, np.float32), np.full(
            channels, np.iinfo(image.dtype).max, np.float32
        )
    if config.method != "percentile":
        return np.zeros(channels, np.float32), np.ones(channels, np.float32)
    flat = image.reshape(channels, -1)
    lo, hi = np.percentile(flat, [config.low, config.high], axis=1)
    # A flat channel (hi == lo) would divide by zero; it carries no contrast, so map it to 0.
    scale = np.where(hi > lo, hi - lo, 1.0)
    return lo.astype(np.float32), scale.astype(np.float32)


def apply_normalization(image: np.ndarray, offset: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(image - offset) / scale per channel, float32 (C, H, W)."""
    x = image.astype(np.float32)
    x -= offset[:, None, None]
    x /= scale[:, None, None]
    return x
