import csv

import numpy as np
import pytest
import tifffile
import torch

from biounet.architecture import UNetConfig
from biounet.data import DataConfig
from biounet.loop import TrainConfig
from biounet.modeldir import ModelInfo, load_model
from biounet.predict import PredictConfig, predict_array
from biounet.trainer import train_from_folders

TINY = UNetConfig(depth=2, base_channels=4, dropout=0.3)


def _info(net=TINY):
    return ModelInfo(net, ("background", "disk"))


def _train(folders, out, config, **kw):
    images, masks = folders
    return train_from_folders(images, masks, out, _info(), config, DataConfig(), **kw)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(disk_folders, tmp_path, schedule):
    config = TrainConfig(
        lr_schedule=schedule,
        steps=6,
        batch_size=2,
        tile=28,
        lr=0.01,
        seed=3,
        val_every=3,
        checkpoint_every=3,
        log_every=1,
        precision="fp32",
    )
    _train(disk_folders, tmp_path / "a", config)

    def stop_at_3(info):
        return info.step < 3

    state = _train(disk_folders, tmp_path / "b", config, callback=stop_at_3)
    assert state.step == 3
    _train(disk_folders, tmp_path / "b", config, resume=True)

    a, _ = load_model(tmp_path / "a")
    b, _ = load_model(tmp_path / "b")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    # The checkpoints hold the last step's weights too, not only the best ones.
    la = (tmp_path / "a" / "checkpoints/last/model.safetensors").read_bytes()
    lb = (tmp_path / "b" / "checkpoints/last/model.safetensors").read_bytes()
    assert la == lb
    with (tmp_path / "b" / "training.csv").open() as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_same_seed_same_weights_different_seed_different(disk_folders, tmp_path):
    config = TrainConfig(steps=3, tile=28, seed=1, precision="fp32", val_every=3)
    _train(disk_folders, tmp_path / "a", config)
    _train(disk_folders, tmp_path / "b", config)
    _train(
        disk_folders,
        tmp_path / "c",
        TrainConfig(steps=3, tile=28, seed=2, precision="fp32", val_every=3),
    )
    wa, wb, wc = (load_model(tmp_path / x)[0].head.weight for x in "abc")
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def test_training_learns_disks_and_writes_the_model_directory(disk_folders, tmp_path):
    out = tmp_path / "m"
    net = UNetConfig(depth=2, base_channels=8)
    images, masks = disk_folders
    config = TrainConfig(
        steps=80,
        batch_size=2,
        tile=44,
        optimizer="adam",
        lr=3e-3,
        val_every=40,
        checkpoint_every=40,
    )
    train_from_folders(
        images, masks, out, _info(net), config, DataConfig(), command="biounet train ..."
    )
    for name in (
        "config.json",
        "weights.safetensors",
        "training.csv",
        "curves.png",
        "checkpoints/last/optimizer.safetensors",
        "checkpoints/last/state.json",
    ):
        assert (out / name).is_file(), name
    model, info = load_model(out)
    assert info.training["command"] == "biounet train ..."
    assert info.training["val_files"] == ["img3.png"]  # the last file, held out
    assert info.training["steps_done"] == 80
    # Predict the held-out image: disks are bright, background dark; known answer = mask.
    import imageio.v3 as iio

    image = iio.imread(images / "img3.png")[None]
    truth = iio.imread(masks / "img3.png") > 0
    probs = predict_array(model, info, image, PredictConfig(precision="fp32"))
    accuracy = np.mean((probs.argmax(0) == 1) == truth)
    assert accuracy > 0.95


def test_existing_model_is_not_overwritten_without_resume(disk_folders, tmp_path):
    from biounet.errors import BiounetError

    config = TrainConfig(steps=1, tile=28, precision="fp32")
    _train(disk_folders, tmp_path / "a", config)
    with pytest.raises(BiounetError, match="already holds a model; use --resume"):
        _train(disk_folders, tmp_path / "a", config)


