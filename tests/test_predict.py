import numpy as np
import pytest
import tifffile
import torch

from biounet.architecture import UNetConfig
from biounet.io import LazyImage
from biounet.model import UNet
from biounet.modeldir import ModelInfo, save_model
from biounet.predict import PredictConfig, predict_array, predict_files


@pytest.fixture
def tiny_model(tmp_path):
    torch.manual_seed(0)
    net = UNetConfig(depth=2, base_channels=4)
    save_model(tmp_path / "model", UNet(net), ModelInfo(net, ("background", "foreground")))
    return tmp_path / "model"


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_streamed_prediction_equals_in_memory_prediction(
    tiny_model, tmp_path, compression, monkeypatch
):
    # the streamed percentiles are counted in bands of 1000 px (4 rows): 38 bands, merged
    monkeypatch.setattr("biounet.predict._STATISTICS_PX", 1000)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 4095, (150, 205)).astype(np.uint16)
    kw = {"compression": compression, "tile": (64, 64)} if compression else {}
    tifffile.imwrite(tmp_path / "big.tif", image, **kw)
    common = dict(tile=40, precision="fp32", batch_size=3)
    predict_files(tiny_model, [tmp_path / "big.tif"], tmp_path / "mem", PredictConfig(**common))
    predict_files(
        tiny_model,
        [tmp_path / "big.tif"],
        tmp_path / "stream",
        PredictConfig(**common, stream_pixels=0),
    )
    streamed = tifffile.imread(tmp_path / "stream" / "big.tif")
    with tifffile.TiffFile(tmp_path / "stream" / "big.tif") as tif:
        assert tif.pages[0].is_tiled  # written tile by tile
    assert streamed.shape == (150, 205) and streamed.dtype == np.uint8
    assert np.array_equal(streamed, tifffile.imread(tmp_path / "mem" / "big.tif"))


def test_lazy_image_reads_windows_and_layouts(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 255, (40, 50, 3)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    with LazyImage(tmp_path / "rgb.tif") as lazy:
        assert lazy.shape == (3, 40, 50)
        assert np.array_equal(lazy[..., 5:9, 10:20], np.moveaxis(rgb, -1, 0)[:, 5:9, 10:20])
        assert lazy.sample(max_pixels=100).shape[1] <= 40


@pytest.fixture
def cell_model(tmp_path):
    """A tiny random model that calls about half of a disk image's pixels cells."""
    from tests.conftest import disk_image, disks

    torch.manual_seed(0)
    net = UNetConfig(depth=2, base_channels=4)
    model = UNet(net)
    info = ModelInfo(net, ("background", "cell"))
    rng = np.random.default_rng(3)
    image = disk_image(disks((130, 170), rng, count=12), rng)
    tifffile.imwrite(tmp_path / "cells.tif", image)
    # Random weights call nearly every pixel one class: shift the head's bias so the cell
    # class wins on a fifth of the pixels: ~30 objects with random outlines, in clumps up to
    # ~50 px wide.
    probs = predict_array(model, info, image[None], PredictConfig(precision="fp32"))
    with torch.no_grad():
        model.head.bias[1] -= float(np.quantile(np.log(probs[1] / probs[0]), 0.8))
    save_model(tmp_path / "model", model, info)
    return tmp_path / "model", tmp_path / "cells.tif"


def test_tiled_instance_output_equals_untiled(cell_model, tmp_path):
    """Tiles stitch to the same probabilities, so post-processing finds the same objects."""
    model, image = cell_model
    outs = {}
    for tile in (20, None):
        out = tmp_path / f"out_{tile}"
        config = PredictConfig(tile=tile, precision="fp32", output="instances")
        predict_files(model, [image], out, config)
        outs[tile] = tifffile.imread(out / "cells.tif")
    assert outs[20].dtype == np.uint16
    assert outs[None].max() >= 20
    assert np.array_equal(outs[20], outs[None])


def test_streamed_instances_equal_in_memory_instances(cell_model, tmp_path, monkeypatch, caplog):
    """Streaming labels in blocks (small here, so objects cross them) changes nothing."""
    import biounet.predict

    monkeypatch.setattr(biounet.predict, "_INSTANCE_CHUNK", 48)
    model, image = cell_model
    common = dict(tile=40, precision="fp32", output="instances", instance_margin=90)
    predict_files(model, [image], tmp_path / "mem", PredictConfig(**common))
    predict_files(model, [image], tmp_path / "stream", PredictConfig(**common, stream_pixels=0))
    streamed = tifffile.imread(tmp_path / "stream" / "cells.tif")
    with tifffile.TiffFile(tmp_path / "stream" / "cells.tif") as tif:
        assert tif.pages[0].is_tiled
    assert sorted(p.name for p in (tmp_path / "stream").iterdir()) == ["cells.tif"]
    assert streamed.dtype == np.uint16 and streamed.max() >= 20
    assert np.array_equal(streamed, tifffile.imread(tmp_path / "mem" / "cells.tif"))
    assert "wider than" not in caplog.text


def test_memory_budget_and_precision_choose_the_tile():
    from biounet.predict import tile_plan

    info = ModelInfo(UNetConfig(), ("background", "foreground"))

    def tile(precision, memory_mb):
        plan = tile_plan(info, (4096, 4096), PredictConfig(memory_mb=memory_mb), precision)
        return plan.y.tile_out

    assert tile("fp32", 256) < tile("fp32", 1024) < tile("fp32", 4096)
    assert tile("fp32", 1024) < tile("bf16", 1024)  # half the bytes per value


@pytest.fixture
def membrane_model(tmp_path):
    """A tiny 2-class model that stores a membrane post-processing with watershed lines."""
    torch.manual_seed(1)
    net = UNetConfig(depth=2, base_channels=4)
    post = {"membranes": {"threshold": 0.5, "seed_threshold": 0.45, "min_seed": 4}}
    info = ModelInfo(net, ("interior", "membrane"), postprocess=post)
    save_model(tmp_path / "membranes", UNet(net), info)
    return tmp_path / "membranes"


def test_masks_follow_a_stored_membrane_post_processing(membrane_model, tmp_path, monkeypatch):
    """In memory the mask is `membrane_classes` of the probabilities; streamed in blocks
    (small here) it is the same mask."""
    import biounet.predict
    from biounet.membranes import MembraneConfig, membrane_classes
    from biounet.modeldir import load_model

    monkeypatch.setattr(biounet.predict, "_INSTANCE_CHUNK", 48)
    rng = np.random.default_rng(2)
    image = rng.integers(0, 255, (130, 170)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "em.tif", image)
    common = dict(tile=40, precision="fp32", instance_margin=60)
    predict_files(membrane_model, [tmp_path / "em.tif"], tmp_path / "mem", PredictConfig(**common))
    predict_files(membrane_model, [tmp_path / "em.tif"], tmp_path / "stream",
                  PredictConfig(**common, stream_pixels=0))  # fmt: skip
    model, info = load_model(membrane_model)
    probs = predict_array(model, info, image[None], PredictConfig(**common))
    want = membrane_classes(probs, MembraneConfig(**info.postprocess["membranes"]))
    assert (want != probs.argmax(0)).sum() > 20  # the lines changed the argmax
    got = tifffile.imread(tmp_path / "mem" / "em.tif")
    assert np.array_equal(got, want)
    assert np.array_equal(tifffile.imread(tmp_path / "stream" / "em.tif"), want)
    assert sorted(p.name for p in (tmp_path / "stream").iterdir()) == ["em.tif"]
