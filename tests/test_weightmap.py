"""Known-answer tests for the weight map of eq. 2, against a brute-force reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from biounet.weightmap import (
    border_weights,
    carve_borders,
    class_balance_weights,
    instances_from_binary,
    nearest_two_distances,
    touching_borders,
    weight_map,
)


def _disks(shape, disks, dtype=np.int32):
    """Instance image with disk ``(row, col, radius)`` number i labelled i + 1."""
    rows, cols = np.indices(shape)
    out = np.zeros(shape, dtype=dtype)
    for i, (r, c, rad) in enumerate(disks):
        out[(rows - r) ** 2 + (cols - c) ** 2 <= rad**2] = i + 1
    return out


def _brute_distances(instances, pixels):
    """Sorted distances from each of `pixels` (N, 2) to every object: (N, n_objects)."""
    ids = [i for i in np.unique(instances) if i != 0]
    per_object = []
    for i in ids:
        obj = np.argwhere(instances == i).astype(np.float64)
        diff = pixels[:, None, :].astype(np.float64) - obj[None, :, :]
        per_object.append(np.sqrt((diff**2).sum(-1)).min(axis=1))
    return np.sort(np.stack(per_object, axis=1), axis=1)


def _brute_border(instances, w0, sigma, where):
    """Eq. 2's border term pixel by pixel, from explicit distances to every object pixel."""
    out = np.zeros(instances.shape)
    pixels = np.argwhere(where)
    if len(np.unique(instances[instances != 0])) < 2 or not len(pixels):
        return out
    dist = _brute_distances(instances, pixels)
    total = dist[:, 0] + dist[:, 1]
    out[tuple(pixels.T)] = w0 * np.exp(-(total**2) / (2 * sigma**2))
    return out


def _random_scene(seed, shape=(48, 64)):
    rng = np.random.default_rng(seed)
    rows, cols = np.indices(shape)
    instances = np.zeros(shape, dtype=np.int32)
    ids = rng.choice(np.arange(1, 60000), size=6, replace=False)  # sparse, unordered ids
    for k, i in enumerate(ids):
        r, c = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        if k % 2:
            rad = rng.uniform(2, 8)
            instances[(rows - r) ** 2 + (cols - c) ** 2 <= rad**2] = i
        else:
            instances[r : r + rng.integers(1, 10), c : c + rng.integers(1, 14)] = i
    # A blob of scattered pixels: an object need not be convex or connected.
    scatter = rng.random(shape) < 0.01
    instances[scatter & (instances == 0)] = 60001
    return instances


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("w0, sigma", [(10.0, 5.0), (5.0, 2.0), (10.0, 30.0)])
def test_border_term_matches_brute_force(seed, w0, sigma):
    instances = _random_scene(seed)
    expected = _brute_border(instances, w0, sigma, instances == 0)
    got = border_weights(instances, w0=w0, sigma=sigma)
    assert got.dtype == np.float32 and got.shape == instances.shape
    assert np.abs(got - expected).max() < 1e-3
    assert expected.max() > 1.0  # the scenes do have objects close together


def test_border_term_with_custom_where_matches_brute_force():
    instances = _random_scene(7)
    where = np.zeros(instances.shape, dtype=bool)
    where[::3, :] = True  # object pixels included: d1 = 0 there
    expected = _brute_border(instances, 10.0, 5.0, where)
    got = border_weights(instances, where=where)
    assert np.abs(got - expected).max() < 1e-3
    assert (got[~where] == 0).all()


def test_nearest_two_distances_exact_within_max_distance():
    instances = _random_scene(3)
    pixels = np.argwhere(np.ones(instances.shape, dtype=bool))
    ref = _brute_distances(instances, pixels)[:, :2].reshape(*instances.shape, 2)
    d1, d2 = nearest_two_distances(instances)
    np.testing.assert_allclose(d1, ref[..., 0], atol=1e-12)
    np.testing.assert_allclose(d2, ref[..., 1], atol=1e-12)
    c1, c2 = nearest_two_distances(instances, max_distance=6.0)
    for near, exact in ((c1, ref[..., 0]), (c2, ref[..., 1])):
        close = exact <= 6.0
        np.testing.assert_allclose(near[close], exact[close], atol=1e-12)
        assert np.isinf(near[~close]).all()


