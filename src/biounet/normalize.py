"""Intensity normalisation, stored with the model so that prediction normalises as training did.

Microscopy images are often 12-bit data in 16-bit containers, so scaling by the dtype's range
would squash them; the default maps each channel's 1st..99.8th percentile to 0..1, as
microscopy tools (CSBDeep, StarDist) do.

Integer images get their percentiles from value counts (`value_counts`), which blocks of an
image too large for one process add up exactly (`merge_counts`): a cluster's blocks then
normalise with the very statistics one process computes. `percentiles_from_counts` follows
`numpy.percentile`'s linear method step for step (the same order statistics, the same
interpolation formula), so both give the same float64 values; numpy has no percentile of a
histogram, hence the few lines here.
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
    if np.issubdtype(image.dtype, np.integer):
        return params_from_counts(value_counts(image), image.dtype, config)
    flat = image.reshape(channels, -1)
    lo, hi = np.percentile(flat, [config.low, config.high], axis=1)
    return _params(lo, hi)


def _params(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # A flat channel (hi == lo) would divide by zero; it carries no contrast, so map it to 0.
    scale = np.where(hi > lo, hi - lo, 1.0)
    return lo.astype(np.float32), scale.astype(np.float32)


def apply_normalization(image: np.ndarray, offset: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(image - offset) / scale per channel, float32 (C, H, W)."""
    x = image.astype(np.float32)
    x -= offset[:, None, None]
    x /= scale[:, None, None]
    return x


Counts = list[tuple[np.ndarray, np.ndarray]]  # per channel: (sorted values, their counts)


def value_counts(image: np.ndarray) -> Counts:
    """Per channel, the distinct values of an integer image (C, H, W) and how often each
    occurs: by `numpy.bincount` for 8- and 16-bit images, by `numpy.unique` otherwise."""
    counts = []
    for channel in image.reshape(image.shape[0], -1):
        if channel.dtype.itemsize <= 2 and channel.size:
            low = int(channel.min())
            shifted = channel.astype(np.int64)
            shifted -= low  # in place: one 8-byte copy of the pixels, not two
            hist = np.bincount(shifted)
            values = np.flatnonzero(hist)
            counts.append(((values + low).astype(image.dtype), hist[values]))
        else:
            values, n = np.unique(channel, return_counts=True)
            counts.append((values, n.astype(np.int64)))
    return counts


def merge_counts(a: Counts, b: Counts) -> Counts:
    """The counts of two parts of an image, as one."""
    merged = []
    for (va, na), (vb, nb) in zip(a, b, strict=True):
        values, inverse = np.unique(np.concatenate([va, vb]), return_inverse=True)
        n = np.zeros(len(values), np.int64)
        np.add.at(n, inverse, np.concatenate([na, nb]))
        merged.append((values, n))
    return merged


def percentiles_from_counts(values: np.ndarray, counts: np.ndarray, q) -> np.ndarray:
    """`numpy.percentile(x, q)` (linear method) of the data whose value counts these are.

    Parameters
    ----------
    values : ndarray, shape (V,)
        Distinct values, ascending, in the data's dtype.
    counts : ndarray of int64, shape (V,)
    q : sequence of float
        Percentiles in [0, 100].

    Returns
    -------
    ndarray of float64, shape (len(q),)

    Examples
    --------
    >>> x = np.array([3, 1, 1, 7], np.uint8)
    >>> v, n = value_counts(x[None, None])[0]
    >>> percentiles_from_counts(v, n, [50.0]) == np.percentile(x, [50.0])
    array([ True])
    """
    total = int(counts.sum())
    ends = np.cumsum(counts)  # rank r holds values[searchsorted(ends, r, "right")]
    quantiles = np.true_divide(np.asarray(q, np.float64), 100)
    virtual = (total - 1) * quantiles  # numpy's linear method, in its own order of operations
    previous = np.floor(virtual).astype(np.intp)
    following = np.minimum(previous + 1, total - 1)
    a = values[np.searchsorted(ends, previous, side="right")]
    b = values[np.searchsorted(ends, following, side="right")]
    gamma = np.asanyarray(virtual - previous)
    diff = b - a  # numpy's _lerp: a + (b - a) t, from b's side where t >= 0.5
    result = np.add(a, diff * gamma)
    np.subtract(b, diff * (1 - gamma), out=result, where=gamma >= 0.5, casting="unsafe")
    return result


def params_from_counts(counts: Counts, dtype, config: NormalizeConfig):
    """`normalization_params` of an integer image of `dtype` from its `value_counts`."""
    if config.method == "dtype":
        c = len(counts)
        return np.zeros(c, np.float32), np.full(c, np.iinfo(dtype).max, np.float32)
    if config.method != "percentile":
        return np.zeros(len(counts), np.float32), np.ones(len(counts), np.float32)
    lo, hi = np.array(
        [percentiles_from_counts(v, n, [config.low, config.high]) for v, n in counts]
    ).T
    return _params(lo, hi)
