"""Non-finite losses and gradients: checkpoints do not change the trajectory, transient
non-finite values are recomputed, persistent ones skip the update, a diverged run stops, and
non-finite weights are never saved or selected."""

import csv

import numpy as np
import pytest
import tifffile
import torch

import biounet.loop as train_module
from biounet.architecture import UNetConfig
from biounet.data import DataConfig
from biounet.errors import BiounetError
from biounet.loop import TrainConfig, TrainingDiverged, validate
from biounet.model import UNet
from biounet.modeldir import ModelInfo, load_model, save_model
from biounet.trainer import train_from_folders

NET = UNetConfig(depth=2, base_channels=8)


@pytest.fixture
def touching(tmp_path):
    """The data of the divergence report: 5 images of 8 random (touching) disks each."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:128, :128]
    images, masks = tmp_path / "img", tmp_path / "msk"
    images.mkdir()
    masks.mkdir()
    for i in range(5):
        m = np.zeros((128, 128), np.uint16)
        im = rng.normal(30, 8, (128, 128))
        for k in range(1, 9):
            cy, cx, r = [*rng.integers(10, 118, 2).tolist(), int(rng.integers(5, 12))]
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            m[disk & (m == 0)] = k
            im[disk] += 120
        tifffile.imwrite(images / f"a{i}.tif", np.clip(im, 0, 255).astype(np.uint8))
        tifffile.imwrite(masks / f"a{i}.tif", m)
    return images, masks


def _run(folders, out, stop_at=None, resume=False, **changes):
    settings = dict(steps=40, tile=60, seed=3, val_every=4, checkpoint_every=40, log_every=1)
    config = TrainConfig(**(settings | changes))
    info = ModelInfo(NET, ("background", "cell"))
    stop = None if stop_at is None else (lambda s: s.step < stop_at)
    return train_from_folders(
        *folders, out, info, config, DataConfig(), callback=stop, resume=resume
    )


def _last_weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoints" / "last" / "model.safetensors"))


def _rows(out):
    with (out / "training.csv").open() as f:
        return list(csv.DictReader(f))


def test_checkpoint_interval_does_not_change_the_trajectory(touching, tmp_path):
    """The report's command (precision auto: bf16 where the CPU has it), 40 steps: saving a
    checkpoint every 1, 2, 3, 4 or 10 steps ends with the weights of a run that saves none
    before the end, and every one of them is finite."""
    _run(touching, tmp_path / "ref")
    reference = _last_weights(tmp_path / "ref")
    for every in (1, 2, 3, 4, 10):
        out = tmp_path / f"every{every}"
        _run(touching, out, checkpoint_every=every)
        weights = _last_weights(out)
        for name, value in reference.items():
            assert torch.isfinite(weights[name]).all(), (every, name)
            assert torch.equal(weights[name], value), (every, name)
        assert all(r["skipped"] == "0" for r in _rows(out))


def _poisoned_loss(monkeypatch, bad_calls):
    """Make `segmentation_loss` return NaN at the given (1-based) training call numbers
    (validation computes it too, without gradients; those calls are not counted)."""
    real = train_module.segmentation_loss
    calls = {"n": 0}

    def loss(logits, *args, **kwargs):
        value = real(logits, *args, **kwargs)
        if not logits.requires_grad:
            return value
        calls["n"] += 1
        return value * np.nan if bad_calls(calls["n"]) else value

    monkeypatch.setattr(train_module, "segmentation_loss", loss)
    return calls


def test_a_transient_non_finite_loss_is_recomputed_and_changes_nothing(
    touching, tmp_path, monkeypatch
):
    _run(touching, tmp_path / "clean", steps=8, val_every=100)
    _poisoned_loss(monkeypatch, lambda n: n == 5)  # step 5's first try only
    state = _run(touching, tmp_path / "hit", steps=8, val_every=100)
    assert state.skipped == 0
    clean, hit = _last_weights(tmp_path / "clean"), _last_weights(tmp_path / "hit")
    assert all(torch.equal(clean[k], hit[k]) for k in clean)


def test_a_persistent_non_finite_loss_skips_the_update_and_is_counted(
    touching, tmp_path, monkeypatch
):
    _run(touching, tmp_path / "clean", steps=8, val_every=100)
    retries = 1 + train_module.STEP_RETRIES
    _poisoned_loss(monkeypatch, lambda n: 4 < n <= 4 + retries)  # all tries of step 5
    state = _run(touching, tmp_path / "hit", steps=8, val_every=100)
    assert state.skipped == 1
    rows = _rows(tmp_path / "hit")
    assert [int(r["skipped"]) for r in rows] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert rows[4]["loss"] == "nan"  # the logged mean of a step without a finite loss
    clean, hit = _last_weights(tmp_path / "clean"), _last_weights(tmp_path / "hit")
    assert all(torch.isfinite(v).all() for v in hit.values())
    assert not all(torch.equal(clean[k], hit[k]) for k in clean)
    model, info = load_model(tmp_path / "hit")
    assert info.training["skipped_updates"] == 1
    assert info.training["last"]["skipped"] == 1


def test_ten_skipped_updates_in_a_row_stop_training(touching, tmp_path, monkeypatch):
    _poisoned_loss(monkeypatch, lambda n: n > 2)  # every try from step 3 on
    with pytest.raises(TrainingDiverged, match=r"10 steps in a row \(up to step 12\).*`lr`"):
        _run(touching, tmp_path / "m", steps=40, checkpoint_every=2, val_every=2)
    model, _ = load_model(tmp_path / "m")
    assert all(torch.isfinite(p).all() for p in model.state_dict().values())


def test_non_finite_weights_are_never_saved(tmp_path):
    model = UNet(NET)
    with torch.no_grad():
        model.head.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(BiounetError, match=r"NaN or infinite values \(head.weight"):
        save_model(tmp_path / "m", model, ModelInfo(NET, ("background", "cell")))
    assert not (tmp_path / "m" / "weights.safetensors").exists()


def test_validation_dice_ignores_the_background_class():
    """An all-background prediction of an image with foreground scores 0, not the
    background's near-perfect Dice averaged in."""
    from biounet.data import Sample

    net = UNetConfig(depth=1, base_channels=2, padding="same")
    model = UNet(net)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([10.0, -10.0]))
    classes = np.zeros((32, 32), np.int64)
    classes[10:14, 10:14] = 1
    sample = Sample("s", np.zeros((1, 32, 32), np.float32), classes, np.ones((32, 32), np.float32))
    info = ModelInfo(net, ("background", "cell"))
    scores = validate(model, [sample], info, "fp32", torch.device("cpu"))
    assert scores["dice"] == 0.0
    assert scores["accuracy"] == pytest.approx(1 - 16 / 1024)


