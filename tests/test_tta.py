"""Test-time augmentation tile by tile equals TTA over the whole image's 8 views."""

import numpy as np
import pytest
import torch

from biounet.architecture import UNetConfig
from biounet.inference import Engine, softmax
from biounet.model import UNet
from biounet.tta import dihedral_views, from_view, image_box, to_view, view_box


def _engine(padding="valid", seed=0, depth=2):
    torch.manual_seed(seed)
    return Engine(UNet(UNetConfig(depth=depth, base_channels=4, padding=padding)),
                  torch.device("cpu"), "fp32")  # fmt: skip


def _whole_image_tta(engine, image, tiling):
    """The reference: each view of the whole image predicted with tiles, turned back, and
    the probabilities averaged."""
    total = 0
    for view in dihedral_views():
        probs = softmax(engine.logits(to_view(image, view), tiling))
        total = total + from_view(probs, view)
    return total / 8


@pytest.mark.parametrize("view", dihedral_views())
def test_boxes_map_like_the_arrays(view):
    rng = np.random.default_rng(0)
    image = rng.random((7, 11))
    turned = to_view(image, view)
    box = ((2, 5), (3, 10))
    (a0, a1), (b0, b1) = view_box(view, image.shape, box)
    part = image[2:5, 3:10]
    np.testing.assert_array_equal(from_view(turned[a0:a1, b0:b1], view), part)
    assert image_box(view, image.shape, ((a0, a1), (b0, b1))) == box
    np.testing.assert_array_equal(from_view(turned, view), image)


@pytest.mark.parametrize(
    ("padding", "shape", "tile", "batch"),
    [("valid", (61, 83), 24, 1), ("valid", (70, 45), 40, 3), ("same", (53, 77), 32, 2),
     ("valid", (20, 9), None, 1)],
)  # fmt: skip
def test_tiled_tta_equals_the_whole_image_views(padding, shape, tile, batch):
    from biounet.configs import Tiling

    engine = _engine(padding)
    image = np.random.default_rng(1).normal(size=(1, *shape)).astype(np.float32)
    tiling = Tiling(tile=tile, batch_size=batch)
    want = _whole_image_tta(engine, image, tiling)
    got = engine.probabilities(image, None, tiling, tta=True)
    assert got.shape == (2, *shape) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-6)
    plain = engine.probabilities(image, None, tiling)
    assert np.abs(got - plain).max() > 1e-3  # the views do change the result


def test_tiled_tta_does_not_depend_on_the_tile():
    from biounet.configs import Tiling

    engine = _engine(depth=3)
    image = np.random.default_rng(2).normal(size=(1, 75, 66)).astype(np.float32)
    a = engine.probabilities(image, None, Tiling(tile=40), tta=True)
    b = engine.probabilities(image, None, Tiling(tile=72), tta=True)
    np.testing.assert_allclose(a, b, atol=2e-6)


def _stored_tta_model(tmp_path, post):
    from biounet.modeldir import ModelInfo, save_model

    torch.manual_seed(3)
    net = UNetConfig(depth=2, base_channels=4)
    save_model(
        tmp_path / "m", UNet(net), ModelInfo(net, ("interior", "membrane"), postprocess=post)
    )
    return tmp_path / "m"


def test_a_stored_tta_is_the_default_everywhere(tmp_path, monkeypatch):
    """A model that stores ``tta``: the plain call, streamed TIFFs and dask blocks all average
    the views (the same masks), and ``tta=False`` turns it off."""
    import dask.array as da
    import tifffile

    import biounet
    import biounet.graph
    from biounet.predict import PredictConfig, predict_files

    monkeypatch.setattr(biounet.graph, "BLOCK_PX", 40)
    post = {"tta": True, "membranes": {"seed_threshold": 0.45, "min_seed": 4}}
    model_dir = _stored_tta_model(tmp_path, post)
    model = biounet.load(model_dir, device="cpu", precision="fp32")
    image = np.random.default_rng(5).integers(0, 255, (150, 170)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "em.tif", image)
    probs = model.predict(image, "prob", tile=40)
    np.testing.assert_allclose(probs, model.predict(image, "prob", tile=40, tta=True), atol=0)
    plain = model.predict(image, "prob", tile=40, tta=False)
    assert np.abs(probs - plain).max() > 1e-3
    mask = model.predict(image, "mask", tile=40)
    config = PredictConfig(tile=40, precision="fp32", stream_pixels=0)
    predict_files(model_dir, [tmp_path / "em.tif"], tmp_path / "stream", config)
    assert np.array_equal(tifffile.imread(tmp_path / "stream" / "em.tif"), mask)
    blocks = model.predict(da.from_array(image, chunks=(60, 60)), "mask", tile=40)
    assert np.array_equal(blocks.compute(scheduler="synchronous"), mask)


@pytest.mark.parametrize(
    ("post", "match"),
    [({"tta": "yes"}, "postprocess.tta must be true or false"),
     ({"tta": 1}, "postprocess.tta must be true or false"),
     ({"tta": 0}, "postprocess.tta must be true or false")],
)  # fmt: skip
def test_a_stored_tta_must_be_a_boolean(tmp_path, post, match):
    from biounet.errors import BiounetError
    from biounet.modeldir import load_model

    with pytest.raises(BiounetError, match=match):
        load_model(_stored_tta_model(tmp_path, post))


def test_info_says_what_the_model_stores(tmp_path, capsys):
    from biounet.cli import main

    post = {"tta": True, "membranes": {"seed_threshold": 0.2, "min_seed": 10}}
    assert main(["info", str(_stored_tta_model(tmp_path, post))]) == 0
    out = capsys.readouterr().out
    assert "membranes: membrane_class 1" not in out  # as stored, not filled in
    assert "membranes: seed_threshold 0.2, min_seed 10" in out
    assert "predicts with TTA" in out and "--no-tta" in out


def test_napari_starts_from_the_models_stored_tta(tmp_path):
    from biounet.napari.segment import stored_tta

    assert stored_tta(str(_stored_tta_model(tmp_path / "a", {"tta": True}))) is True
    assert stored_tta(str(_stored_tta_model(tmp_path / "b", None))) is False
    assert stored_tta(str(tmp_path / "missing")) is False  # the run says why, not the box