@pytest.mark.parametrize("gap", [1, 2])
def test_border_term_peaks_in_gap_between_near_touching_disks(gap):
    # Disks of radius 10 on row 30; the gap columns lie strictly between them.
    left_edge = 15 + 10
    instances = _disks((61, 80), [(30, 15, 10), (30, left_edge + gap + 11, 10)])
    gap_cols = list(range(left_edge + 1, left_edge + 1 + gap))
    assert (instances[30, gap_cols] == 0).all()
    assert instances[30, left_edge] == 1 and instances[30, gap_cols[-1] + 1] == 2
    weights = border_weights(instances)
    row, col = np.unravel_index(np.argmax(weights), weights.shape)
    assert row == 30 and col in gap_cols
    # Nearest gap pixel: d1 + d2 = gap + 1 (one pixel to each disk edge, plus the gap).
    expected = 10.0 * math.exp(-((gap + 1) ** 2) / (2 * 5.0**2))
    assert abs(weights.max() - expected) < 1e-5
    assert weights.max() > 8.0  # close to w0
    assert (weights[instances > 0] == 0).all()
    # Far from the gap the term has decayed: the corners see d1 + d2 of tens of pixels.
    assert weights[0, 0] < 1e-3 and weights[60, 79] < 1e-3


@pytest.mark.parametrize(
    "instances",
    [
        np.zeros((20, 30), dtype=np.int32),
        _disks((20, 30), [(10, 10, 4)]),
        # Two separate components with the same id are still one object.
        np.where(_disks((20, 30), [(10, 5, 3), (10, 25, 3)]) > 0, 7, 0),
    ],
)
def test_border_term_zero_with_fewer_than_two_objects(instances):
    weights = border_weights(instances)
    assert weights.dtype == np.float32
    assert (weights == 0).all()


def test_class_balance_known_answer():
    classes = np.zeros((4, 8), dtype=np.int64)
    classes[:, 6:] = 1  # 24 pixels of class 0, 8 of class 1
    weights = class_balance_weights(classes, num_classes=2)
    assert weights.dtype == np.float32
    np.testing.assert_allclose(weights[classes == 0], 32 / (2 * 24))
    np.testing.assert_allclose(weights[classes == 1], 32 / (2 * 8))
    assert weights.mean() == pytest.approx(1.0)
    assert weights[0, 7] / weights[0, 0] == pytest.approx(24 / 8)


def test_class_balance_absent_classes_and_ignore():
    classes = np.full((10, 10), 2, dtype=np.int32)
    classes[:2] = 0  # 20 class 0, 70 class 2, class 1 absent, 10 ignored
    classes[-1] = -1
    weights = class_balance_weights(classes, num_classes=3)
    valid = classes >= 0
    assert weights[valid].mean() == pytest.approx(1.0)
    assert (weights[~valid] == 0).all()
    np.testing.assert_allclose(weights[classes == 0], 90 / (2 * 20))
    np.testing.assert_allclose(weights[classes == 2], 90 / (2 * 70))
    with pytest.raises(ValueError):
        class_balance_weights(classes, num_classes=2)
    assert (class_balance_weights(np.full((3, 3), -1), 2) == 0).all()


def test_weight_map_is_sum_and_zero_at_ignore():
    instances = _random_scene(5)
    classes = (instances > 0).astype(np.int64)
    classes[:3] = -1
    weights = weight_map(classes, instances, num_classes=2)
    expected = class_balance_weights(classes, 2) + border_weights(instances)
    expected[classes < 0] = 0
    assert weights.dtype == np.float32
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    assert (weights[:3] == 0).all()
    with pytest.raises(ValueError):
        weight_map(classes[:, :5], instances, 2)


