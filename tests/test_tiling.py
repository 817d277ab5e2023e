import numpy as np
import pytest
import torch

from biounet.architecture import UNetConfig
from biounet.errors import BiounetError
from biounet.mirror import mirror_crop, mirror_indices
from biounet.model import UNet
from biounet.tiling import (
    auto_tile,
    min_tile,
    model_forward,
    plan_tiles,
    predict_tiled,
    predict_whole,
    tile_memory,
)


@pytest.fixture(scope="module")
def valid_net():
    torch.manual_seed(0)
    cfg = UNetConfig(depth=3, base_channels=4, in_channels=2, num_classes=3)
    return cfg, model_forward(UNet(cfg))


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_mirror_indices_match_numpy_reflect(n):
    a = np.arange(n)
    for pad in (0, 1, n, 3 * n + 2):
        expected = np.pad(a, pad, mode="reflect") if n > 1 else np.zeros(n + 2 * pad, int)
        assert np.array_equal(a[mirror_indices(-pad, n + pad, n)], expected)


def test_mirror_crop_inside_is_a_plain_crop_and_outside_is_mirrored():
    img = np.arange(2 * 5 * 6).reshape(2, 5, 6)
    assert np.array_equal(mirror_crop(img, 1, 2, 3, 3), img[:, 1:4, 2:5])
    padded = np.pad(img, ((0, 0), (4, 4), (4, 4)), mode="reflect")
    assert np.array_equal(mirror_crop(img, -4, -4, 13, 14), padded)


@pytest.mark.parametrize("shape", [(37, 53), (91, 64), (5, 3), (1, 1), (130, 77)])
def test_valid_tiling_equals_whole_image_inference(valid_net, shape):
    cfg, forward = valid_net
    img = np.random.default_rng(1).normal(size=(2, *shape)).astype(np.float32)
    ref = predict_whole(forward, img, cfg)
    assert ref.shape == (3, *shape)
    smallest = min_tile(cfg)
    for tile in (smallest, smallest + 9, 40, 76, 4 * max(shape) + 50):
        plan = plan_tiles(cfg, shape, tile)
        for batch_size in (1, 3):
            out = predict_tiled(forward, img, plan, 3, batch_size=batch_size)
            assert np.abs(out - ref).max() <= 1e-4, (tile, batch_size)


def test_smallest_tile_really_tiles_and_origins_sit_on_the_pooling_grid(valid_net):
    cfg, _ = valid_net
    plan = plan_tiles(cfg, (100, 100), min_tile(cfg))
    assert plan.y.tile_out == min_tile(cfg) == 12  # smallest valid output >= 2**3
    origins = plan.y.origins(100)
    assert len(origins) > 5
    assert all(o % cfg.size_step == 0 for o in origins)
    assert origins[-1] + plan.y.tile_out >= 100


def test_tile_sizes_are_snapped_down_and_too_small_is_an_error():
    cfg = UNetConfig()  # the paper's network
    plan = plan_tiles(cfg, (2000, 2000), 400)
    assert (plan.y.tile_out, plan.y.tile_in) == (388, 572)
    assert plan.y.stride == 384
    # A short axis gets the smallest tile that covers it instead.
    assert plan_tiles(cfg, (50, 2000), 400).y.tile_out == 52
    with pytest.raises(BiounetError, match="smallest valid tile is 20"):
        plan_tiles(cfg, (100, 100), 19)


def test_memory_is_bounded_by_the_tile_batch(valid_net):
    cfg, forward = valid_net
    seen = []

    def spy(batch):
        seen.append(batch.shape)
        return forward(batch)

    img = np.zeros((2, 300, 300), np.float32)
    plan = plan_tiles(cfg, img.shape[1:], 40)
    predict_tiled(spy, img, plan, 3, batch_size=2)
    assert max(s[0] for s in seen) == 2
    assert all(s[2:] == plan.tile_shape for s in seen)
    assert plan.tile_shape[0] < 150  # half the image: memory follows the tile