def test_weights_with_nan_or_a_foreign_dtype_are_refused_on_load(tmp_path):
    from biounet.io import WEIGHTS_NAME, save_tensors

    info = ModelInfo(NET, ("background", "cell"))
    save_model(tmp_path / "m", UNet(NET), info)
    state = UNet(NET).state_dict()
    state["head.weight"][0, 0, 0, 0] = float("inf")
    save_tensors(tmp_path / "m" / WEIGHTS_NAME, state)
    with pytest.raises(BiounetError, match=r"NaN or infinite values \(head.weight"):
        load_model(tmp_path / "m")
    state = {k: v.double() for k, v in UNet(NET).state_dict().items()}
    save_tensors(tmp_path / "m" / WEIGHTS_NAME, state)
    with pytest.raises(BiounetError, match="has dtype torch.float64"):
        load_model(tmp_path / "m")


def test_a_diverging_cli_training_exits_2_and_saves_no_bad_weights(touching, tmp_path, capsys):
    from biounet.cli import main

    out = tmp_path / "m"
    argv = ["train", "--images", touching[0], "--masks", touching[1], "--out", out]
    argv += ["--depth", "2", "--base-channels", "8", "--tile", "60", "--steps", "30"]
    argv += ["--val-every", "4", "--optimizer", "sgd", "--lr", "1e30", "--device", "cpu"]
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "training diverged" in err and "Traceback" not in err
    assert "(--lr, now 1e+30)" in err and "--batch-norm" in err  # worded as flags
    # Only finite weights were ever written: the step-0 ones the directory starts with.
    model, _ = load_model(out)
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    assert (out / "checkpoints" / "last").resolve().name == "step-000000000"


