"""Warping error of membrane maps (Jain et al. 2010), the topological ISBI 2012 score.

Jain et al. (2010), "Boundary learning by optimization with topological constraints" (CVPR):
the true membrane map is warped towards the prediction by flipping *simple points* only
(pixels whose flip changes no topology), and what disagreement remains is topological error.
Membrane is the 8-connected foreground and cell interior the 4-connected background, which
matches the 4-connected cells of the Rand scores in `biounet.metrics_membranes`. Membrane maps
follow that module's convention (True = membrane; float predictions are membrane
probabilities).

The simple-point test (a 256-entry lookup table) and the greedy warp are hand-written: no
installed library has them with this topology.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike, NDArray

from biounet.metrics_common import _pred_membrane, _true_membrane

__all__ = ["warp_truth", "warping_error"]

# The 8 neighbours of a pixel, bit k of a neighbourhood code is neighbour k (1 = membrane).
_RING = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))


def _ring_components(
    members: list[int], adjacent: Callable[[tuple[int, int], tuple[int, int]], bool]
) -> list[set[int]]:
    """Connected components of ring positions ``members`` under the relation ``adjacent``."""
    left, comps = set(members), []
    while left:
        stack = [left.pop()]
        comp = set(stack)
        while stack:
            k = stack.pop()
            for m in [m for m in left if adjacent(_RING[k], _RING[m])]:
                left.discard(m)
                comp.add(m)
                stack.append(m)
        comps.append(comp)
    return comps


def _simple_point_table() -> NDArray[np.bool_]:
    """Simple-point lookup over the 256 neighbourhood configurations, (8, 4) topology.

    A pixel is simple (flipping it changes no topology) when its membrane neighbours form
    exactly one 8-connected component and its interior neighbours exactly one 4-connected
    component 4-adjacent to it (the local characterisation of digital topology, e.g. Bertrand
    and Malandain 1994). The centre itself is excluded, so the test holds for both flips.
    """

    def adj8(a: tuple[int, int], b: tuple[int, int]) -> bool:
        return max(abs(a[0] - b[0]), abs(a[1] - b[1])) == 1

    def adj4(a: tuple[int, int], b: tuple[int, int]) -> bool:
        return abs(a[0] - b[0]) + abs(a[1] - b[1]) == 1

    table = np.zeros(256, dtype=bool)
    for code in range(256):
        fg = [k for k in range(8) if code >> k & 1]
        bg = [k for k in range(8) if not code >> k & 1]
        n_fg = len(_ring_components(fg, adj8))
        n_bg = sum(
            any(0 in _RING[k] for k in comp)  # contains a 4-neighbour of the centre
            for comp in _ring_components(bg, adj4)
        )
        table[code] = n_fg == 1 and n_bg == 1
    return table


_SIMPLE = _simple_point_table()


def _flip_simple_points(
    cells: bytearray, mismatch: bytearray, priority: list[float], stride: int
) -> None:
    """Run the greedy warp in place on flat padded buffers of row length ``stride``.

    ``cells`` is the warped truth (1 = membrane), ``mismatch`` marks where it disagrees with
    the target and ``priority`` is the confidence of each pixel's flip. Python lists and
    bytearrays, not numpy, because the loop touches one pixel at a time.
    """
    waiting = bytearray(len(mismatch))  # 1 = disagreeing but not simple when last checked
    offsets = [dr * stride + dc for dr, dc in _RING]
    simple = _SIMPLE.tolist()

    start = np.flatnonzero(np.frombuffer(bytes(mismatch), dtype=np.uint8))
    heap = [(-priority[i], i) for i in start.tolist()]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        code = 0
        for k, off in enumerate(offsets):
            code |= cells[i + off] << k
        if not simple[code]:
            waiting[i] = 1
            continue
        cells[i] ^= 1
        mismatch[i] = 0
        # A flip can make a waiting neighbour simple: queue it again.
        for off in offsets:
            j = i + off
            if waiting[j] and mismatch[j]:
                waiting[j] = 0
                heapq.heappush(heap, (-priority[j], j))


def warp_truth(
    pred_membrane: ArrayLike, true_membrane: ArrayLike, *, threshold: float = 0.5
) -> NDArray[np.bool_]:
    """Warp the true membrane map towards a prediction by flipping simple points only.

    Greedy algorithm of Jain et al. (2010): among the pixels where the warped truth disagrees
    with the binarised prediction and whose flip is topology-preserving (simple point; membrane
    8-connected, interior 4-connected), flip the one the prediction is most confident about,
    ``|pred - truth|``, ties in raster order; repeat until no disagreeing pixel is simple.
    Pixels outside the image count as membrane, so no warp can join two cells around the
    image border. A priority queue holds the candidates; a pixel found non-simple is queued
    again when one of its 8 neighbours flips.

    Parameters
    ----------
    pred_membrane : ndarray of bool, shape (H, W), or of float in [0, 1]
        Predicted membrane map or membrane probability (True / 1 = membrane).
    true_membrane : ndarray of bool or 0/1, shape (H, W)
        Ground truth, True = membrane.
    threshold : float
        Membrane where ``pred >= threshold``.

    Returns
    -------
    ndarray of bool, shape (H, W)
        The warped truth: same topology as ``true_membrane``, True = membrane.
    """
    true = _true_membrane(true_membrane)
    prob, _ = _pred_membrane(pred_membrane, true.shape)
    h, w = true.shape

    # Work on flat padded buffers: the 1-pixel frame needs no bounds checks and is membrane.
    grid = np.pad(true, 1, constant_values=True).astype(np.uint8).ravel()
    target = np.pad(prob >= threshold, 1, constant_values=True).ravel()
    priority = np.pad(np.abs(prob - true), 1).ravel().tolist()
    mismatch = bytearray((grid != target).astype(np.uint8).tobytes())
    cells = bytearray(grid.tobytes())
    _flip_simple_points(cells, mismatch, priority, w + 2)
    warped = np.frombuffer(bytes(cells), dtype=np.uint8).reshape(h + 2, w + 2)
    return warped[1:-1, 1:-1].astype(bool)


def warping_error(
    pred_membrane: ArrayLike, true_membrane: ArrayLike, *, threshold: float = 0.5
) -> dict[str, float | int]:
    """Warping error of Jain et al. (2010): pixel disagreement left after `warp_truth`.

    Topology-preserving disagreements (a boundary drawn a pixel off) are warped away; what
    remains are topological errors such as a gap that merges two cells or a spurious membrane
    that splits one. The warp is greedy, so this is an upper bound on the minimum over warps.

    Parameters
    ----------
    pred_membrane : ndarray of bool, shape (H, W), or of float in [0, 1]
        Predicted membrane map or membrane probability (True / 1 = membrane).
    true_membrane : ndarray of bool or 0/1, shape (H, W)
        Ground truth, True = membrane.
    threshold : float
        Membrane where ``pred >= threshold``.

    Returns
    -------
    dict
        ``warping_error`` (float): fraction of pixels where the warped truth and the binarised
        prediction disagree; ``n_errors`` (int): their count; ``n_flipped`` (int): pixels the
        warp changed; ``threshold`` (float).
    """
    true = _true_membrane(true_membrane)
    prob, _ = _pred_membrane(pred_membrane, true.shape)
    warped = warp_truth(prob, true, threshold=threshold)
    n_errors = int(np.count_nonzero(warped != (prob >= threshold)))
    return {
        "warping_error": n_errors / true.size,
        "n_errors": n_errors,
        "n_flipped": int(np.count_nonzero(warped != true)),
        "threshold": float(threshold),
    }
