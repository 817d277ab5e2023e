"""The models shipped in models/: loadable, small, accurate, and stable under bf16."""

from pathlib import Path

import numpy as np
import pytest

from biounet.instances import instances_from_probabilities
from biounet.io import read_image, read_mask
from biounet.metrics import instance_scores, pixel_error, pool_instance_scores, rand_scores
from biounet.modeldir import load_model
from biounet.predict import PredictConfig, instance_config, predict_array

MODELS = Path(__file__).resolve().parents[1] / "models"
ISBI, BBBC = MODELS / "isbi2012", MODELS / "bbbc039"


def _shipped(path: Path):
    if not (path / "config.json").is_file():
        pytest.skip(f"models/{path.name} is not in this checkout")
    return load_model(path)


@pytest.fixture(scope="module")
def isbi_model():
    return _shipped(ISBI)


def _complete_and_small(path: Path, info) -> None:
    assert (path / "weights.safetensors").stat().st_size <= 20 * 2**20
    assert info.training["command"].startswith("biounet train")
    assert (path / "README.md").is_file()


def test_isbi_model_is_complete_and_small(isbi_model):
    model, info = isbi_model
    _complete_and_small(ISBI, info)
    assert info.class_names == ("interior", "membrane")
    assert info.net.padding == "valid" and info.net.depth == 4
    # The recipe its README and docs/benchmarks.md describe.
    train, data = info.training["train_config"], info.training["data_config"]
    assert (train["batch_size"], train["tile"], train["lr_schedule"]) == (4, 196, "cosine")
    assert train["dice"] == 1.0
    assert (data["class_balance"], data["border_w0"]) == (False, 3.0)
    # A release model (bench/release.py): all 25 labelled slices, the cross-validated recipe,
    # and the post-processing its 5 folds chose, stored so that a plain `predict` applies it.
    release = info.training["release"]
    assert (release["recipe"], release["folds"]) == ("isbi-base", [0, 1, 2, 3, 4])
    assert len(info.training["train_files"]) == 25 and not info.training.get("val_files")
    assert info.postprocess["tta"] is True
    assert info.postprocess["membranes"]["seed_threshold"] == 0.1


def test_isbi_model_segments_a_slice(isbi_model, shared_data):
    """Slice 24, one of the 25 the release model learned from (no labelled slice is held
    out; its cross-validated scores on unseen slices are in its README): a check that the
    shipped weights and their stored TTA give what they should, not a score."""
    model, info = isbi_model
    image = read_image(shared_data / "isbi2012" / "images" / "24.png")
    truth = read_mask(shared_data / "isbi2012" / "labels" / "24.png") == 0
    probs = predict_array(model, info, image, PredictConfig(precision="fp32"))
    membrane = probs[1]
    # The smoothed-threshold baseline scores 0.11 pixel error and 0.34 Rand error on 20-24;
    # the model trained on 00-19 alone scored 0.046 and 0.11 on this slice (fp32, no TTA).
    assert pixel_error(membrane, truth)["pixel_fscore_error"] < 0.06
    assert rand_scores(membrane, truth)["rand_error"] < 0.15


def test_bf16_and_fp32_masks_agree_on_an_isbi_image(isbi_model, shared_data):
    model, info = isbi_model
    image = read_image(shared_data / "isbi2012" / "test_images" / "00.png")
    # the network's numerics, one view (the stored TTA would only average 8 such views)
    fp32 = predict_array(model, info, image, PredictConfig(precision="fp32", tta=False)).argmax(0)
    bf16 = predict_array(model, info, image, PredictConfig(precision="bf16", tta=False)).argmax(0)
    assert np.mean(fp32 == bf16) >= 0.999


@pytest.fixture(scope="module")
def bbbc_model():
    return _shipped(BBBC)


def test_bbbc_model_is_complete_small_and_knows_its_post_processing(bbbc_model):
    model, info = bbbc_model
    _complete_and_small(BBBC, info)
    assert info.class_names == ("background", "nucleus")
    assert info.postprocess["instances"]["seed_threshold"] == 0.8  # fitted on training images


def _val_pairs(info, shared_data, n):
    """The first n validation images of the shipped model (held out from its training)."""
    for name in sorted(info.training["val_files"])[:n]:
        yield (
            read_image(shared_data / "bbbc039" / "images" / name),
            read_mask(shared_data / "bbbc039" / "masks" / f"{Path(name).stem}.png"),
        )


@pytest.fixture
def bbbc_val_image(bbbc_model, shared_data):
    return next(_val_pairs(bbbc_model[1], shared_data, 1))


def test_bbbc_model_separates_held_out_nuclei(bbbc_model, shared_data):
    model, info = bbbc_model
    scores = []
    for image, truth in _val_pairs(info, shared_data, 5):
        probs = predict_array(model, info, image, PredictConfig(precision="fp32"))
        scores.append(
            instance_scores(instances_from_probabilities(probs, instance_config(info)), truth)
        )
    pooled = pool_instance_scores(scores)
    # Otsu + watershed scores AP@0.5 0.82 over all 20 validation images; this model 0.91
    # (docs/benchmarks.md); over these 5: 0.89.
    assert pooled["ap"][0] > 0.85
    assert abs(pooled["n_pred"] - pooled["n_true"]) < 0.1 * pooled["n_true"]


def test_tiled_instances_equal_untiled_instances(bbbc_model, bbbc_val_image):
    """Small tiles stitch to the same probabilities, so the same nuclei, ids and all."""
    model, info = bbbc_model
    image, _ = bbbc_val_image
    post = instance_config(info)
    whole = instances_from_probabilities(
        predict_array(model, info, image, PredictConfig(precision="fp32", tile=724)), post
    )
    tiled = instances_from_probabilities(
        predict_array(model, info, image, PredictConfig(precision="fp32", tile=100)), post
    )
    assert whole.max() > 30  # the first validation image holds ~40 nuclei
    assert np.mean(tiled == whole) > 0.9999  # float rounding may flip a pixel at p = 0.5
    assert tiled.max() == whole.max()
