"""The models shipped in models/: loadable, small, accurate, and stable under bf16."""

from pathlib import Path

import numpy as np
import pytest

from biounet.bundle import load_model
from biounet.io import read_image, read_mask
from biounet.metrics import pixel_error, rand_scores
from biounet.predict import PredictConfig, predict_array

ISBI = Path(__file__).resolve().parents[1] / "models" / "isbi2012"


@pytest.fixture(scope="module")
def isbi_model():
    if not (ISBI / "config.json").is_file():
        pytest.skip("models/isbi2012 is not in this checkout")
    return load_model(ISBI)


def test_isbi_model_is_complete_and_small(isbi_model):
    model, info = isbi_model
    assert (ISBI / "weights.safetensors").stat().st_size <= 20 * 2**20
    assert info.class_names == ("interior", "membrane")
    assert info.net.padding == "valid" and info.net.depth == 4
    assert info.training["command"].startswith("biounet train")
    assert (ISBI / "README.md").is_file()


def test_isbi_model_segments_a_held_out_slice(isbi_model, shared_data):
    """Slice 24 was held out from training (validation block 20-24)."""
    model, info = isbi_model
    image = read_image(shared_data / "isbi2012" / "images" / "24.png")
    truth = read_mask(shared_data / "isbi2012" / "labels" / "24.png") == 0
    probs = predict_array(model, info, image, PredictConfig(precision="fp32"))
    membrane = probs[1]
    # The smoothed-threshold baseline scores 0.11 pixel error and 0.34 Rand error here.
    assert pixel_error(membrane, truth)["pixel_fscore_error"] < 0.09
    assert rand_scores(membrane, truth)["rand_error"] < 0.3


def test_bf16_and_fp32_masks_agree_on_an_isbi_image(isbi_model, shared_data):
    model, info = isbi_model
    image = read_image(shared_data / "isbi2012" / "test_images" / "00.png")
    fp32 = predict_array(model, info, image, PredictConfig(precision="fp32")).argmax(0)
    bf16 = predict_array(model, info, image, PredictConfig(precision="bf16")).argmax(0)
    assert np.mean(fp32 == bf16) >= 0.999
