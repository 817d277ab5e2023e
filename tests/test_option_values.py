"""Every numeric option through 0, -1, NaN and infinity: refused up front where it makes no
sense (exit 2, one line naming the flag, nothing written), accepted where it does."""

import math

import imageio.v3 as iio
import numpy as np
import pytest

from biounet.cli import main
from biounet.configs import PredictConfig
from biounet.errors import BiounetError
from biounet.trainer import configs_from_options

VALUES = ("0", "-1", "nan", "inf")
# option -> the values of VALUES that make sense (all others must be refused)
TRAIN = {
    "steps": (), "max-minutes": (), "lr": (), "val-every": (), "checkpoint-every": (),
    "batch-size": (), "tile": (), "sigma": (), "base-channels": (), "classes": (),
    "in-channels": (), "momentum": ("0",), "weight-decay": ("0",), "w0": ("0",),
    "elastic-std": ("0",), "dropout": ("0",), "dice": ("0",), "val-fraction": ("0",),
    "workers": ("0",), "seed": ("0",), "depth": ("0",), "cell-class": ("0",),
}  # fmt: skip
PREDICT = {"tile": (), "batch-size": (), "memory-mb": (), "instance-margin": ()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("values")
    (root / "i").mkdir()
    (root / "m").mkdir()
    rng = np.random.default_rng(0)
    for k in range(2):
        iio.imwrite(root / "i" / f"{k}.png", rng.integers(0, 255, (48, 48)).astype(np.uint8))
        iio.imwrite(root / "m" / f"{k}.png", (rng.random((48, 48)) > 0.5).astype(np.uint8))
    assert main(["-q", "init", str(root / "model"), "--depth", "2", "--base-channels", "4"]) == 0
    return root


def _refused(capsys, argv, flag, out):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse: not a number of the option's type at all
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert flag in err and "Traceback" not in err, (flag, err)
    assert not out.exists(), (argv, sorted(out.rglob("*")))


@pytest.mark.parametrize("option", sorted(TRAIN))
def test_train_options(option, data, tmp_path, capsys):
    base = ["train", "--images", data / "i", "--masks", data / "m", "--depth", "2"]
    base += ["--base-channels", "4", "--tile", "20", "--steps", "1"]
    for value in VALUES:
        flag = f"--{option}"
        if value in TRAIN[option]:
            key = option.replace("-", "_")
            number = float(value) if "." in value or not value.lstrip("-").isdigit() else int(value)
            configs_from_options({key: number}, 1)  # accepted: the configs take it
            continue
        out = tmp_path / f"out{value}"
        argv = [*base, flag, value, "--out", out]
        _refused(capsys, argv, flag, out)


@pytest.mark.parametrize("option", sorted(PREDICT))
def test_predict_options(option, data, tmp_path, capsys):
    for value in VALUES:
        out = tmp_path / f"out{value}"
        argv = ["predict", data / "model", data / "i", "--out", out, f"--{option}", value]
        _refused(capsys, argv, f"--{option}", out)


def test_the_api_refuses_the_same_values():
    for bad in (0, -1, math.nan, math.inf, True):
        with pytest.raises(BiounetError, match="`steps` must be"):
            configs_from_options({"steps": bad}, 1)
        with pytest.raises(BiounetError, match="memory_mb"):
            PredictConfig(memory_mb=bad if bad is not True else -1)


def test_bad_inputs_of_other_kinds(tmp_path, capsys, caplog):
    import logging

    import tifffile

    from biounet.io import read_image
    from biounet.masks import mask_to_classes

    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (48, 48)).astype(np.uint8)
    iio.imwrite(tmp_path / "i" / "a.png", image)
    iio.imwrite(tmp_path / "m" / "a.png", np.zeros((48, 48), np.uint8))
    tifffile.imwrite(tmp_path / "m" / "a.tif", np.zeros((48, 48), np.uint8))
    argv = ["train", "--images", tmp_path / "i", "--masks", tmp_path / "m", "--out"]
    argv += [tmp_path / "o", "--depth", "2", "--base-channels", "4", "--tile", "20"]
    assert main([str(a) for a in argv]) == 2  # two masks of one stem
    assert "same stem as a.png" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    (tmp_path / "m" / "a.tif").unlink()
    with caplog.at_level(logging.WARNING):  # masks without foreground: trains, but says so
        assert main([str(a) for a in [*argv, "--steps", "1", "--val-fraction", "0"]]) == 0
    assert "1 mask(s) hold no foreground: a" in caplog.text
    tifffile.imwrite(tmp_path / "huge.tif", np.full((8, 8), 1e300))
    with pytest.raises(BiounetError, match="beyond float32's range"):
        read_image(tmp_path / "huge.tif")
    labels = np.zeros((4, 4), np.int64)
    labels[0, 0] = 2**31
    with pytest.raises(BiounetError, match="instance label 2147483648 is beyond"):
        mask_to_classes(labels, "m.tif", "instances", 2)


def test_runs_that_cannot_fit_in_memory_are_refused_before_any_work(
    data, tmp_path, capsys, monkeypatch
):
    import biounet.predict
    import biounet.trainer

    monkeypatch.setattr(biounet.predict, "available_memory", lambda: 2**10)
    monkeypatch.setattr(biounet.trainer, "available_memory", lambda: 2**10)
    out = tmp_path / "p"
    argv = ["predict", data / "model", data / "i", "--out", out, "--tile", "40"]
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "GiB but 0.0 GiB are free; lower --tile or --batch-size" in err
    assert not out.exists()
    out = tmp_path / "t"
    argv = ["train", "--images", data / "i", "--masks", data / "m", "--out", out]
    assert main([str(a) for a in [*argv, "--depth", "2", "--base-channels", "4"]]) == 2
    assert "training with 1 tile(s) of 428 px needs about" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("base_channels", 100000, "parameters, more than the 2,000,000,000"),
        ("depth", 20, "depth must be <= 12"),
        ("depth", True, "depth must be an integer"),
        ("num_classes", 1000, "num_classes must be <= 256"),
    ],
)
def test_model_configs_that_cannot_be_built_are_refused(data, tmp_path, capsys, key, value, words):
    import json
    import shutil

    model = tmp_path / "m"
    shutil.copytree(data / "model", model)
    config = json.loads((model / "config.json").read_text())
    config[key] = value
    (model / "config.json").write_text(json.dumps(config))
    assert main(["info", str(model)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json: invalid model config" in err[0] and words in err[0]


def test_a_training_tile_far_beyond_memory_is_refused(data, tmp_path, capsys):
    out = tmp_path / "t"
    argv = ["train", "--images", data / "i", "--masks", data / "m", "--out", out]
    assert main([str(a) for a in [*argv, "--tile", "100000"]]) == 2
    assert "needs about" in capsys.readouterr().err and not out.exists()