def test_same_padding_tiling_error_is_bounded_by_the_halo():
    torch.manual_seed(0)
    cfg = UNetConfig(depth=3, base_channels=8, padding="same")
    forward = model_forward(UNet(cfg))
    img = np.random.default_rng(0).normal(size=(1, 150, 170)).astype(np.float32)

    def max_prob_diff(halo):
        ref = predict_whole(forward, img, cfg, halo=halo)
        out = predict_tiled(forward, img, plan_tiles(cfg, img.shape[1:], 64, halo=halo), 2)
        assert plan_tiles(cfg, img.shape[1:], 64, halo=halo).count(img.shape[1:]) > 1
        soft = [np.exp(a - a.max(0)) / np.exp(a - a.max(0)).sum(0) for a in (ref, out)]
        return np.abs(soft[0] - soft[1]).max()

    # Default halo = receptive radius + 2 (46 px at depth 3): exact up to float rounding.
    assert max_prob_diff(None) < 1e-4
    # Measured on this configuration: 0.27 at halo 16, 0.028 at 32. The bound shrinks.
    d16, d32 = max_prob_diff(16), max_prob_diff(32)
    assert 0.01 < d32 < 0.1
    assert d32 < d16 < 0.5


def test_paper_depth_tiling_against_an_independent_numpy_reference():
    """Depth 4 (16 px pooling grid), reference built with numpy's own reflect padding."""
    torch.manual_seed(0)
    cfg = UNetConfig(depth=4, base_channels=2)
    forward = model_forward(UNet(cfg))
    img = np.random.default_rng(0).normal(size=(1, 61, 90)).astype(np.float32)
    m = cfg.margin  # 92
    # Smallest valid padded sizes covering the image, padded on the right with mirror too.
    pad_h = cfg.input_size(cfg.snap_output(61, up=True)) - 61 - m
    pad_w = cfg.input_size(cfg.snap_output(90, up=True)) - 90 - m
    padded = np.pad(img, ((0, 0), (m, pad_h), (m, pad_w)), mode="reflect")
    ref = forward(padded[None])[0][:, :61, :90]
    for tile in (min_tile(cfg), 36, 52):
        out = predict_tiled(forward, img, plan_tiles(cfg, img.shape[1:], tile), 2)
        assert np.abs(out - ref).max() <= 1e-4, tile


def _fitting_costs(cfg, shape, memory_mb, bytes_per_value):
    """Brute force over every valid tile: input area computed, for those within the budget."""
    costs = {}
    for out in range(min_tile(cfg), 2 * max(shape) + 64):
        if not cfg.is_valid_output(out):
            continue
        plan = plan_tiles(cfg, shape, out)
        if tile_memory(cfg, plan.tile_shape, 1, bytes_per_value) <= memory_mb * 2**20:
            costs[out] = plan.count(shape) * plan.y.tile_in * plan.x.tile_in
    return costs


@pytest.mark.parametrize("shape", [(300, 300), (1000, 700), (2500, 2600), (50, 3000)])
@pytest.mark.parametrize("memory_mb", [60, 200, 800])
def test_auto_tile_computes_the_least_within_the_memory_budget(shape, memory_mb):
    cfg = UNetConfig(base_channels=8)
    tile = auto_tile(cfg, shape, memory_mb=memory_mb, bytes_per_value=2)
    plan = plan_tiles(cfg, shape, memory_mb=memory_mb, bytes_per_value=2)
    assert plan == plan_tiles(cfg, shape, tile)
    assert tile_memory(cfg, plan.tile_shape, 1, 2) <= memory_mb * 2**20
    costs = _fitting_costs(cfg, shape, memory_mb, 2)
    assert plan.count(shape) * plan.y.tile_in * plan.x.tile_in == min(costs.values())


def test_auto_tile_grows_with_the_budget_and_covers_small_images_at_once():
    cfg = UNetConfig()  # the paper's network
    tiles = [auto_tile(cfg, (8000, 8000), memory_mb=mb, bytes_per_value=2) for mb in (300, 1024)]
    assert 388 < tiles[0] < tiles[1]
    # The default budget covers a 512 x 696 image with one tile and no wasted stride.
    plan = plan_tiles(cfg, (512, 696), bytes_per_value=2)
    assert plan.count((512, 696)) == 1
    assert plan.y.tile_out == cfg.snap_output(512, up=True)
    # Whatever the budget, never below the smallest valid tile.
    assert auto_tile(cfg, (8000, 8000), memory_mb=1) == min_tile(cfg)


def test_auto_tile_halves_the_tile_area_for_fp32_values():
    cfg = UNetConfig(base_channels=32)
    bf16 = plan_tiles(cfg, (20000, 20000), bytes_per_value=2).tile_shape[0]
    fp32 = plan_tiles(cfg, (20000, 20000), bytes_per_value=4).tile_shape[0]
    assert fp32 < bf16 and abs(bf16 / fp32 - 2**0.5) < 0.15
