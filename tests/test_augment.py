"""Known-answer tests for the coordinate-map augmentation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from biounet.augment import (
    AugmentConfig,
    adjust_gray,
    center_crop,
    elastic_displacement,
    identity_coordinates,
    sample_coordinates,
    warp,
)

ONLY_ELASTIC = AugmentConfig(rotate=False, flip=False, gray=False)


def _pattern(shape=(96, 120)):
    """Bright disks and rectangles on a dark background, and the matching uint16 instances."""
    rows, cols = np.indices(shape)
    instances = np.zeros(shape, dtype=np.uint16)
    disks = [(20, 25, 11), (60, 40, 15), (35, 90, 9), (80, 100, 12)]
    for i, (r, c, rad) in enumerate(disks):
        instances[(rows - r) ** 2 + (cols - c) ** 2 <= rad**2] = 1000 + 7 * i
    instances[5:15, 50:75] = 2001
    instances[50:58, 70:110] = 2002
    image = np.where(instances > 0, 0.9, 0.1).astype(np.float32)
    return image, instances


def test_identity_coordinates_convention():
    coords = identity_coordinates((4, 5), (10, 20))
    assert coords.shape == (2, 4, 5) and coords.dtype == np.float64
    np.testing.assert_array_equal(coords[0, :, 0], [8, 9, 10, 11])
    np.testing.assert_array_equal(coords[1, 0, :], [18, 19, 20, 21, 22])
    assert tuple(coords[:, 2, 2]) == (10, 20)  # tile pixel (h // 2, w // 2) sits on the centre


@pytest.mark.parametrize("tile, out", [((92, 92), (4, 4)), ((21, 30), (5, 10)), ((7, 8), (7, 8))])
def test_center_crop_of_input_map_is_target_map(tile, out):
    coords = identity_coordinates(tile, (50, 60))
    np.testing.assert_array_equal(center_crop(coords, out), identity_coordinates(out, (50, 60)))


@pytest.mark.parametrize(
    "config",
    [
        AugmentConfig.off(),
        AugmentConfig(elastic_std=0.0, rotate=False, flip=False),
        AugmentConfig(elastic=False, rotate=False, flip=False, max_shift=0.0),
    ],
)
def test_no_geometric_augmentation_gives_identity(config):
    rng = np.random.default_rng(0)
    for shape, center in [((33, 40), (17, 25)), ((64, 64), (0, 0)), ((10, 11), (5.5, 2.25))]:
        np.testing.assert_array_equal(
            sample_coordinates(shape, center, rng, config), identity_coordinates(shape, center)
        )


@pytest.mark.parametrize("order", [0, 1, 3, 5])
def test_identity_warp_is_exact_crop(order):
    image, instances = _pattern()
    image = image + np.random.default_rng(1).random(image.shape, dtype=np.float32)
    stack = np.stack([image, 2 * image])
    coords = sample_coordinates((40, 50), (48, 60), np.random.default_rng(2), AugmentConfig.off())
    crop = (slice(28, 68), slice(35, 85))
    np.testing.assert_array_equal(warp(image, coords, order), image[crop])
    np.testing.assert_array_equal(warp(stack, coords, order), stack[:, crop[0], crop[1]])
    out = warp(instances, coords, 0)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, instances[crop])


def test_mirror_extrapolation_matches_numpy_reflect_pad():
    image = np.random.default_rng(3).random((30, 40))
    coords = identity_coordinates((50, 70), (5, 38))  # rows -20..29, cols 3..72
    padded = np.pad(image, 40, mode="reflect")  # numpy "reflect" == scipy "mirror"
    expected = padded[40 - 20 : 40 + 30, 40 + 3 : 40 + 73]
    for order in (0, 1, 3):
        np.testing.assert_array_equal(warp(image, coords, order), expected)


@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize("center", [(150, 200), (5, 390)])
def test_windowed_warp_matches_whole_image_interpolation(order, center):
    image = np.random.default_rng(4).random((300, 400))
    coords = sample_coordinates((64, 64), center, np.random.default_rng(5))
    expected = ndimage.map_coordinates(image, coords, order=order, mode="mirror")
    np.testing.assert_allclose(warp(image, coords, order), expected, rtol=0, atol=1e-12)


def test_elastic_control_point_statistics():
    # Tile 101 x 101 with a 3 x 3 grid puts the control points on pixels 0, 50 and 100.
    rng = np.random.default_rng(6)
    identity = identity_coordinates((101, 101), (50, 50))
    samples = []
    for _ in range(400):
        coords = sample_coordinates((101, 101), (50, 50), rng, ONLY_ELASTIC)
        samples.append((coords - identity)[:, ::50, ::50])
    samples = np.stack(samples)
    assert samples.shape == (400, 2, 3, 3)
    # 7200 draws: the standard error of the std is ~0.08 px, of the mean ~0.12 px.
    assert abs(samples.std() - 10.0) < 0.5
    assert abs(samples.mean()) < 0.5
    # Independent draws: no correlation between neighbouring control points or the two axes.
    flat = samples.reshape(400, -1)
    corr = np.corrcoef(flat, rowvar=False)
    assert np.abs(corr - np.eye(18)).max() < 0.2


def test_elastic_field_passes_through_control_values():
    field = elastic_displacement((41, 61), np.random.default_rng(7), grid=5, std=3.0)
    control = np.random.default_rng(7).normal(0.0, 3.0, size=(2, 5, 5))
    np.testing.assert_allclose(field[:, ::10, ::15], control, atol=1e-12)


def test_elastic_field_is_smooth():
    rng = np.random.default_rng(8)
    steps, spans = [], []
    for _ in range(50):
        field = elastic_displacement((201, 201), rng, grid=3, std=10.0)
        steps.append(
            max(np.abs(np.diff(field, axis=1)).max(), np.abs(np.diff(field, axis=2)).max())
        )
        spans.append(np.ptp(field))
    # Displacements of tens of pixels, but neighbouring pixels move almost together.
    assert np.mean(spans) > 20.0
    assert max(steps) < 2.0
    assert np.mean(steps) < 1.0


def test_rotation_and_flip_act_about_tile_centre():
    rng = np.random.default_rng(9)
    shape, center = (31, 41), (100.0, 200.0)
    identity = identity_coordinates(shape, center)
    offsets = identity - np.array(center)[:, None, None]
    radius = np.hypot(offsets[0], offsets[1])
    for _ in range(10):
        coords = sample_coordinates(shape, center, rng, AugmentConfig(elastic=False, gray=False))
        np.testing.assert_allclose(coords[:, 15, 20], center, atol=1e-9)
        moved = coords - np.array(center)[:, None, None]
        np.testing.assert_allclose(np.hypot(moved[0], moved[1]), radius, atol=1e-9)
    flips = AugmentConfig(elastic=False, rotate=False, gray=False)
    seen = set()
    for _ in range(40):
        coords = sample_coordinates(shape, center, rng, flips)
        variants = {
            (sr, sc): np.array_equal(coords, identity[:, ::sr, ::sc])
            for sr in (1, -1)
            for sc in (1, -1)
        }
        assert sum(variants.values()) == 1
        seen.add(next(k for k, v in variants.items() if v))
    assert len(seen) == 4


def test_shift_and_scale():
    rng = np.random.default_rng(10)
    shape, center = (21, 21), (50.0, 50.0)
    identity = identity_coordinates(shape, center)
    config = AugmentConfig(elastic=False, rotate=False, flip=False, max_shift=3.0)
    for _ in range(20):
        delta = sample_coordinates(shape, center, rng, config) - identity
        assert np.ptp(delta[0]) < 1e-12 and np.ptp(delta[1]) < 1e-12
        assert np.abs(delta).max() <= 3.0
    zoom = AugmentConfig(elastic=False, rotate=False, flip=False, scale_range=(2.0, 2.0))
    coords = sample_coordinates(shape, center, rng, zoom)
    np.testing.assert_allclose(coords[0, :, 0], np.linspace(45, 55, 21))


def test_labels_survive_random_warps():
    _, instances = _pattern()
    values = set(np.unique(instances).tolist())
    rng = np.random.default_rng(11)
    for _ in range(5):
        coords = sample_coordinates((70, 70), (48, 60), rng)
        out = warp(instances, coords, order=0)
        assert out.dtype == np.uint16 and out.shape == (70, 70)
        assert set(np.unique(out).tolist()) <= values
        assert len(np.unique(out)) > 2


@pytest.mark.parametrize("order", [1, 3])
def test_image_and_mask_stay_aligned(order):
    image, instances = _pattern()
    mask = instances > 0
    rng = np.random.default_rng(12)
    for _ in range(6):
        coords = sample_coordinates((80, 80), (48, 60), rng)
        warped_mask = warp(mask, coords, order=0)
        warped_image = warp(image, coords, order=order)
        assert warped_mask.dtype == np.bool_ and warped_image.dtype == np.float32
        edge = warped_mask ^ ndimage.binary_erosion(warped_mask, np.ones((3, 3)), border_value=1)
        edge |= ndimage.binary_dilation(edge, np.ones((3, 3)))  # within ~1 px of an edge
        disagree = (warped_image > 0.5) != warped_mask
        assert not (disagree & ~edge).any()
        assert disagree.mean() < 0.05
        assert 0.1 < warped_mask.mean() < 0.9


def test_multichannel_warp_matches_per_channel():
    image, _ = _pattern()
    stack = np.stack([image, 1 - image, image**2])
    coords = sample_coordinates((50, 50), (40, 40), np.random.default_rng(13))
    out = warp(stack, coords, order=3)
    assert out.shape == (3, 50, 50)
    for channel, warped in zip(stack, out, strict=True):
        np.testing.assert_array_equal(warp(channel, coords, order=3), warped)


def test_non_mirror_modes_and_dtypes():
    image = np.arange(12, dtype=np.int32).reshape(3, 4)
    coords = identity_coordinates((3, 4), (1, 3))  # cols 1..4, the last one outside
    out = warp(image, coords, order=0, mode="constant", cval=-1)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out[:, -1], [-1, -1, -1])
    np.testing.assert_array_equal(out[:, :3], image[:, 1:])
    mask = warp(image > 5, coords, order=0, mode="constant")
    assert mask.dtype == np.bool_
    np.testing.assert_array_equal(mask[:, :3], image[:, 1:] > 5)
    assert warp(image, coords, order=1).dtype == np.float64
    assert warp(image.astype(np.uint8), coords, order=1).dtype == np.float32


def test_sampling_is_deterministic_per_seed():
    image, _ = _pattern()
    a = sample_coordinates((60, 60), (40, 40), np.random.default_rng(14))
    b = sample_coordinates((60, 60), (40, 40), np.random.default_rng(14))
    c = sample_coordinates((60, 60), (40, 40), np.random.default_rng(15))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    g1 = adjust_gray(image, np.random.default_rng(16))
    g2 = adjust_gray(image, np.random.default_rng(16))
    np.testing.assert_array_equal(g1, g2)


def test_gray_off_is_identity():
    image, _ = _pattern()
    rng = np.random.default_rng(17)
    out = adjust_gray(image, rng, AugmentConfig.off())
    np.testing.assert_array_equal(out, image)
    assert out is not image
    assert rng.random() == np.random.default_rng(17).random()  # no draws consumed


def test_gray_changes_known_answers():
    image = np.random.default_rng(18).random((2, 30, 40)).astype(np.float32)
    rng = np.random.default_rng(19)
    out = adjust_gray(image, rng)
    assert out.shape == image.shape and out.dtype == np.float32
    assert not np.array_equal(out, image)

    def only(**ranges):
        fixed = {"gamma_range": (1.0, 1.0), "contrast_range": (1.0, 1.0)}
        fixed["brightness_range"] = (0.0, 0.0)
        fixed.update(ranges)
        return AugmentConfig(**fixed)

    x = image.astype(np.float64)
    bright = adjust_gray(image, rng, only(brightness_range=(0.25, 0.25)))
    np.testing.assert_allclose(bright, x + 0.25, atol=1e-6)
    contrast = adjust_gray(image, rng, only(contrast_range=(2.0, 2.0)))
    np.testing.assert_allclose(contrast, x.mean() + 2.0 * (x - x.mean()), atol=1e-5)
    gamma = adjust_gray(image, rng, only(gamma_range=(2.0, 2.0)))
    lo, hi = x.min(), x.max()
    np.testing.assert_allclose(gamma, lo + (hi - lo) * ((x - lo) / (hi - lo)) ** 2, atol=1e-6)
    assert gamma.min() == image.min() and gamma.max() == image.max()
    with pytest.raises(TypeError):
        adjust_gray(np.zeros((4, 4), dtype=np.uint8), rng)


def test_config_validation():
    with pytest.raises(ValueError):
        AugmentConfig(elastic_grid=1)
    with pytest.raises(ValueError):
        AugmentConfig(elastic_std=-1.0)
    with pytest.raises(ValueError):
        AugmentConfig(scale_range=(1.2, 0.8))
    with pytest.raises(ValueError):
        AugmentConfig(gamma_range=(0.0, 1.0))
    assert AugmentConfig.off().is_geometric_identity
    assert not AugmentConfig().is_geometric_identity
    with pytest.raises(ValueError):
        warp(np.zeros((2, 3, 4, 5)), identity_coordinates((2, 2), (0, 0)))