def test_steps_zero_is_refused_not_defaulted(touching, tmp_path, capsys):
    from biounet.cli import main

    argv = ["train", "--images", touching[0], "--masks", touching[1], "--out", tmp_path / "m"]
    assert main([str(a) for a in [*argv, "--steps", "0"]]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_json_never_holds_nan(tmp_path):
    import json

    from biounet.io import write_json

    write_json(tmp_path / "a.json", {"x": float("nan"), "y": [1.0, float("inf")], "z": 2.5})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": None, "y": [1.0, None], "z": 2.5}


def test_a_stored_post_processing_with_an_unknown_key_is_refused_on_load(tmp_path, capsys):
    import json

    from biounet.cli import main

    info = ModelInfo(NET, ("background", "cell"), postprocess={"instances": {"seeds": 0.5}})
    save_model(tmp_path / "m", UNet(NET), info)
    image = tmp_path / "a.tif"
    tifffile.imwrite(image, np.zeros((40, 40), np.uint8))
    argv = ["predict", tmp_path / "m", image, "--out", tmp_path / "o", "--output", "instances"]
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "unknown postprocess.instances key(s) seeds" in err
    assert not (tmp_path / "o").exists()
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["postprocess"] = {"instances": {"seed_threshold": "high"}}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(BiounetError, match="config.json: invalid model config"):
        load_model(tmp_path / "m")


def test_a_one_bit_tiff_is_read_as_0_and_1(tmp_path):
    from biounet.io import read_image

    bits = np.random.default_rng(0).integers(0, 2, (20, 30)).astype(bool)
    tifffile.imwrite(tmp_path / "b.tif", bits)
    image = read_image(tmp_path / "b.tif")
    assert image.dtype == np.uint8 and np.array_equal(image[0], bits)


def test_resume_of_a_checkpoint_scored_the_old_way_selects_again(touching, tmp_path):
    """Checkpoints from before the foreground Dice hold a best Dice over all classes, higher
    than any foreground Dice: resuming must not keep comparing against it."""
    import json

    out = tmp_path / "m"
    _run(touching, out, steps=8, val_every=4, checkpoint_every=4, stop_at=4)
    state_file = out / "checkpoints" / "last" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["dice_of"] == "foreground classes"
    del state["dice_of"]
    state["best_val_dice"] = 0.999
    state_file.write_text(json.dumps(state))
    before = (out / "weights.safetensors").read_bytes()
    _run(touching, out, steps=8, val_every=4, checkpoint_every=4, resume=True)
    _, info = load_model(out)
    assert info.training["best_val_dice"] < 0.999
    assert (out / "weights.safetensors").read_bytes() != before  # step 8 was selected


@pytest.mark.parametrize(
    ("post", "match"),
    [
        ({"membranes": {"seed": 0.1}}, "unknown postprocess.membranes key"),
        ({"membranes": {"membrane_class": 2}}, "membrane_class 2 is not one of the model's 2"),
        ({"membranes": {"threshold": 0.5, "seed_threshold": 0.7}}, "`seed_threshold` must be in"),
        ({"membranes": {"membrane_class": True}}, "`membrane_class` must be an integer"),
        ({"membranes": [0.5]}, "postprocess.membranes must be an object"),
        ({"watershed": {}}, "unknown postprocess key\\(s\\) watershed; known: instances"),
        ({"instances": {"gap": -1}}, "postprocess.instances: `gap` must be in"),
        ({"instances": {"threshold": "0.5"}}, "`threshold` must be a finite number"),
        ({"instances": {"border_class": 2}}, "border_class 2 is not one of the model's 2"),
        ({"instances": {"cell_class": 5}}, "cell_class 5 is not one of the model's 2"),
    ],
)
def test_a_bad_stored_post_processing_is_refused_on_load(tmp_path, post, match):
    save_model(
        tmp_path / "m", UNet(NET), ModelInfo(NET, ("interior", "membrane"), postprocess=post)
    )
    with pytest.raises(BiounetError, match=match):
        load_model(tmp_path / "m")
