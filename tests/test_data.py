import numpy as np
import pytest
import torch

from biounet.architecture import UNetConfig
from biounet.augment import AugmentConfig
from biounet.data import (
    DataConfig,
    Sample,
    TileDataset,
    split_validation,
    targets,
    tile_geometry,
    weight_map,
)
from biounet.errors import BiounetError

from .conftest import disks

NET = UNetConfig(depth=2, base_channels=4)


def _sample(shape=(90, 110), seed=0):
    rng = np.random.default_rng(seed)
    labels = disks(shape, rng, count=8)
    classes, cells = targets((labels > 0).astype(np.int64), labels, 2, DataConfig())
    image = np.where(classes > 0, 1.0, 0.0)[None].astype(np.float32)
    return Sample("s", image, classes, weight_map(classes, cells, 2, DataConfig()), cells)


def test_tiles_are_a_function_of_seed_and_index_only():
    geo = tile_geometry(NET, 28)
    a = TileDataset([_sample()], geo, seed=5, length=10, augment=AugmentConfig())
    b = TileDataset([_sample()], geo, seed=5, length=10, augment=AugmentConfig())
    for i in (0, 7, 3):
        for x, y in zip(a[i], b[i], strict=True):
            assert torch.equal(x, y)
    assert not torch.equal(a[0][0], a[1][0])


def test_identity_augmentation_equals_plain_crops():
    geo = tile_geometry(NET, 28)
    plain = TileDataset([_sample()], geo, seed=1, length=20, augment=None)
    ident = TileDataset([_sample()], geo, seed=1, length=20, augment=AugmentConfig.off())
    for i in range(20):
        for x, y in zip(plain[i], ident[i], strict=True):
            assert torch.allclose(x, y, atol=1e-6), i


@pytest.mark.parametrize("seed", range(4))
def test_augmented_image_target_and_weight_stay_aligned(seed):
    """Image = 1 exactly on the disks: the warped image's centre must reproduce the target."""
    geo = tile_geometry(NET, 44)
    ds = TileDataset(
        [_sample(seed=seed)], geo, seed=seed, length=8, augment=AugmentConfig(gray=False)
    )
    m = geo.context
    for i in range(8):
        image, target, weight = (t.numpy() for t in ds[i])
        centre = image[0, m : m + geo.tile_out, m : m + geo.tile_out]
        inside = weight > 0  # pixels that come from inside the image
        agree = (centre > 0.5) == (target == 1)
        # Cubic interpolation blurs edges by about a pixel; everything else must agree.
        assert agree[inside].mean() > 0.97
        assert weight.min() >= 0


def test_target_pixels_outside_the_image_get_zero_weight():
    geo = tile_geometry(NET, 60)
    small = _sample(shape=(30, 40))
    ds = TileDataset([small], geo, seed=0, length=4, augment=None)
    _, target, weight = ds[0]
    assert target.shape == (60, 60)
    assert int((weight > 0).sum()) == 30 * 40


def test_touching_cells_are_carved_apart_or_get_a_border_class():
    cells = np.zeros((10, 12), np.int32)
    cells[2:8, 1:6] = 1
    cells[2:8, 6:11] = 2  # touching along a vertical line
    classes = (cells > 0).astype(np.int64)
    carved_classes, carved = targets(classes, cells, 2, DataConfig())
    assert set(np.unique(carved)) == {0, 1, 2}
    assert carved_classes[4, 5] == 0 and carved_classes[4, 6] == 0  # a gap between the cells
    assert carved_classes[4, 3] == 1 and carved_classes[4, 8] == 1
    three, _ = targets(classes, cells, 3, DataConfig(touching="class"))
    assert three[4, 5] == 2 and three[4, 6] == 2 and three[4, 3] == 1
    kept, _ = targets(classes, cells, 2, DataConfig(touching="keep"))
    assert np.array_equal(kept, classes)
    with pytest.raises(BiounetError, match="3-class model"):
        targets(classes, cells, 2, DataConfig(touching="class"))


def test_weight_map_peaks_in_the_gap_between_touching_disks():
    yy, xx = np.mgrid[:40, :60]
    cells = np.zeros((40, 60), np.int32)
    cells[(yy - 20) ** 2 + (xx - 18) ** 2 < 100] = 1
    cells[(yy - 20) ** 2 + (xx - 39) ** 2 < 100] = 2  # 1-2 px gap at x = 28..29
    classes = (cells > 0).astype(np.int64)
    w = weight_map(classes, cells, 2, DataConfig())
    y, x = np.unravel_index(np.argmax(w), w.shape)
    # The maximum lies on the gap line (x = 28..29), where the disks are closest (row 20).
    assert cells[y, x] == 0 and 28 <= x <= 29 and 12 <= y <= 28
    assert w[20, 28] == pytest.approx(w.max())
    balance = weight_map(classes, cells, 2, DataConfig(border_w0=0))
    # d1 = 1 and d2 = 2 px at the gap pixel: the formula gives 10 exp(-9 / 50).
    assert w[20, 28] - balance[20, 28] == pytest.approx(10 * np.exp(-9 / 50), rel=1e-3)


def test_isbi_style_cells_are_the_interiors_between_membranes():
    classes = np.zeros((20, 21), np.int64)
    classes[:, 10] = 1  # a membrane (class 1) between two interiors (class 0)
    _, cells = targets(classes, None, 2, DataConfig(cell_class=0))
    assert len(np.unique(cells[cells > 0])) == 2
    w = weight_map(classes, cells, 2, DataConfig(cell_class=0, class_balance=False))
    assert w[5, 10] == pytest.approx(1 + 10 * np.exp(-4 / 50), rel=1e-3)  # d1 = d2 = 1


def test_validation_split_is_the_last_contiguous_block():
    pairs = list(range(25))
    train, val = split_validation(pairs, 0.2)
    assert val == [20, 21, 22, 23, 24] and train == list(range(20))
    assert split_validation([1, 2], 0.1) == ([1], [2])
    assert split_validation([1], 0.5) == ([1], [])


def test_three_class_instance_masks_load_with_a_border_class(tmp_path):
    import tifffile

    from biounet.data import load_sample
    from biounet.normalize import NormalizeConfig

    cells = np.zeros((20, 24), np.uint16)
    cells[4:16, 2:12] = 1
    cells[4:16, 12:22] = 2
    tifffile.imwrite(tmp_path / "m.tif", cells)
    tifffile.imwrite(tmp_path / "i.tif", (cells > 0).astype(np.uint8) * 200)
    net3 = UNetConfig(depth=2, base_channels=4, num_classes=3)
    sample = load_sample(
        tmp_path / "i.tif",
        tmp_path / "m.tif",
        net3,
        NormalizeConfig(),
        DataConfig(touching="class"),
    )
    assert sample.mask_type == "instances"
    assert set(np.unique(sample.classes)) == {0, 1, 2}
    assert sample.classes[8, 11] == 2 and sample.classes[8, 12] == 2
