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
    if config.method == "dtype" and np.issubdtype(image.dtype, np.integer):
        return image.astype(np.float32) / np.float32(np.iinfo(image.dtype).max)
    x = image.astype(np.float32)
    if config.method != "percentile":
        return x
    flat = x.reshape(x.shape[0], -1)
    lo, hi = np.percentile(flat, [config.low, config.high], axis=1)
    # A flat channel (hi == lo) would divide by zero; it carries no contrast, so map it to 0.
    scale = np.where(hi > lo, hi - lo, 1.0).astype(np.float32)
    return (x - lo[:, None, None].astype(np.float32)) / scale[:, None, None]
