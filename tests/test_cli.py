import json
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import torch

from biounet.architecture import UNetConfig
from biounet.cli import main
from biounet.normalize import NormalizeConfig
from biounet.trainer import SEED_THRESHOLDS

TINY = ["--depth", "2", "--base-channels", "4"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def model_dir(tmp_path, capsys):
    path = tmp_path / "model"
    code, out, _ = run(capsys, "init", path, *TINY, "--seed", 1)
    assert code == 0 and "created untrained model" in out
    return path


def test_init_info_predict_end_to_end(model_dir, tmp_path, capsys):
    code, out, _ = run(capsys, "info", model_dir)
    assert code == 0
    assert '"depth": 2' in out and "margin per side: 20 px" in out
    from biounet.model import UNet

    expected = UNet(UNetConfig(depth=2, base_channels=4)).num_parameters()
    assert f"parameters: {expected:,}" in out
    assert "valid tiles (input->output): 44->4, 48->8, 52->12" in out
    images = tmp_path / "in"
    images.mkdir()
    iio.imwrite(images / "a.png", np.random.default_rng(0).integers(0, 255, (45, 67), np.uint8))
    tifffile.imwrite(
        images / "b.tif", np.random.default_rng(1).integers(0, 4095, (30, 20), np.uint16)
    )
    code, out, _ = run(
        capsys, "predict", model_dir, images, "--out", tmp_path / "masks", "--overlay", "--tile", 16
    )
    assert code == 0, out
    a = tifffile.imread(tmp_path / "masks" / "a.tif")
    assert a.shape == (45, 67) and a.dtype == np.uint8 and a.max() <= 1
    assert tifffile.imread(tmp_path / "masks" / "b.tif").shape == (30, 20)
    overlay = iio.imread(tmp_path / "masks" / "a_overlay.png")
    assert overlay.shape == (45, 67, 3)
    code, _, _ = run(
        capsys,
        "predict",
        model_dir,
        str(images / "*.png"),
        "--out",
        tmp_path / "probs",
        "--output",
        "prob",
        "--precision",
        "fp32",
    )
    assert code == 0
    probs = tifffile.imread(tmp_path / "probs" / "a.tif")
    assert probs.shape == (2, 45, 67) and probs.dtype == np.float32
    assert np.allclose(probs.sum(0), 1, atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "probs").iterdir()) == ["a.tif"]


