import numpy as np
import pytest
import tifffile
import torch

from biounet.bundle import ModelInfo, save_model
from biounet.io import LazyImage
from biounet.model import UNet, UNetConfig
from biounet.predict import PredictConfig, predict_files


@pytest.fixture
def tiny_model(tmp_path):
    torch.manual_seed(0)
    net = UNetConfig(depth=2, base_channels=4)
    save_model(tmp_path / "model", UNet(net), ModelInfo(net, ("background", "foreground")))
    return tmp_path / "model"


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_streamed_prediction_equals_in_memory_prediction(tiny_model, tmp_path, compression):
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