def test_time_budget_stops_training_and_still_saves(disk_folders, tmp_path):
    config = TrainConfig(steps=1000, tile=28, precision="fp32", max_minutes=1e-6)
    state = _train(disk_folders, tmp_path / "m", config)
    assert state.step == 1
    model, info = load_model(tmp_path / "m")
    assert info.training["steps_done"] == 1


def test_half_precision_storage_halves_the_file_and_keeps_predictions(disk_folders, tmp_path):
    from biounet.modeldir import save_model

    model, info = load_model(_trained(disk_folders, tmp_path))
    save_model(tmp_path / "half", model, info.replace(weights_dtype="float16"))
    full = (tmp_path / "m" / "weights.safetensors").stat().st_size
    half = (tmp_path / "half" / "weights.safetensors").stat().st_size
    assert half < 0.6 * full
    half_model, half_info = load_model(tmp_path / "half")
    assert half_info.weights_dtype == "float16"
    image = np.random.default_rng(0).integers(0, 255, (1, 50, 70)).astype(np.uint8)
    config = PredictConfig(precision="fp32")
    a = predict_array(model, info, image, config)
    b = predict_array(half_model, half_info, image, config)
    assert np.abs(a - b).max() < 5e-3


def test_test_time_augmentation_is_equivariant(disk_folders, tmp_path):
    model, info = load_model(_trained(disk_folders, tmp_path))
    image = np.random.default_rng(0).integers(0, 255, (1, 37, 52)).astype(np.uint8)
    config = PredictConfig(precision="fp32", tta=True)
    a = predict_array(model, info, image, config)
    b = predict_array(model, info, np.rot90(image, 1, axes=(1, 2)).copy(), config)
    assert a.shape == (2, 37, 52)
    assert np.abs(a - np.rot90(b, -1, axes=(1, 2))).max() < 1e-4
    plain = predict_array(model, info, image, PredictConfig(precision="fp32"))
    assert np.abs(a - plain).max() > 1e-4  # averaging really changes something


def _trained(folders, tmp_path):
    out = tmp_path / "m"
    if not out.exists():
        _train(folders, out, TrainConfig(steps=2, tile=28, precision="fp32"))
    return out


def test_sgd_momentum_resume_between_checkpoints_and_with_a_worker(disk_folders, tmp_path):
    """The paper's optimizer; a stop between checkpoints; data from a worker process."""
    config = TrainConfig(
        steps=5,
        tile=28,
        optimizer="sgd",
        lr=1e-3,
        momentum=0.99,
        seed=7,
        checkpoint_every=4,
        val_every=2,
        precision="fp32",
    )
    _train(disk_folders, tmp_path / "a", config)
    state = _train(disk_folders, tmp_path / "b", config, callback=lambda s: s.step < 3)
    assert state.step == 3  # not a checkpoint step: the stop itself saves one
    _train(disk_folders, tmp_path / "b", config, resume=True)
    with_worker = TrainConfig(**{**config.__dict__, "num_workers": 1})
    _train(disk_folders, tmp_path / "c", with_worker)
    a, b, c = (load_model(tmp_path / x)[0] for x in "abc")
    for name, pa in a.state_dict().items():
        assert torch.equal(pa, b.state_dict()[name]), name
        assert torch.equal(pa, c.state_dict()[name]), name


def test_resume_refuses_a_checkpoint_torn_between_steps(disk_folders, tmp_path):
    from biounet.errors import BiounetError
    from biounet.io import save_tensors

    config = TrainConfig(steps=4, tile=28, checkpoint_every=2, precision="fp32")
    _train(disk_folders, tmp_path / "a", config, callback=lambda s: s.step < 2)
    last = tmp_path / "a" / "checkpoints" / "last"
    model, _ = load_model(tmp_path / "a")
    save_tensors(last / "model.safetensors", model.state_dict(), metadata={"step": "1"})
    with pytest.raises(BiounetError, match="killed while saving"):
        _train(disk_folders, tmp_path / "a", config, resume=True)


class _ProbabilityNet(torch.nn.Module):
    """Stands in for a trained network: the image holds p(cell), the logits say so."""

    def forward(self, x):
        p = x.clamp(1e-4, 1 - 1e-4)
        return torch.cat([torch.zeros_like(p), torch.log(p / (1 - p))], dim=1)


