"""The command line's wording, names and edge cases: flags in messages, model names beside
data folders, --stream with other formats, info --json -, refused option values."""

import json

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from biounet.cli import main
from biounet.cli.common import as_flags

TINY = ["--depth", "2", "--base-channels", "4"]


@pytest.fixture
def model_dir(tmp_path, capsys):
    path = tmp_path / "model"
    assert main(["init", str(path), *TINY, "--seed", "1"]) == 0
    capsys.readouterr()
    return path


@pytest.mark.parametrize(
    ("message", "worded"),
    [
        ("steps must be >= 1", "--steps must be >= 1"),
        ("num_workers must be >= 0, not -1", "--workers must be >= 0, not -1"),
        ("use `tile` 44 or larger", "use --tile 44 or larger"),
        ("drop `output` prob, `tta` and `overlay`", "drop --output prob, --tta and --overlay"),
        ("lower `border_w0`", "lower --w0"),
        # file names and config.json keys stay as they are
        ("lr=0.01: already holds a model", "lr=0.01: already holds a model"),
        ("seed=3/img.tif: no such file", "seed=3/img.tif: no such file"),
        (
            "m/config.json: missing base_channels, padding",
            "m/config.json: missing base_channels, padding",
        ),
    ],
)
def test_library_messages_are_worded_as_flags(message, worded):
    assert as_flags(message) == worded


def test_stream_applies_to_tiffs_and_leaves_other_formats_whole(model_dir, tmp_path, capsys):
    images = tmp_path / "in"
    images.mkdir()
    rng = np.random.default_rng(0)
    tifffile.imwrite(images / "a.tif", rng.integers(0, 255, (40, 50)).astype(np.uint8))
    iio.imwrite(images / "b.png", rng.integers(0, 255, (40, 50)).astype(np.uint8))
    argv = ["predict", model_dir, images, "--out", tmp_path / "o", "--stream", "--tile", "16"]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a.tif", "b.tif"]


def test_negative_workers_are_refused_before_anything_is_written(tmp_path, capsys):
    from .conftest import write_disk_pairs

    write_disk_pairs(tmp_path / "i", tmp_path / "m", 2, (60, 60))
    argv = ["train", "--images", tmp_path / "i", "--masks", tmp_path / "m", "--out"]
    argv += [tmp_path / "new", *TINY, "--workers", "-1"]
    assert main([str(a) for a in argv]) == 2
    assert "--workers must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_info_json_to_standard_output_is_valid_json(model_dir, capsys):
    assert main(["info", str(model_dir), "--json", "-"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["depth"] == 2
    assert "margin per side: 20 px" in err  # the summary, beside it on standard error


def test_a_shipped_name_is_found_beside_a_data_folder_of_that_name(tmp_path, monkeypatch, capsys):
    import biounet

    if "isbi2012" not in biounet.models():
        pytest.skip("no shipped models in this installation")
    (tmp_path / "isbi2012" / "images").mkdir(parents=True)  # a data folder, not a model
    monkeypatch.chdir(tmp_path)
    assert main(["info", "isbi2012"]) == 0
    assert "interior" in capsys.readouterr().out
    assert biounet.load("isbi2012", precision="fp32").classes == ("interior", "membrane")