def test_instances_from_binary_connectivity():
    mask = np.zeros((6, 6), dtype=bool)
    mask[1:3, 1:3] = True
    mask[3:5, 3:5] = True  # touches the first square only at a corner
    mask[0, 5] = True
    four = instances_from_binary(mask)
    eight = instances_from_binary(mask, connectivity=2)
    assert four.dtype == np.int32 and eight.dtype == np.int32
    assert four.max() == 3 and eight.max() == 2
    assert (four[~mask] == 0).all() and (four[mask] > 0).all()
    assert four[1, 1] != four[4, 4] and eight[1, 1] == eight[4, 4]


def test_touching_borders_of_two_squares():
    instances = np.zeros((12, 14), dtype=np.uint16)
    instances[2:8, 2:6] = 3
    instances[2:8, 6:10] = 5  # shares the boundary between columns 5 and 6
    instances[10:12, 12:14] = 9  # isolated
    touching = touching_borders(instances)
    expected = np.zeros_like(touching)
    expected[2:8, 5:7] = True
    np.testing.assert_array_equal(touching, expected)
    corner = np.zeros((4, 4), dtype=np.int32)
    corner[0:2, 0:2] = 1
    corner[2:4, 2:4] = 2
    assert touching_borders(corner).sum() == 2
    assert not touching_borders(corner, connectivity=1).any()


def test_carve_borders_separates_touching_objects():
    instances = np.zeros((12, 14), dtype=np.uint16)
    instances[2:8, 2:6] = 3
    instances[2:8, 6:10] = 5
    instances[10:12, 12:14] = 9
    before = instances.copy()
    carved = carve_borders(instances)
    np.testing.assert_array_equal(instances, before)  # input untouched
    assert carved.dtype == np.uint16
    assert set(np.unique(carved).tolist()) == {0, 3, 5, 9}
    assert (carved[2:8, 5:7] == 0).all()  # a two-pixel background gap
    np.testing.assert_array_equal(carved[2:8, 2:5], 3)
    np.testing.assert_array_equal(carved[2:8, 7:10], 5)
    np.testing.assert_array_equal(carved[9:, 11:], before[9:, 11:])
    assert not touching_borders(carved).any()
    # The gap survives relabelling the foreground, even with the 8-neighbourhood.
    relabelled = instances_from_binary(carved > 0, connectivity=2)
    assert relabelled.max() == 3


def test_many_objects_match_brute_force_on_sample():
    # The paper's PhC-U373 frame size with ~120 cells, many of them touching.
    rng = np.random.default_rng(20)
    disks = [(rng.integers(0, 520), rng.integers(0, 696), rng.uniform(6, 18)) for _ in range(120)]
    instances = carve_borders(_disks((520, 696), disks))
    assert len(np.unique(instances)) > 100
    weights = border_weights(instances)
    background = np.argwhere(instances == 0)
    near = background[weights[tuple(background.T)] > 0.5]
    pixels = np.concatenate(
        [
            background[rng.choice(len(background), 150, replace=False)],
            near[rng.choice(len(near), 150, replace=False)],
        ]
    )
    dist = _brute_distances(instances, pixels)
    expected = 10.0 * np.exp(-((dist[:, 0] + dist[:, 1]) ** 2) / (2 * 5.0**2))
    assert np.abs(weights[tuple(pixels.T)] - expected).max() < 1e-3


def test_input_validation():
    with pytest.raises(TypeError):
        border_weights(np.zeros((4, 4)))
    with pytest.raises(ValueError):
        border_weights(np.full((4, 4), -1))
    with pytest.raises(ValueError):
        border_weights(np.zeros((4, 4), dtype=np.int32), sigma=0.0)
    with pytest.raises(ValueError):
        border_weights(np.zeros((4, 4), dtype=np.int32), where=np.ones((3, 3), dtype=bool))