def _fit_to_probabilities(tmp_path, maps):
    """`fit_postprocess` of a network that outputs its input as the cell probability, on
    (probability map, true instances) pairs written as files."""
    from biounet.normalize import NormalizeConfig
    from biounet.trainer import fit_postprocess

    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    pairs = []
    for k, (p, truth) in enumerate(maps):
        pairs.append((tmp_path / "i" / f"{k}.tif", tmp_path / "m" / f"{k}.tif"))
        tifffile.imwrite(pairs[-1][0], p.astype(np.float32))
        tifffile.imwrite(pairs[-1][1], truth.astype(np.uint16))
    net = UNetConfig(depth=1, base_channels=2, padding="same")
    info = ModelInfo(net, ("background", "cell"), normalization=NormalizeConfig(method="none"))
    return fit_postprocess(_ProbabilityNet(), info, pairs, DataConfig(), "fp32")


def test_post_processing_fitted_to_a_network_that_draws_faint_gaps(tmp_path):
    """Gaps between touching cells at p = 0.65: only seeds above it split them, and cells
    drawn at their true extent need no growth: the fit must find seeds > 0.65, no growth."""
    from biounet.instances import InstanceConfig
    from biounet.weightmap import touching_borders

    from .test_instances import touching_disks

    maps = []
    for rows, cols in [(2, 3), (3, 3), (2, 4)]:
        truth = touching_disks(rows, cols)
        p = np.where(truth > 0, 0.97, 0.02)
        p[touching_borders(truth)] = 0.65
        maps.append((p, truth))
    post = _fit_to_probabilities(tmp_path, maps)
    assert post == InstanceConfig(seed_threshold=0.7, expand=0)  # the lowest that splits


def test_post_processing_fitted_to_a_network_that_carves_contacts(tmp_path):
    """Cells drawn at their true extent except their carved contacts: growing every outline
    by 1 px loses IoU; closing the contacts alone (gap) restores them: the fit must pick it."""
    from biounet.instances import InstanceConfig
    from biounet.weightmap import carve_borders

    from .test_instances import touching_disks

    truths = [touching_disks(rows, cols) for rows, cols in [(2, 3), (3, 3)]]
    maps = [(np.where(carve_borders(t) > 0, 0.97, 0.02), t) for t in truths]
    post = _fit_to_probabilities(tmp_path, maps)
    assert post == InstanceConfig(seed_threshold=0.5, expand=0, gap=3)


def test_cosine_schedule_follows_steps_or_time_whichever_is_further():
    from biounet.loop import lr_factor

    steps = TrainConfig(steps=100, lr_schedule="cosine")
    assert lr_factor(steps, 0, 0.0) == 1.0
    assert lr_factor(steps, 50, 0.0) == pytest.approx(0.5)
    assert lr_factor(steps, 100, 0.0) == pytest.approx(0.0)
    assert lr_factor(steps, 150, 0.0) == pytest.approx(0.0)  # never rises again
    timed = TrainConfig(steps=1_000_000, max_minutes=10, lr_schedule="cosine")
    assert lr_factor(timed, 10, 150.0) == pytest.approx((1 + np.cos(np.pi / 4)) / 2)
    assert lr_factor(timed, 10, 600.0) == pytest.approx(0.0)
    assert lr_factor(TrainConfig(steps=100), 99, 1e9) == 1.0  # constant
    with pytest.raises(Exception, match="lr_schedule must be one of constant, cosine"):
        TrainConfig(lr_schedule="step")


def test_cosine_schedule_is_applied_and_logged(disk_folders, tmp_path):
    config = TrainConfig(
        steps=8, batch_size=1, tile=28, lr=0.01, log_every=1, lr_schedule="cosine", precision="fp32"
    )
    _train(disk_folders, tmp_path / "m", config)
    with (tmp_path / "m" / "training.csv").open() as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    expected = [0.01 * (1 + np.cos(np.pi * s / 8)) / 2 for s in range(8)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-6)
