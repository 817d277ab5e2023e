"""Intensity normalisation, stored with the model so that prediction normalises as training did.

Microscopy images are often 12-bit data in 16-bit containers, so scaling by the dtype's range
would squash them; the default maps each channel's 1st..99.8th percentile to 0..1, as
microscopy tools (CSBDeep, StarDist) do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from biounet.errors import BiounetError

METHODS = ("percentile", "dtype", "none")


@dataclass(frozen=True)
class NormalizeConfig:
    """How raw intensities become network input.

    Parameters
    ----------
    method : {"percentile", "dtype", "none"}
        "percentile": per image and channel, (x - p_low) / (p_high - p_low);
        "dtype": divide by the maximum of the integer dtype (255, 65535); floats unchanged;
        "none": cast to float32 unchanged.
    low, high : float
        Percentiles for "percentile".
    """

    method: str = "percentile"
    low: float = 1.0
    high: float = 99.8

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise BiounetError(
                f"normalization method must be one of {METHODS}, not {self.method!r}"
            )
        if not 0.0 <= self.low < self.high <= 100.0:
            raise BiounetError(
                f"need 0 <= low < high <= 100 percentiles, got {self.low}, {self.high}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


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
