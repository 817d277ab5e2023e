"""Pixel-wise loss weights of the U-Net paper (Ronneberger et al. 2015, eq. 2).

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

``w_c`` balances the class frequencies; the second, *border* term makes the network learn the
thin background gaps between touching cells. ``d1`` and ``d2`` are the Euclidean distances
(between pixel centres) to the nearest and the second-nearest object. The paper uses
``w0 = 10`` and ``sigma ~ 5`` pixels.

Touching objects are first separated by a background gap (`carve_borders`), as in the paper's
ground truth, so that the gap pixels are the ones that receive the large border weight.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = [
    "border_weights",
    "carve_borders",
    "class_balance_weights",
    "instances_from_binary",
    "nearest_two_distances",
    "touching_borders",
    "weight_map",
]


def class_balance_weights(classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Class-frequency balancing weights ``w_c``.

    ``w_c = N / (K_present * n_c)`` for a pixel of class ``c``, where ``n_c`` counts the pixels
    of class ``c``, ``N`` the non-ignored pixels and ``K_present`` the classes that occur. The
    mean over the non-ignored pixels is therefore exactly 1, each present class contributes the
    same total weight, and classes absent from the image play no part.

    Parameters
    ----------
    classes : ndarray of int, shape (H, W)
        Class index per pixel in ``[0, num_classes)``; negative values mean "ignore".
    num_classes : int
        Number of classes K.

    Returns
    -------
    ndarray of float32, shape (H, W)
        0 at ignored pixels.
    """
    classes = _as_int_image(classes, "classes")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if classes.size and classes.max() >= num_classes:
        raise ValueError(f"class values must be < num_classes={num_classes}")
    valid = classes >= 0
    counts = np.bincount(classes[valid], minlength=num_classes).astype(np.float64)
    present = counts > 0
    per_class = np.zeros(num_classes, dtype=np.float64)
    per_class[present] = counts.sum() / (present.sum() * counts[present])
    weights = np.zeros(classes.shape, dtype=np.float32)
    weights[valid] = per_class[classes[valid]]
    return weights


def nearest_two_distances(
    instances: np.ndarray, max_distance: float = math.inf
) -> tuple[np.ndarray, np.ndarray]:
    """Distances to the nearest and second-nearest object, exact up to `max_distance`.

    Each object's Euclidean distance transform is computed only inside its bounding box grown
    by `max_distance`: every pixel outside that window is farther than `max_distance` from
    the object, and inside it the transform is exact because the window holds the whole
    object. The cost thus scales with the objects' neighbourhoods, not objects x image size.

    Parameters
    ----------
    instances : ndarray of int, shape (H, W)
        Object id per pixel, 0 for background; ids need not be consecutive. All pixels of an id
        form one object, connected or not.
    max_distance : float
        Distances larger than this are reported as ``inf``.

    Returns
    -------
    d1, d2 : ndarray of float64, shape (H, W)
        Distance to the nearest and second-nearest object (0 inside an object for ``d1``);
        ``inf`` where that object is farther than `max_distance` or does not exist.
    """
    labels = _as_int_image(instances, "instances")
    if labels.size and labels.min() < 0:
        raise ValueError("instance ids must be >= 0 (0 is background)")
    d1 = np.full(labels.shape, np.inf)
    d2 = np.full(labels.shape, np.inf)
    if not labels.size or labels.max() == 0:
        return d1, d2
    if labels.max() > labels.size:
        # Sparse, huge ids would make find_objects' list huge: renumber 1..n first.
        uniques, inverse = np.unique(labels, return_inverse=True)
        labels = inverse.reshape(labels.shape) + (0 if uniques[0] == 0 else 1)
    n_rows, n_cols = labels.shape
    pad = n_rows + n_cols if math.isinf(max_distance) else math.ceil(max_distance)
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        rows = slice(max(box[0].start - pad, 0), min(box[0].stop + pad, n_rows))
        cols = slice(max(box[1].start - pad, 0), min(box[1].stop + pad, n_cols))
        dist = ndimage.distance_transform_edt(labels[rows, cols] != label)
        dist[dist > max_distance] = np.inf
        near, second = d1[rows, cols], d2[rows, cols]
        # Running two smallest: the new value displaces the old nearest into second place.
        second[...] = np.minimum(second, np.maximum(near, dist))
        near[...] = np.minimum(near, dist)
    return d1, d2


