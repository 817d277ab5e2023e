"""The Python interface: `biounet.load`, `Model.predict`, `biounet.models`, lazy imports."""

import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile

import biounet
from biounet.cli import main
from biounet.errors import BiounetError

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_example() -> str:
    text = README.read_text()
    section = text[text.index("## From Python") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs_and_matches_the_cli(shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = _readme_example().replace('DATA = "../shared/data"', f'DATA = "{shared_data}"')
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    mask, probs, labels = scope["mask"], scope["probs"], scope["labels"]
    assert mask.shape == (512, 512) and mask.dtype == np.uint8
    assert probs.shape == (2, 512, 512) and probs.dtype == np.float32
    assert labels.dtype == np.uint16 and labels.max() > 50
    # The CLI writes the same values and dtypes for the same files.
    em_file = shared_data / "isbi2012/test_images/00.png"
    nuclei_file = next(p for p in (shared_data / "bbbc039/images").iterdir() if p.name in code)
    assert main(["predict", "isbi2012", str(em_file), "--out", "em"]) == 0
    assert (
        main(["predict", "bbbc039", str(nuclei_file), "--out", "n", "--output", "instances"]) == 0
    )
    capsys.readouterr()
    cli_mask = tifffile.imread(tmp_path / "em" / "00.tif")
    cli_labels = tifffile.imread(tmp_path / "n" / f"{nuclei_file.stem}.tif")
    assert cli_mask.dtype == mask.dtype and np.array_equal(cli_mask, mask)
    assert cli_labels.dtype == labels.dtype and np.array_equal(cli_labels, labels)
    # save, then load: the same predictions.
    again = biounet.load(tmp_path / "em_copy").predict(scope["image"])
    assert np.array_equal(again, mask)


@pytest.fixture
def rgb_model(tmp_path, capsys):
    path = tmp_path / "rgb"
    argv = ["init", path, "--depth", "2", "--base-channels", "4", "--in-channels", "3"]
    assert main([str(a) for a in argv]) == 0
    capsys.readouterr()
    return biounet.load(path, precision="fp32")


def test_any_channel_layout_gives_the_same_answer(rgb_model):
    rng = np.random.default_rng(0)
    first = rng.integers(0, 255, (3, 37, 45)).astype(np.uint8)
    kept = first.copy()
    reference = rgb_model.predict(first, output="prob")
    assert reference.shape == (2, 37, 45)
    last = np.moveaxis(first, 0, -1)
    assert np.array_equal(rgb_model.predict(last, output="prob"), reference)
    middle = np.moveaxis(first, 0, 1)  # (37, 3, 45)
    assert np.array_equal(rgb_model.predict(middle, output="prob", channel_axis=1), reference)
    assert np.array_equal(rgb_model.predict(first[None], output="prob"), reference)
    assert np.array_equal(first, kept)  # the caller's array is untouched
    with pytest.raises(BiounetError, match=r"shape \(37, 45\); .*\(3, H, W\) or \(H, W, 3\)"):
        rgb_model.predict(first[0])


def test_gray_arrays_of_any_real_dtype(tmp_path, capsys):
    assert main(["init", str(tmp_path / "g"), "--depth", "2", "--base-channels", "4"]) == 0
    capsys.readouterr()
    model = biounet.load(tmp_path / "g", precision="fp32")
    image = np.random.default_rng(1).integers(0, 2, (40, 52)).astype(bool)
    mask = model.predict(image)
    assert mask.shape == (40, 52) and mask.dtype == np.uint8
    assert np.array_equal(mask, model.predict(image.astype(np.float64)))
    with pytest.raises(TypeError, match="real numbers, not complex128"):
        model.predict(image.astype(complex))
    with pytest.raises(BiounetError, match="NaN or infinite"):
        model.predict(np.full((40, 52), np.nan))
    with pytest.raises(BiounetError, match="output must be one of mask, prob, instances"):
        model.predict(image, output="labels")
    seen = []
    model.predict(image, progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1][0] == seen[-1][1]


def test_predict_from_threads_equals_predict_in_sequence(rgb_model):
    images = [np.random.default_rng(i).normal(100, 20, (3, 50, 61)) for i in range(4)]
    expected = [rgb_model.predict(im, output="prob") for im in images]
    found: dict = {}

    def work(i):
        found[i] = rgb_model.predict(images[i], output="prob")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(found[i], expected[i]) for i in range(4))


def test_model_properties_and_unknown_names(rgb_model):
    assert rgb_model.classes == ("background", "foreground")
    assert rgb_model.in_channels == 3 and rgb_model.margin == 20
    assert rgb_model.valid_tiles(24) == [(44, 4), (48, 8), (52, 12), (56, 16), (60, 20), (64, 24)]
    assert rgb_model.training["note"] == "untrained (He init)"
    rgb_model.training["note"] = "changed"  # a copy
    assert rgb_model.training["note"] == "untrained (He init)"
    with pytest.raises(BiounetError, match=r"nosuch: .*known: "):
        biounet.load("nosuch")


def test_shipped_models_are_listed_by_name():
    found = biounet.models()
    if not found:
        pytest.skip("no shipped models in this installation")
    assert set(found) >= {"isbi2012", "bbbc039"}
    assert all(isinstance(v, str) and v for v in found.values())


def test_import_and_the_parser_do_not_import_torch():
    code = (
        "import sys, biounet, biounet.cli; biounet.cli.build_parser();"
        "assert biounet.BiounetError; print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def _disk_arrays(count=4, shape=(72, 80)):
    from .conftest import disk_image, disks

    rng = np.random.default_rng(0)
    labels = [disks(shape, rng, count=4, radius=(6, 12)) for _ in range(count)]
    return [disk_image(lab, rng) for lab in labels], [(lab > 0).astype(np.uint8) for lab in labels]


TINY_TRAINING = {"steps": 3, "depth": 2, "base_channels": 4, "tile": 28, "precision": "fp32"}


def test_train_from_arrays_writes_nothing(tmp_path, monkeypatch):
    import tempfile

    images, masks = _disk_arrays()
    monkeypatch.chdir(tmp_path)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    model = biounet.train(images, masks, **TINY_TRAINING)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]
    assert [p for p in scratch.rglob("*") if p.is_file()] == []  # torch may make a cache dir
    assert model.training["steps_done"] == 3
    assert model.training["val_files"] == ["images[3]"]
    mask = model.predict(images[0])
    assert mask.shape == images[0].shape and mask.dtype == np.uint8
    model.save(tmp_path / "saved")
    again = biounet.load(tmp_path / "saved", precision=model.precision)
    assert np.array_equal(again.predict(images[0]), mask)


def test_train_with_out_writes_what_the_cli_writes(disk_folders, tmp_path, capsys):
    from safetensors.torch import load_file

    images, masks = disk_folders
    model = biounet.train(images, masks, out=tmp_path / "api", **TINY_TRAINING)
    argv = ["train", "--images", images, "--masks", masks, "--out", tmp_path / "cli"]
    for key, value in TINY_TRAINING.items():
        argv += ["--" + key.replace("_", "-"), value]
    assert main([str(a) for a in argv]) == 0
    capsys.readouterr()
    names = {p.relative_to(tmp_path / "api") for p in (tmp_path / "api").rglob("*")}
    assert names == {p.relative_to(tmp_path / "cli") for p in (tmp_path / "cli").rglob("*")}
    api = load_file(str(tmp_path / "api" / "weights.safetensors"))
    cli = load_file(str(tmp_path / "cli" / "weights.safetensors"))
    assert all(np.array_equal(api[k].numpy(), cli[k].numpy()) for k in cli)
    assert model.source == tmp_path / "api"
    with pytest.raises(BiounetError, match="already holds a model"):
        biounet.train(images, masks, out=tmp_path / "api", **TINY_TRAINING)


def test_train_refuses_unknown_options_naming_the_nearest():
    images, masks = _disk_arrays(2)
    with pytest.raises(TypeError, match="unknown training option 'step'; did you mean 'steps'"):
        biounet.train(images, masks, step=3)
    with pytest.raises(BiounetError, match="2 images but 1 masks"):
        biounet.train(images, masks[:1], steps=1)


def test_train_starts_from_a_model(tmp_path):
    images, masks = _disk_arrays(3)
    first = biounet.train(images, masks, **TINY_TRAINING)
    second = biounet.train(images, masks, init=first, steps=1, tile=28, precision="fp32")
    assert second.config == first.config
    assert not np.array_equal(
        second.predict(images[0], output="prob"), first.predict(images[0], output="prob")
    )


def test_training_from_a_model_drops_what_was_chosen_for_its_weights(tmp_path):
    import json

    images, masks = _disk_arrays(2)
    biounet.train(images, masks, **TINY_TRAINING).save(tmp_path / "first")
    config = json.loads((tmp_path / "first" / "config.json").read_text())
    config["postprocess"] = {"tta": True, "membranes": {"seed_threshold": 0.2}}
    (tmp_path / "first" / "config.json").write_text(json.dumps(config))
    second = biounet.train(images, masks, init=str(tmp_path / "first"), steps=1, tile=28,
                           precision="fp32")  # fmt: skip
    second.save(tmp_path / "second")
    stored = json.loads((tmp_path / "second" / "config.json").read_text())["postprocess"]
    assert not stored or not ({"tta", "membranes"} & set(stored))


def test_the_wheel_carries_the_shipped_models(tmp_path):
    """An installed wheel finds the models by name: they travel as its data files; napari
    finds the plugin's manifest."""
    import zipfile

    root = README.parent
    if not (root / "models" / "isbi2012" / "weights.safetensors").is_file():
        pytest.skip("no shipped models in this checkout")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*cmd, "-w", str(tmp_path), str(root)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("biounet-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for model in ("isbi2012", "bbbc039"):
        for name in ("config.json", "weights.safetensors", "README.md"):
            data = f"biounet-{biounet.__version__}.data/data/share/biounet/models/{model}/{name}"
            assert data in names, data
    # the napari plugin's manifest, and the entry point napari finds it by
    assert "biounet/napari/napari.yaml" in names
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "biounet = biounet.napari:napari.yaml" in zipfile.ZipFile(wheel).read(entry).decode()


@pytest.mark.parametrize("shape", [(1, 53), (37, 1), (1, 1), (1, 1, 9)])
def test_thin_images_keep_their_two_axes(tmp_path, capsys, shape):
    assert main(["init", str(tmp_path / "g"), "--depth", "2", "--base-channels", "4"]) == 0
    capsys.readouterr()
    model = biounet.load(tmp_path / "g", precision="fp32")
    mask = model.predict(np.random.default_rng(0).integers(0, 255, shape).astype(np.uint8))
    assert mask.shape == shape[-2:]


def test_train_refuses_architecture_options_beside_init():
    images, masks = _disk_arrays(3)
    first = biounet.train(images, masks, **TINY_TRAINING)
    with pytest.raises(BiounetError, match="init= gives the architecture; drop `depth`"):
        biounet.train(images, masks, init=first, depth=3, steps=1)
