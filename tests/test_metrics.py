"""Tests of biounet.metrics against hand-computed answers and scikit-image."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import adapted_rand_error
from skimage.segmentation import find_boundaries

from biounet import metrics as m

# --------------------------------------------------------------------------------------------
# fixtures


def two_cells(size: int = 32, col: int = 10) -> np.ndarray:
    """Membrane map: one vertical membrane at ``col`` splitting the image into two cells."""
    true = np.zeros((size, size), dtype=bool)
    true[:, col] = True
    return true


def voronoi_labels(shape: tuple[int, int], n: int, rng: np.random.Generator) -> np.ndarray:
    """Label image 1..n of the Voronoi cells of ``n`` random seeds."""
    seeds = np.zeros(shape, dtype=np.int64)
    seeds[rng.integers(0, shape[0], n), rng.integers(0, shape[1], n)] = np.arange(1, n + 1)
    _, (rows, cols) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    return seeds[rows, cols]


def strict_json(obj: object) -> str:
    return json.dumps(obj, allow_nan=False)


# --------------------------------------------------------------------------------------------
# membranes


@pytest.mark.parametrize("as_probability", [False, True])
def test_perfect_membrane_prediction(as_probability: bool) -> None:
    true = two_cells()
    true[20, :] = True  # four cells
    pred = np.where(true, 0.9, 0.05) if as_probability else true.copy()
    pe = m.pixel_error(pred, true)
    rs = m.rand_scores(pred, true)
    we = m.warping_error(pred, true)
    assert pe["pixel_error"] == 0.0
    assert pe["pixel_fscore_error"] == 0.0
    assert rs["rand_error"] == pytest.approx(0.0, abs=1e-12)
    assert rs["v_rand"] == pytest.approx(1.0)
    assert rs["v_info"] == pytest.approx(1.0)
    assert we["warping_error"] == 0.0
    assert we["n_flipped"] == 0
    for result in (pe, rs, we):
        strict_json(result)


def test_shifted_boundary_is_not_a_warping_error() -> None:
    true = two_cells(col=10)
    pred = two_cells(col=11)
    we = m.warping_error(pred, true)
    assert we["warping_error"] == 0.0
    assert we["n_flipped"] == 64  # the whole line moved by one pixel
    assert m.pixel_error(pred, true)["pixel_error"] == 64 / 1024
    np.testing.assert_array_equal(m.warp_truth(pred, true), pred)


def test_broken_membrane_merges_two_cells() -> None:
    true = two_cells(col=10)
    pred = true.copy()
    pred[14:17, 10] = False  # a 3-pixel gap joins the cells
    we = m.warping_error(pred, true)
    assert we["n_errors"] == 3  # the gap cannot be warped away
    assert we["warping_error"] == 3 / 1024
    rs = m.rand_scores(pred, true)
    left, right = 10 * 32, 21 * 32  # cell sizes
    assert rs["v_rand_split"] == 1.0
    assert rs["v_rand_merge"] == pytest.approx((left**2 + right**2) / (left + right) ** 2)
    assert rs["v_rand_merge"] < 1.0
    # One predicted segment carries no information about the two true ones.
    assert rs["v_info_merge"] == 0.0
    assert rs["v_info_split"] == 1.0


def test_spurious_membrane_splits_a_cell() -> None:
    true = two_cells(col=10)
    pred = true.copy()
    pred[16, 11:] = True  # cuts the right cell in two
    rs = m.rand_scores(pred, true)
    assert rs["v_rand_split"] < 1.0
    assert rs["v_rand_merge"] == 1.0
    assert rs["v_info_split"] < 1.0
    assert rs["v_info_merge"] == pytest.approx(1.0)
    we = m.warping_error(pred, true)
    assert we["warping_error"] > 0.0
    # The warp grows a spur along the cut but cannot close it: one pixel stays wrong.
    assert we["n_errors"] == 1


def test_threshold_sweep_picks_best_threshold() -> None:
    true = two_cells(col=10)
    prob = np.where(true, 1.0, 0.0)
    prob[14:17, 10] = 0.3  # weak membrane: closed only for thresholds <= 0.3
    prob[5, 20] = prob[25, 3] = 0.15  # interior noise: spurious membrane at threshold 0.1
    sweep = (0.1, 0.2, 0.5)
    rs = m.rand_scores(prob, true, thresholds=sweep)
    assert rs["rand_threshold"] == 0.2
    assert rs["v_rand"] == 1.0
    assert rs["info_threshold"] == 0.2
    pe = m.pixel_error(prob, true, thresholds=sweep)
    assert pe["fscore_threshold"] == 0.2
    assert pe["pixel_fscore"] == 1.0
    assert pe["pixel_error"] == 3 / 1024  # plain pixel error at the default 0.5
    # At 0.5 alone the gap merges the cells.
    assert m.rand_scores(prob, true, thresholds=[0.5])["v_rand_merge"] < 1.0


def test_pixel_fscore_counts_cell_interior_as_positive() -> None:
    true = two_cells(col=10)
    pred = np.zeros_like(true)  # no membrane predicted at all
    pe = m.pixel_error(pred, true)
    # TP = 992 interior pixels, FP = 32 membrane pixels called interior, FN = 0.
    assert pe["pixel_fscore"] == pytest.approx(2 * 992 / (2 * 992 + 32))
    assert pe["pixel_error"] == 32 / 1024


def test_rand_info_scores_hand_computed() -> None:
    # Prediction splits the only true segment: Rand split = (2^2 + 2^2) / 4^2.
    sc = m.rand_info_scores(np.array([1, 1, 2, 2]), np.array([1, 1, 1, 1]))
    assert sc["v_rand_split"] == 0.5
    assert sc["v_rand_merge"] == 1.0
    assert sc["v_rand"] == pytest.approx(2 / 3)
    assert sc["v_info_split"] == 0.0  # I = 0, H(S) = 1 bit
    assert sc["v_info_merge"] == 1.0  # 0/0: a single true segment cannot be merged

    # Predicted label 0 inside the true foreground is a singleton segment.
    sc = m.rand_info_scores(np.array([1, 1, 1, 0]), np.array([1, 1, 2, 2]))
    assert sc["v_rand_split"] == pytest.approx(6 / 8)  # sum p^2 = 4 + 1 + 1, sum t^2 = 8
    assert sc["v_rand_merge"] == pytest.approx(6 / 10)  # sum s^2 = 9 + 1
    h_t = 1.0
    h_s = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    h_t_given_s = 0.75 * -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    mutual = h_t - h_t_given_s
    assert sc["v_info_split"] == pytest.approx(mutual / h_s)
    assert sc["v_info_merge"] == pytest.approx(mutual / h_t)

    # True label 0 (membrane) is left out whatever is predicted there.
    sc = m.rand_info_scores(np.array([5, 5, 7, 7]), np.array([1, 1, 0, 0]))
    assert sc["v_rand"] == 1.0


@pytest.mark.parametrize("pred_has_boundaries", [False, True])
def test_v_rand_agrees_with_skimage(pred_has_boundaries: bool) -> None:
    rng = np.random.default_rng(3)
    cells = voronoi_labels((128, 128), 8, rng)
    true = np.where(find_boundaries(cells, mode="inner"), 0, cells)
    pred = voronoi_labels((128, 128), 10, rng)
    if pred_has_boundaries:
        pred = np.where(find_boundaries(pred, mode="inner"), 0, pred)
    ours = m.rand_info_scores(pred, true)
    # skimage treats test label 0 as one segment; ISBI makes each such pixel its own.
    singles = pred == 0
    pred_sk = pred.copy()
    pred_sk[singles] = pred.max() + 1 + np.arange(np.count_nonzero(singles))
    are, _, _ = adapted_rand_error(true, pred_sk)
    # skimage counts pixel pairs (n^2 - n), ISBI uses n^2: equal up to O(1 / segment size).
    assert ours["v_rand"] == pytest.approx(1.0 - are, abs=1e-3)
    assert 0.0 < ours["v_rand"] < 1.0


def test_warp_preserves_topology_and_bounds_pixel_error() -> None:
    rng = np.random.default_rng(5)
    true = find_boundaries(voronoi_labels((48, 48), 6, rng), mode="inner")
    prob = np.clip(
        ndimage.gaussian_filter(true * 1.0, 1.0) * 2 + 0.3 * rng.random(true.shape), 0, 1
    )
    warped = m.warp_truth(prob, true)

    def topology(img: np.ndarray) -> tuple[int, int]:
        padded = np.pad(img, 1, constant_values=True)  # outside counts as membrane
        return (
            ndimage.label(padded, np.ones((3, 3)))[1],
            ndimage.label(~padded, ndimage.generate_binary_structure(2, 1))[1],
        )

    assert topology(warped) == topology(true)
    we = m.warping_error(prob, true)
    assert we["n_flipped"] > 0
    assert we["warping_error"] <= m.pixel_error(prob, true)["pixel_error"]


def test_simple_point_table_preserves_topology() -> None:
    # Flipping any pixel the table calls simple keeps the numbers of 8-connected membrane
    # and 4-connected interior components (outside = membrane, as in the warp).
    rng = np.random.default_rng(0)
    eight, four = np.ones((3, 3)), ndimage.generate_binary_structure(2, 1)

    def counts(img: np.ndarray) -> tuple[int, int]:
        pad = np.pad(img, 1, constant_values=True)
        return ndimage.label(pad, eight)[1], ndimage.label(~pad, four)[1]

    weights = 1 << np.arange(8)
    n_simple = 0
    for _ in range(60):
        img = rng.random((7, 7)) < 0.5
        pad = np.pad(img, 1, constant_values=True).astype(np.int64)
        before = counts(img)
        for r in range(7):
            for c in range(7):
                ring = [pad[r + 1 + dr, c + 1 + dc] for dr, dc in m._RING]
                if m._SIMPLE[int(np.dot(ring, weights))]:
                    n_simple += 1
                    flipped = img.copy()
                    flipped[r, c] = not flipped[r, c]
                    assert counts(flipped) == before
    assert n_simple > 100
    assert not m._SIMPLE[0]  # isolated membrane pixel
    assert not m._SIMPLE[255]  # pixel inside solid membrane (flip would create a hole)


def test_membrane_input_validation() -> None:
    true = two_cells()
    with pytest.raises(ValueError, match="labels == 0"):
        m.rand_scores(true, np.where(true, 0, 255))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m.pixel_error(true * 255, true)
    with pytest.raises(ValueError, match="shape"):
        m.warping_error(true[:-1], true)
    with pytest.raises(ValueError, match="foreground"):
        m.rand_info_scores(np.ones((4, 4), int), np.zeros((4, 4), int))


# --------------------------------------------------------------------------------------------
# semantic


def test_iou_dice_hand_computed() -> None:
    true = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    pred = np.array([0, 0, 1, 1, 1, 1, 2, 0])
    r = m.iou_dice(pred, true, num_classes=4)
    assert r["tp"] == [2, 3, 1, 0]
    assert r["fp"] == [1, 1, 0, 0]
    assert r["fn"] == [1, 0, 1, 0]
    assert r["iou"] == pytest.approx([2 / 4, 3 / 4, 1 / 2, None])
    assert r["iou"][3] is None  # class 3 absent from both
    assert r["dice"][:3] == pytest.approx([4 / 6, 6 / 7, 2 / 3])
    assert r["mean_iou"] == pytest.approx((0.5 + 0.75 + 0.5) / 3)
    assert r["mean_dice"] == pytest.approx((4 / 6 + 6 / 7 + 2 / 3) / 3)
    strict_json(r)


def test_iou_dice_perfect_and_ignore() -> None:
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 3, (16, 16))
    r = m.iou_dice(classes, classes, 3)
    assert r["iou"] == [1.0, 1.0, 1.0]
    assert r["dice"] == [1.0, 1.0, 1.0]
    true = classes.copy()
    true[0, :] = -1  # ignored, whatever is predicted there
    pred = classes.copy()
    pred[0, :] = (classes[0, :] + 1) % 3
    assert m.iou_dice(pred, true, 3)["mean_iou"] == 1.0
    with pytest.raises(ValueError, match="class values"):
        m.iou_dice(classes + 1, classes, 3)


# --------------------------------------------------------------------------------------------
# instances


def hand_case() -> tuple[np.ndarray, np.ndarray]:
    """True: three 4x4 squares. Pred: one exact, one 4x3 inside a square (IoU 0.75), one FP."""
    true = np.zeros((10, 10), dtype=np.int32)
    true[0:4, 0:4] = 1
    true[0:4, 6:10] = 2
    true[6:10, 0:4] = 3
    pred = np.zeros_like(true)
    pred[0:4, 0:4] = 10
    pred[0:4, 6:9] = 20
    pred[6:10, 6:10] = 30
    return pred, true


def test_instance_hand_computed() -> None:
    pred, true = hand_case()
    r = m.instance_scores(pred, true)
    assert r["thresholds"] == pytest.approx([0.5 + 0.05 * i for i in range(10)])
    # IoUs are 1.0 and 0.75: two matches up to 0.75 inclusive, one above.
    assert r["tp"] == [2] * 6 + [1] * 4
    assert r["fp"] == [1] * 6 + [2] * 4
    assert r["fn"] == [1] * 6 + [2] * 4
    assert r["precision"][0] == pytest.approx(2 / 3)
    assert r["recall"][0] == pytest.approx(2 / 3)
    assert r["f1"][0] == pytest.approx(2 / 3)
    assert r["ap"][0] == pytest.approx(2 / 4)
    assert r["ap"][-1] == pytest.approx(1 / 5)
    assert r["mean_ap"] == pytest.approx((6 * 0.5 + 4 * 0.2) / 10)
    assert (r["n_true"], r["n_pred"], r["merges"], r["splits"]) == (3, 3, 0, 0)
    assert r["seg"] == pytest.approx((1.0 + 0.75 + 0.0) / 3)
    strict_json(r)


def test_instance_perfect_with_arbitrary_ids() -> None:
    _, true = hand_case()
    pred = np.where(true > 0, true * 1000 + 7, 0)
    r = m.instance_scores(pred, true)
    assert r["ap"] == [1.0] * 10
    assert r["f1"] == [1.0] * 10
    assert r["seg"] == 1.0
    assert r["merges"] == r["splits"] == 0


def test_merge_of_two_true_objects() -> None:
    true = np.zeros((6, 10), dtype=np.int32)
    true[1:5, 1:5] = 1
    true[1:5, 5:9] = 2
    pred = (true > 0).astype(np.int32)  # one object over both
    r = m.instance_scores(pred, true)
    assert r["merges"] == 1
    assert r["splits"] == 0
    # IoU is exactly 0.5 with both true objects; one-to-one matching takes only one.
    assert (r["tp"][0], r["fp"][0], r["fn"][0]) == (1, 0, 1)
    assert r["tp"][1:] == [0] * 9
    assert r["seg"] == pytest.approx(0.5)  # each true object: Jaccard 16 / 32


def test_split_of_a_true_object() -> None:
    true = np.zeros((6, 10), dtype=np.int32)
    true[1:5, 1:9] = 1
    pred = np.zeros_like(true)
    pred[1:5, 1:5] = 1
    pred[1:5, 5:9] = 2
    r = m.instance_scores(pred, true)
    assert r["splits"] == 1
    assert r["merges"] == 0
    assert r["seg"] == 0.0  # each half covers exactly, not more than, half
    assert (r["tp"][0], r["fp"][0], r["fn"][0]) == (1, 1, 0)


def test_sliver_below_ten_percent_is_not_a_split() -> None:
    true = np.zeros((12, 12), dtype=np.int32)
    true[1:11, 1:11] = 1  # 100 pixels
    pred = np.zeros_like(true)
    pred[1:7, 1:11] = 1  # 60 % of it
    pred[7, 1:10] = 2  # 9 %
    assert m.instance_scores(pred, true)["splits"] == 0
    pred[7, 10] = 2  # 10 %: now a split
    assert m.instance_scores(pred, true)["splits"] == 1


def test_empty_images() -> None:
    empty = np.zeros((8, 8), dtype=np.int32)
    one = empty.copy()
    one[2:5, 2:5] = 1
    r = m.instance_scores(empty, empty)
    assert r["precision"] == r["recall"] == r["f1"] == r["ap"] == [1.0] * 10
    assert r["seg"] == 1.0
    r = m.instance_scores(one, empty)  # only a false positive
    assert (r["precision"][0], r["recall"][0], r["f1"][0], r["ap"][0]) == (0.0, 1.0, 0.0, 0.0)
    r = m.instance_scores(empty, one)  # only a miss
    assert (r["precision"][0], r["recall"][0], r["f1"][0], r["ap"][0]) == (1.0, 0.0, 0.0, 0.0)
    assert r["seg"] == 0.0
    strict_json(r)


def test_pooling_sums_counts() -> None:
    pred_a, true_a = hand_case()
    true_b = np.zeros((6, 6), dtype=np.int32)
    true_b[1:5, 1:5] = 1
    pred_b = true_b.copy()  # perfect, one object
    ra, rb = m.instance_scores(pred_a, true_a), m.instance_scores(pred_b, true_b)
    pooled = m.pool_instance_scores([ra, rb])
    assert pooled["tp"][0] == 3 and pooled["fp"][0] == 1 and pooled["fn"][0] == 1
    assert pooled["ap"][0] == pytest.approx(3 / 5)  # not the mean of 2/4 and 1
    assert pooled["precision"][-1] == pytest.approx(2 / 4)
    assert pooled["seg"] == pytest.approx((1.0 + 0.75 + 0.0 + 1.0) / 4)
    assert (pooled["n_true"], pooled["n_pred"], pooled["n_images"]) == (4, 4, 2)
    assert pooled["mean_ap"] == pytest.approx(np.mean(pooled["ap"]))
    strict_json(pooled)
    with pytest.raises(ValueError, match="thresholds"):
        m.pool_instance_scores([ra, m.instance_scores(pred_b, true_b, thresholds=[0.5])])


def test_instance_scores_on_a_large_image() -> None:
    rng = np.random.default_rng(2)
    shape = (520, 696)
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    true = np.zeros(shape, dtype=np.int32)
    pred = np.zeros(shape, dtype=np.int32)
    centres = rng.uniform((20, 20), (shape[0] - 20, shape[1] - 20), size=(120, 2))
    for k, (y, x) in enumerate(centres, start=1):
        true[(rows - y) ** 2 + (cols - x) ** 2 < 100] = k
        pred[(rows - y - 1) ** 2 + (cols - x) ** 2 < 110] = 3 * k + 11
    r = m.instance_scores(pred, true)
    assert r["n_true"] > 100
    assert r["tp"][0] > 90