def test_train_then_predict_via_the_console_script(disk_folders, tmp_path):
    images, masks = disk_folders
    model = tmp_path / "trained"
    cmd = [
        sys.executable,
        "-m",
        "biounet",
        "train",
        "--images",
        str(images),
        "--masks",
        str(masks),
        "--out",
        str(model),
        *TINY,
        "--steps",
        "4",
        "--tile",
        "28",
        "--val-every",
        "2",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "trained 4 steps" in done.stdout
    config = json.loads((model / "config.json").read_text())
    for key in (
        "depth",
        "base_channels",
        "in_channels",
        "num_classes",
        "padding",
        "class_names",
        "normalization",
        "training",
    ):
        assert key in config
    assert config["training"]["command"].startswith("biounet train --images")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "biounet",
            "predict",
            str(model),
            str(images / "img0.png"),
            "--out",
            str(tmp_path / "p"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert tifffile.imread(tmp_path / "p" / "img0.tif").shape == (96, 120)


# -- bad input: one line naming the file, exit 2, no traceback, nothing written -------------


def _bad(capsys, tmp_path, argv, names, out_dir=None):
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("biounet: error: "), err
    assert "Traceback" not in err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    if out_dir is not None:
        leftovers = (
            [p for p in Path(out_dir).rglob("*") if p.is_file()] if Path(out_dir).exists() else []
        )
        assert leftovers == [], leftovers
    return lines[0]


@pytest.fixture
def train_args(disk_folders, tmp_path):
    images, masks = disk_folders
    return [
        "train",
        "--images",
        images,
        "--masks",
        masks,
        "--out",
        tmp_path / "new",
        *TINY,
        "--steps",
        "1",
        "--tile",
        "28",
    ]


def test_bad_missing_input_path(model_dir, tmp_path, capsys):
    _bad(
        capsys,
        tmp_path,
        ["predict", model_dir, tmp_path / "nope.png", "--out", tmp_path / "o"],
        ["nope.png", "no such file"],
        tmp_path / "o",
    )


def test_bad_empty_folder(model_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _bad(
        capsys,
        tmp_path,
        ["predict", model_dir, tmp_path / "empty", "--out", tmp_path / "o"],
        ["empty", "no images found"],
        tmp_path / "o",
    )


def test_bad_image_without_mask(train_args, disk_folders, tmp_path, capsys):
    images, _ = disk_folders
    iio.imwrite(images / "extra.png", np.zeros((96, 120), np.uint8))
    _bad(capsys, tmp_path, train_args, ["extra.png", "no mask named extra"], tmp_path / "new")


def test_bad_image_mask_size_mismatch(train_args, disk_folders, tmp_path, capsys):
    _, masks = disk_folders
    iio.imwrite(masks / "img1.png", np.zeros((50, 50), np.uint8))
    _bad(capsys, tmp_path, train_args, ["img1.png", "50x50", "96x120"], tmp_path / "new")


def test_bad_truncated_image(model_dir, tmp_path, capsys):
    path = tmp_path / "cut.png"
    iio.imwrite(path, np.zeros((64, 64), np.uint8))
    path.write_bytes(path.read_bytes()[:40])
    _bad(
        capsys,
        tmp_path,
        ["predict", model_dir, path, "--out", tmp_path / "o"],
        ["cut.png", "cannot be read"],
        tmp_path / "o",
    )


def test_bad_3d_stack(model_dir, tmp_path, capsys):
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((10, 32, 32), np.uint8))
    _bad(
        capsys,
        tmp_path,
        ["predict", model_dir, tmp_path / "stack.tif", "--out", tmp_path / "o"],
        ["stack.tif", "3-D stack"],
        tmp_path / "o",
    )


def test_bad_nan_values(model_dir, tmp_path, capsys):
    a = np.zeros((32, 32), np.float32)
    a[3, 3] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", a)
    _bad(
        capsys,
        tmp_path,
        ["predict", model_dir, tmp_path / "nan.tif", "--out", tmp_path / "o"],
        ["nan.tif", "NaN"],
        tmp_path / "o",
    )


def test_bad_mask_with_more_values_than_classes(train_args, disk_folders, tmp_path, capsys):
    _, masks = disk_folders
    iio.imwrite(masks / "img2.png", (np.arange(96 * 120).reshape(96, 120) % 3).astype(np.uint8))
    _bad(
        capsys,
        tmp_path,
        [*train_args, "--mask-type", "binary"],
        ["img2.png", "at most two values, found 3"],
        tmp_path / "new",
    )
    # As class indices, the 0/255 masks are already wrong (the first one is named).
    _bad(
        capsys,
        tmp_path,
        [*train_args, "--mask-type", "classes"],
        ["img0.png", "values 0, 255 are not all class indices 0..1"],
        tmp_path / "new",
    )


def test_bad_unknown_model_directory(tmp_path, capsys):
    (tmp_path / "notamodel").mkdir()
    iio.imwrite(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    _bad(
        capsys,
        tmp_path,
        ["predict", tmp_path / "notamodel", tmp_path / "a.png", "--out", tmp_path / "o"],
        ["notamodel", "config.json"],
        tmp_path / "o",
    )
    _bad(capsys, tmp_path, ["info", tmp_path / "missing"], ["missing", "no such model"])


def test_bad_incomplete_model_directory(model_dir, tmp_path, capsys):
    (model_dir / "weights.safetensors").unlink()
    _bad(capsys, tmp_path, ["info", model_dir], ["weights.safetensors", "incomplete"])
    (model_dir / "config.json").write_text('{"depth": 2}')
    _bad(capsys, tmp_path, ["info", model_dir], ["config.json", "missing base_channels"])


def test_bad_corrupt_weights(model_dir, tmp_path, capsys):
    weights = model_dir / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    _bad(capsys, tmp_path, ["info", model_dir], ["weights.safetensors", "corrupt"])


def test_bad_weights_of_another_architecture(model_dir, tmp_path, capsys):
    config = json.loads((model_dir / "config.json").read_text())
    config["base_channels"] = 8
    (model_dir / "config.json").write_text(json.dumps(config))
    _bad(capsys, tmp_path, ["info", model_dir], ["weights.safetensors", "do not match"])


def test_bad_output_path_under_a_regular_file(model_dir, tmp_path, capsys):
    iio.imwrite(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "file").write_text("a regular file")
    _bad(
        capsys,
        tmp_path,
        ["predict", model_dir, tmp_path / "a.png", "--out", tmp_path / "file" / "sub"],
        ["file", "cannot create"],
    )
    assert (tmp_path / "file").read_text() == "a regular file"


def test_bad_tile_too_small(model_dir, tmp_path, capsys):
    iio.imwrite(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    line = _bad(
        capsys,
        tmp_path,
        ["predict", model_dir, tmp_path / "a.png", "--out", tmp_path / "o", "--tile", 3],
        ["tile size 3"],
        tmp_path / "o",
    )
    assert "smallest valid tile is 4" in line


def test_bad_memory_budget(model_dir, tmp_path, capsys):
    iio.imwrite(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    _bad(
        capsys,
        tmp_path,
        ["predict", model_dir, tmp_path / "a.png", "--out", tmp_path / "o", "--memory-mb", 0],
        ["memory budget must be > 0"],
        tmp_path / "o",
    )


def test_bad_channel_count(model_dir, tmp_path, capsys):
    iio.imwrite(tmp_path / "rgb.png", np.zeros((16, 16, 3), np.uint8))
    _bad(
        capsys,
        tmp_path,
        ["predict", model_dir, tmp_path / "rgb.png", "--out", tmp_path / "o"],
        ["rgb.png", "3 channel"],
        tmp_path / "o",
    )


def test_bad_input_leaves_earlier_outputs_untouched_and_nothing_partial(
    model_dir, tmp_path, capsys
):
    iio.imwrite(tmp_path / "good.png", np.zeros((16, 16), np.uint8))
    (tmp_path / "bad.png").write_bytes(b"garbage")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "good.tif").write_bytes(b"an earlier result")
    code, _, err = run(
        capsys,
        "predict",
        model_dir,
        tmp_path / "good.png",
        tmp_path / "bad.png",
        "--out",
        tmp_path / "o",
    )
    assert code == 2 and "bad.png" in err
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["good.tif"]
    assert (tmp_path / "o" / "good.tif").read_bytes() == b"an earlier result"


def test_bad_output_would_overwrite_an_input(model_dir, tmp_path, capsys):
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((16, 16), np.uint8))
    _bad(
        capsys,
        tmp_path,
        ["predict", model_dir, tmp_path / "a.tif", "--out", tmp_path],
        ["a.tif", "overwrite an input"],
    )
    assert tifffile.imread(tmp_path / "a.tif").shape == (16, 16)


def test_bad_validation_images_without_masks(train_args, disk_folders, tmp_path, capsys):
    images, _ = disk_folders
    _bad(capsys, tmp_path, [*train_args, "--val-images", images], ["--val-masks"], tmp_path / "new")


def test_bad_negative_elastic_std_is_a_clean_error(train_args, tmp_path, capsys):
    _bad(capsys, tmp_path, [*train_args, "--elastic-std", "-1"], ["--elastic-std"])


def test_bad_device_cuda_without_a_gpu(train_args, model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _bad(capsys, tmp_path, [*train_args, "--device", "cuda"], ["--device cuda"], tmp_path / "new")
    image = tmp_path / "x.png"
    iio.imwrite(image, np.zeros((20, 20), np.uint8))
    predict = ["predict", model_dir, image, "--out", tmp_path / "o", "--device", "cuda"]
    _bad(capsys, tmp_path, predict, ["--device cuda"], tmp_path / "o")


def test_bad_negative_dice_is_a_clean_error(train_args, tmp_path, capsys):
    _bad(capsys, tmp_path, [*train_args, "--dice", "-1"], ["--dice", "-1"], tmp_path / "new")


def test_dice_flag_reaches_the_training_config(train_args, tmp_path, capsys):
    code, _, err = run(capsys, *train_args, "--dice", "0.5", "--precision", "fp32")
    assert code == 0, err
    training = json.loads((tmp_path / "new" / "config.json").read_text())["training"]
    assert training["train_config"]["dice"] == 0.5


def test_device_flag_reaches_training_and_prediction(train_args, tmp_path, capsys, monkeypatch):
    code, _, err = run(capsys, *train_args, "--device", "cpu", "--precision", "fp32")
    assert code == 0, err
    training = json.loads((tmp_path / "new" / "config.json").read_text())["training"]
    assert (training["device"], training["precision"]) == ("cpu", "fp32")
    import biounet.predict

    seen = {}

    def fake_predict_files(model_dir, inputs, out, config, device=None, **kwargs):
        seen["device"] = device
        return []

    monkeypatch.setattr(biounet.predict, "predict_files", fake_predict_files)
    code, _, err = run(
        capsys, "predict", tmp_path / "new", tmp_path, "--out", tmp_path / "o", "--device", "cpu"
    )
    assert code == 0, err
    assert seen["device"] == torch.device("cpu")


def test_relative_data_paths_are_found_under_biounet_data(
    disk_folders, tmp_path, capsys, monkeypatch
):
    images, masks = disk_folders
    monkeypatch.setenv("BIOUNET_DATA", str(images.parent))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # "images" and "masks" do not exist from here
    code, out, err = run(
        capsys,
        "train",
        "--images",
        "images",
        "--masks",
        "masks",
        "--out",
        tmp_path / "m",
        *TINY,
        "--steps",
        1,
        "--tile",
        28,
    )
    assert code == 0, err
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["training"]["images"] == str(images)


def test_weights_command_writes_the_map_and_its_picture(tmp_path, capsys):
    cells = np.zeros((40, 60), np.uint16)
    cells[10:30, 5:29] = 1
    cells[10:30, 29:55] = 2  # two touching cells: carved apart, high weight between
    tifffile.imwrite(tmp_path / "cells.tif", cells)
    code, out, _ = run(capsys, "weights", tmp_path / "cells.tif", "--out", tmp_path / "w.tif")
    assert code == 0, out
    w = tifffile.imread(tmp_path / "w.tif")
    assert w.dtype == np.float32 and w.shape == (40, 60)
    assert w[20, 28:30].min() > 5  # the carved contact line carries the border term
    assert w[20, 15] < 2 and w[2, 2] < 2
    code, _, _ = run(capsys, "weights", tmp_path / "cells.tif", "--out", tmp_path / "w.png")
    assert code == 0 and iio.imread(tmp_path / "w.png").ndim == 3
    _bad(
        capsys,
        tmp_path,
        ["weights", tmp_path / "cells.tif", "--out", tmp_path / "w.jpg"],
        ["w.jpg", ".png"],
    )


def test_augment_command_draws_a_grid(disk_folders, tmp_path, capsys):
    images, masks = disk_folders
    code, out, _ = run(
        capsys,
        "augment",
        images / "img0.png",
        masks / "img0.png",
        "--out",
        tmp_path / "grid.png",
        "--count",
        3,
    )
    assert code == 0 and "3 augmented" in out
    grid = iio.imread(tmp_path / "grid.png")
    assert grid.ndim == 3 and grid.shape[1] > grid.shape[0]


def test_real_data_reads_and_weights(shared_data, tmp_path, capsys):
    """BBBC039: 16-bit images, uint16 instance masks detected as instances."""
    from biounet.data import DataConfig, load_sample

    mask = sorted((shared_data / "bbbc039" / "masks").iterdir())[0]
    image = shared_data / "bbbc039" / "images" / f"{mask.stem}.tif"
    sample = load_sample(image, mask, UNetConfig(), NormalizeConfig(), DataConfig())
    assert sample.image.shape == (1, 520, 696)
    assert sample.instances.max() > 50  # ~118 nuclei per image
    assert sample.weights.max() > 5  # touching nuclei get the border term
    isbi = shared_data / "isbi2012"
    code, _, _ = run(
        capsys,
        "weights",
        isbi / "labels" / "00.png",
        "--foreground",
        0,
        "--cell-class",
        0,
        "--out",
        tmp_path / "isbi.tif",
    )
    assert code == 0
    assert tifffile.imread(tmp_path / "isbi.tif").shape == (512, 512)


def test_instance_output_from_a_model_trained_on_instance_masks(tmp_path, capsys):
    """Train on instance masks -> config says how to post-process -> labels 1..N."""
    from .conftest import disk_image, disks

    rng = np.random.default_rng(3)
    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    for k in range(3):
        labels = disks((80, 96), rng, count=5)
        iio.imwrite(tmp_path / "i" / f"c{k}.png", disk_image(labels, rng))
        tifffile.imwrite(tmp_path / "m" / f"c{k}.tif", labels.astype(np.uint16))
    code, out, err = run(
        capsys,
        "train",
        "--images",
        tmp_path / "i",
        "--masks",
        tmp_path / "m",
        "--out",
        tmp_path / "model",
        *TINY,
        "--steps",
        2,
        "--tile",
        28,
    )
    assert code == 0, err
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    post = config["postprocess"]["instances"]
    assert post["border_class"] is None and post["seed_threshold"] in SEED_THRESHOLDS
    # The third-class variant trains too: contacts become class 2 of a 3-class model.
    args3 = [
        "train",
        "--images",
        tmp_path / "i",
        "--masks",
        tmp_path / "m",
        "--out",
        tmp_path / "model3",
        *TINY,
        "--classes",
        3,
        "--touching",
        "class",
        "--steps",
        1,
        "--tile",
        28,
    ]
    code, out, err = run(capsys, *args3)
    assert code == 0, err
    post = json.loads((tmp_path / "model3" / "config.json").read_text())["postprocess"]
    assert post["instances"]["border_class"] == 2
    code, out, err = run(
        capsys,
        "predict",
        tmp_path / "model",
        tmp_path / "i" / "c0.png",
        "--out",
        tmp_path / "pred",
        "--output",
        "instances",
        "--overlay",
    )
    assert code == 0, err
    labels = tifffile.imread(tmp_path / "pred" / "c0.tif")
    assert labels.dtype == np.uint16 and labels.shape == (80, 96)
    ids = np.unique(labels[labels > 0])
    assert np.array_equal(ids, np.arange(1, len(ids) + 1))  # consecutive (may be empty)
    assert iio.imread(tmp_path / "pred" / "c0_overlay.png").shape == (80, 96, 3)


def test_stream_writes_instances_but_refuses_probabilities(model_dir, tmp_path, capsys):
    image = np.random.default_rng(0).integers(0, 255, (70, 90)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", image)
    argv = ["predict", model_dir, tmp_path / "a.tif", "--out", tmp_path / "o", "--stream"]
    code, _, err = run(capsys, *argv, "--output", "instances", "--instance-margin", "40")
    assert code == 0, err
    labels = tifffile.imread(tmp_path / "o" / "a.tif")
    assert labels.shape == (70, 90) and labels.dtype == np.uint16
    code, _, err = run(capsys, *argv[:-1], "--out", tmp_path / "m", "--output", "instances")
    assert code == 0, err
    np.testing.assert_array_equal(labels, tifffile.imread(tmp_path / "m" / "a.tif"))
    code, _, err = run(capsys, *argv, "--output", "instances", "--instance-margin", "20")
    assert code == 2 and "margin 20 px must exceed" in err
    _bad(capsys, tmp_path, [*argv, "--output", "prob"], ["--stream", "--output prob"])