def border_weights(
    instances: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    where: np.ndarray | None = None,
    tol: float = 1e-4,
) -> np.ndarray:
    """The border term ``w0 * exp(-(d1 + d2)^2 / (2 sigma^2))`` of eq. 2.

    Since ``d1 <= d2``, the term exceeds `tol` only where both distances are at most the
    cutoff ``sigma * sqrt(2 ln(w0 / tol))`` (24 px for the defaults), so distances are computed
    only up to it (`nearest_two_distances`) and the term is set to 0 beyond: the result is
    within `tol` of the exact formula everywhere.

    Parameters
    ----------
    instances : ndarray of int, shape (H, W)
        Object id per pixel, 0 for background. Touching objects should be separated first
        (`carve_borders`).
    w0 : float
        Peak weight, >= 0.
    sigma : float
        Width in pixels, > 0.
    where : ndarray of bool, shape (H, W), optional
        Pixels that receive the term; default ``instances == 0``, the pixels between objects.
    tol : float
        Largest value of the term that may be dropped, > 0.

    Returns
    -------
    ndarray of float32, shape (H, W)
        0 outside `where`, and everywhere when there are fewer than two objects.
    """
    labels = _as_int_image(instances, "instances")
    if not w0 >= 0:
        raise ValueError(f"w0 must be >= 0, got {w0}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if where is None:
        where = labels == 0
    else:
        where = np.asarray(where, dtype=bool)
        if where.shape != labels.shape:
            raise ValueError(f"where has shape {where.shape}, instances {labels.shape}")
    weights = np.zeros(labels.shape, dtype=np.float32)
    if w0 <= tol:
        return weights
    cutoff = sigma * math.sqrt(2.0 * math.log(w0 / tol))
    d1, d2 = nearest_two_distances(labels, cutoff)
    active = where & np.isfinite(d2)
    total = d1[active] + d2[active]
    weights[active] = w0 * np.exp(-(total**2) / (2.0 * sigma**2))
    return weights


def weight_map(
    classes: np.ndarray,
    instances: np.ndarray,
    num_classes: int,
    w0: float = 10.0,
    sigma: float = 5.0,
    where: np.ndarray | None = None,
    class_balance: bool = True,
) -> np.ndarray:
    """The full weight map of eq. 2: `class_balance_weights` plus `border_weights`.

    Parameters
    ----------
    classes : ndarray of int, shape (H, W)
        Class per pixel in ``[0, num_classes)``, negative for "ignore".
    instances : ndarray of int, shape (H, W)
        Object id per pixel, 0 for background.
    num_classes : int
    w0, sigma : float
        Border-term peak and width (paper: 10 and 5 px); ``w0 = 0`` leaves the term out.
    where : ndarray of bool, shape (H, W), optional
        Pixels that receive the border term; default ``instances == 0``.
    class_balance : bool
        False: w_c = 1 everywhere (no class-frequency balance).

    Returns
    -------
    ndarray of float32, shape (H, W)
        0 at ignored pixels, so they drop out of a weighted loss.
    """
    classes = _as_int_image(classes, "classes")
    instances = _as_int_image(instances, "instances")
    if classes.shape != instances.shape:
        raise ValueError(f"classes {classes.shape} and instances {instances.shape} differ")
    if class_balance:
        weights = class_balance_weights(classes, num_classes)
    else:
        weights = np.ones(classes.shape, np.float32)
    if w0 > 0:
        weights += border_weights(instances, w0, sigma, where)
    weights[classes < 0] = 0.0
    return weights.astype(np.float32, copy=False)


def instances_from_binary(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """Label the connected components of a foreground mask.

    Parameters
    ----------
    mask : ndarray, shape (H, W)
        Foreground where nonzero.
    connectivity : int
        1: 4-neighbourhood (pixels touching only at a corner are separate objects, which keeps
        cells that meet diagonally apart); 2: 8-neighbourhood.

    Returns
    -------
    ndarray of int32, shape (H, W)
        0 for background, objects numbered 1..n in raster order.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    if connectivity not in (1, 2):
        raise ValueError(f"connectivity must be 1 or 2, got {connectivity}")
    structure = ndimage.generate_binary_structure(2, connectivity)
    labels, _ = ndimage.label(mask != 0, structure=structure)
    return labels.astype(np.int32, copy=False)


def touching_borders(instances: np.ndarray, connectivity: int = 2) -> np.ndarray:
    """Object pixels that touch a pixel of a different object.

    Parameters
    ----------
    instances : ndarray of int, shape (H, W)
        Object id per pixel, 0 for background.
    connectivity : int
        2 (default): 8-neighbourhood, so corner contacts count too and, once these pixels are
        removed, no two objects touch even diagonally; 1: 4-neighbourhood.

    Returns
    -------
    ndarray of bool, shape (H, W)
    """
    labels = _as_int_image(instances, "instances")
    if connectivity not in (1, 2):
        raise ValueError(f"connectivity must be 1 or 2, got {connectivity}")
    n_rows, n_cols = labels.shape
    offsets = [(0, 1), (1, 0)] + ([(1, 1), (1, -1)] if connectivity == 2 else [])
    touching = np.zeros(labels.shape, dtype=bool)
    # Each neighbour relation is symmetric, so half the neighbourhood covers all pairs.
    for dr, dc in offsets:
        rows_a, rows_b = slice(0, n_rows - dr), slice(dr, n_rows)
        if dc >= 0:
            cols_a, cols_b = slice(0, n_cols - dc), slice(dc, n_cols)
        else:
            cols_a, cols_b = slice(-dc, n_cols), slice(0, n_cols + dc)
        a, b = labels[rows_a, cols_a], labels[rows_b, cols_b]
        contact = (a != b) & (a > 0) & (b > 0)
        touching[rows_a, cols_a] |= contact
        touching[rows_b, cols_b] |= contact
    return touching


def carve_borders(instances: np.ndarray, connectivity: int = 2) -> np.ndarray:
    """Separate touching objects by setting their contact pixels to background.

    Both sides of a contact are removed (`touching_borders`), so touching objects end up with a
    background gap of about two pixels; objects that touch nothing are unchanged. Very thin
    objects can lose all their pixels.

    Parameters
    ----------
    instances : ndarray of int, shape (H, W)
        Object id per pixel, 0 for background.
    connectivity : int
        Neighbourhood of `touching_borders`; the default 2 leaves no diagonal contact either.

    Returns
    -------
    ndarray, shape (H, W), same dtype as `instances`
        A new array; the remaining pixels keep their ids.
    """
    labels = _as_int_image(instances, "instances")
    carved = labels.copy()
    carved[touching_borders(labels, connectivity)] = 0
    return carved


def _as_int_image(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must have an integer dtype, got {array.dtype}")
    return array
