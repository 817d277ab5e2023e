"""Block-wise prediction (dask graphs, zarr and OME-Zarr in and out) equals one process.

Known answers: the in-memory overlap-tile result of the same network, bit for bit, for many
block layouts (blocks forced small), both paddings, three outputs; exact percentiles from
value counts against numpy's.
"""

import json

import dask.array as da
import numpy as np
import pytest
import tifffile
import torch
import zarr

from biounet import graph
from biounet.api import Model
from biounet.architecture import UNetConfig
from biounet.cli import main
from biounet.errors import BiounetError
from biounet.instances import InstanceConfig, instances_in_chunks
from biounet.io_zarr import open_zarr_image
from biounet.model import UNet
from biounet.modeldir import ModelInfo, save_model
from biounet.normalize import (
    merge_counts,
    normalization_params,
    percentiles_from_counts,
    value_counts,
)

from .conftest import disk_image, disks


def test_percentiles_from_counts_are_numpys():
    rng = np.random.default_rng(0)
    for trial in range(400):
        dtype = [np.uint8, np.uint16, np.int16, np.int32, np.int8][trial % 5]
        info = np.iinfo(dtype)
        lo = int(rng.integers(info.min, info.max))
        x = rng.integers(lo, info.max, size=int(rng.integers(1, 2000)), endpoint=True)
        x = x.astype(dtype)
        q = [*rng.uniform(0, 100, 3), 0.0, 1.0, 99.8, 100.0]
        values, counts = value_counts(x[None, None])[0]
        assert np.array_equal(percentiles_from_counts(values, counts, q), np.percentile(x, q))
        half = len(x) // 2
        parts = value_counts(x[None, None, :half]), value_counts(x[None, None, half:])
        merged = merge_counts(*parts)
        assert np.array_equal(percentiles_from_counts(*merged[0], q), np.percentile(x, q))


def test_integer_normalisation_unchanged():
    """Counting instead of sorting gives the float32 statistics numpy's percentile gives."""
    from biounet.normalize import NormalizeConfig

    rng = np.random.default_rng(1)
    image = rng.integers(0, 4096, (2, 150, 170)).astype(np.uint16)
    offset, scale = normalization_params(image, NormalizeConfig())
    lo, hi = np.percentile(image.reshape(2, -1), [1.0, 99.8], axis=1)
    assert np.array_equal(offset, lo.astype(np.float32))
    assert np.array_equal(scale, (hi - lo).astype(np.float32))


def _model(padding="valid", classes=2, seed=0) -> Model:
    torch.manual_seed(seed)
    net = UNetConfig(depth=2, base_channels=4, num_classes=classes, padding=padding)
    names = ("background", "cell", "border")[:classes]
    post = {"instances": {"seed_threshold": 0.5}} if classes == 2 else None
    return Model(UNet(net), ModelInfo(net, names, postprocess=post), device="cpu",
                 precision="fp32")  # fmt: skip


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(graph, "BLOCK_PX", 40)  # many blocks, some of a single tile


@pytest.mark.parametrize(
    ("padding", "shape", "tile", "batch"),
    [("valid", (157, 203), 24, 1), ("valid", (90, 61), 40, 2), ("same", (131, 149), 32, 1)],
)
def test_blocks_equal_one_process(small_blocks, padding, shape, tile, batch):
    model = _model(padding)
    rng = np.random.default_rng(2)
    image = disk_image(disks(shape, rng, count=12, radius=(5, 9)), rng)
    lazy = da.from_array(image, chunks=(37, 53))  # chunks unrelated to the blocks
    for output in ("prob", "mask", "instances"):
        want = model.predict(image, output, tile=tile, batch_size=batch)
        got = model.predict(lazy, output, tile=tile, batch_size=batch)
        assert isinstance(got, da.Array)
        for sizes in got.chunks[-2:]:  # regular, as zarr and da.to_zarr take them
            assert set(sizes[:-1]) <= {sizes[0]} and sizes[-1] <= sizes[0]
        got = got.compute(scheduler="synchronous")
        assert got.shape == want.shape
        assert np.array_equal(got, want), output


def test_blocks_equal_one_process_with_membrane_lines(small_blocks):
    """A stored membrane post-processing: each block's mask from a window of probabilities
    `instance_margin` (128) px wider, as one process makes it."""
    torch.manual_seed(1)
    net = UNetConfig(depth=2, base_channels=4)
    post = {"membranes": {"seed_threshold": 0.45, "min_seed": 4}}
    model = Model(UNet(net), ModelInfo(net, ("interior", "membrane"), postprocess=post),
                  device="cpu", precision="fp32")  # fmt: skip
    image = np.random.default_rng(6).integers(0, 255, (300, 410)).astype(np.uint8)
    want = model.predict(image, "mask", tile=56)
    assert (want != model.predict(image, "prob", tile=56).argmax(0)).sum() > 20
    got = model.predict(da.from_array(image, chunks=(40, 40)), "mask", tile=56)
    assert len(got.chunks[0]) >= 2 and len(got.chunks[1]) >= 3  # blocks of >= 129 px
    assert np.array_equal(got.compute(scheduler="synchronous"), want)


def test_blocks_equal_one_process_float_and_channels(small_blocks):
    torch.manual_seed(3)
    net = UNetConfig(depth=2, base_channels=4, in_channels=2)
    model = Model(UNet(net), ModelInfo(net, ("background", "cell")), device="cpu",
                  precision="fp32")  # fmt: skip
    image = np.random.default_rng(4).normal(size=(77, 95, 2)).astype(np.float32)
    want = model.predict(image, "prob", tile=24)
    got = model.predict(da.from_array(image, chunks=(30, 30, 2)), "prob", tile=24)
    assert np.array_equal(got.compute(scheduler="threads"), want)


def test_instances_graph_equals_chunked_labelling():
    """Also where clumps are wider than the margin (the chunked result is defined there)."""
    rng = np.random.default_rng(5)
    labels = disks((130, 150), rng, count=30, radius=(6, 14))
    p = np.where(labels > 0, 0.9, 0.1).astype(np.float32)
    probs = np.stack([1 - p, p])
    config = InstanceConfig(seed_threshold=0.5, fill_holes=False)
    for margin, chunk in ((8, 32), (40, 45)):
        want = np.zeros(labels.shape, np.uint32)
        instances_in_chunks(probs, want, config, chunk=chunk, margin=margin)
        got = graph.instances_graph(da.from_array(probs, chunks=(2, chunk, chunk)), config, margin)
        assert np.array_equal(got.compute(scheduler="synchronous"), want)
    with pytest.raises(BiounetError, match="wider than the instance margin"):
        graph.instances_graph(da.from_array(probs, chunks=(2, 20, 20)), config, 20)


def test_nan_in_a_dask_image_is_refused():
    image = np.ones((60, 70), np.float32)
    image[50, 3] = np.nan
    with pytest.raises(BiounetError, match="NaN"):
        _model().predict(da.from_array(image, chunks=30), "mask").compute()


# -- zarr and OME-Zarr files -----------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model = _model(seed=6)
    save_model(tmp_path / "model", model._net, model._info)
    rng = np.random.default_rng(7)
    image = disk_image(disks((140, 180), rng, count=10), rng).astype(np.uint16) * 9
    return tmp_path / "model", image


def _ome(path, image, version="0.5"):
    """An OME-Zarr image (t, c, z, y, x) with a pixel size: NGFF 0.5 by ome-zarr-models, 0.4
    (zarr v2) by its metadata as the specification spells it."""
    data = image[None, None, None]
    scale = [1.0, 1.0, 2.0, 0.65, 0.65]
    if version == "0.4":
        group = zarr.open_group(str(path), mode="w", zarr_format=2)
        axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}] + [
            {"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"
        ]
        transform = [{"type": "scale", "scale": scale}]
        group.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": [
            {"path": "0", "coordinateTransformations": transform}]}]  # fmt: skip
        group.create_array("0", shape=data.shape, dtype=data.dtype, chunks=(1, 1, 1, 64, 64))
        group["0"][:] = data
        return
    from ome_zarr_models.v05.axes import Axis
    from ome_zarr_models.v05.image import Image
    from pydantic_zarr.v3 import ArraySpec

    template = zarr.create_array(store={}, shape=data.shape, dtype=data.dtype,
                                 chunks=(1, 1, 1, 64, 64))  # fmt: skip
    axes = [Axis(name="t", type="time"), Axis(name="c", type="channel")] + [
        Axis(name=n, type="space", unit="micrometer") for n in "zyx"
    ]
    spec = ArraySpec.from_array(template, dimension_names=list("tczyx"))
    Image.new(array_specs=[spec], paths=["0"], axes=axes, scales=[scale], translations=[None]
              ).to_zarr(zarr.storage.LocalStore(str(path)), path="")  # fmt: skip
    zarr.open_array(str(path / "0"), mode="r+")[:] = data


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_ome_zarr_in_ome_zarr_out(saved, tmp_path, version):
    model_dir, image = saved
    _ome(tmp_path / "cells.ome.zarr", image, version)
    tifffile.imwrite(tmp_path / "cells.tif", image)
    out = tmp_path / "out"
    flags = ["--precision", "fp32", "--output", "instances"]
    for name, folder in (("cells.ome.zarr", out), ("cells.tif", tmp_path / "tif")):
        assert main([str(a) for a in ["predict", model_dir, tmp_path / name, "--out", folder,
                                      *flags]]) == 0  # fmt: skip
    want = tifffile.imread(tmp_path / "tif" / "cells.tif")
    # NGFF: the image is the objects' mask, the instances its labels image labels/instances;
    # both at the input's pixel size
    result = out / "cells.ome.zarr"
    calibrated = {"unit": "micrometer", "scale": 0.65, "translation": 0.0}
    mask, labels = open_zarr_image(result), open_zarr_image(result / "labels" / "instances")
    for image in (mask, labels):
        assert image.axes == ("y", "x") and image.ome["y"] == calibrated == image.ome["x"]
    assert np.array_equal(labels.array[:], want) and want.max() > 0
    assert mask.array.dtype == np.uint8 and np.array_equal(mask.array[:], want > 0)
    assert json.loads((result / "zarr.json").read_text())["attributes"]["ome"]["version"] == "0.5"
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel
    from ome_zarr_models.v05.labels import Labels

    Image.from_zarr(zarr.open_group(str(result), mode="r"))  # each validates as NGFF 0.5
    group = Labels.from_zarr(zarr.open_group(str(result / "labels"), mode="r"))
    assert group.label_paths == ["instances"]
    label = ImageLabel.from_zarr(zarr.open_group(str(result / "labels" / "instances"), mode="r"))
    assert label.attributes.ome.image_label is not None


def test_zarr_array_in_zarr_out(saved, tmp_path):
    model_dir, image = saved
    z = zarr.create_array(store=str(tmp_path / "a.zarr"), shape=image.shape, dtype=image.dtype,
                          chunks=(50, 50))  # fmt: skip
    z[:] = image
    out = tmp_path / "out"
    base = ["predict", model_dir, tmp_path / "a.zarr", "--out", out, "--precision", "fp32"]
    assert main([str(a) for a in [*base, "--output", "prob"]]) == 0
    prob = zarr.open_array(str(out / "a.zarr"), mode="r")
    want = Model(*_loaded(model_dir), device="cpu", precision="fp32").predict(image, "prob")
    assert prob.dtype == np.float32 and np.array_equal(prob[:], want)
    assert prob.attrs["biounet"]["output"] == "prob"
    # --skip-existing knows a zarr output of the kind asked for, and only that kind.
    stamp = (out / "a.zarr" / "zarr.json").stat().st_mtime_ns
    assert main([str(a) for a in [*base, "--output", "prob", "--skip-existing"]]) == 0
    assert (out / "a.zarr" / "zarr.json").stat().st_mtime_ns == stamp
    assert main([str(a) for a in [*base, "--output", "mask", "--skip-existing"]]) == 0
    assert zarr.open_array(str(out / "a.zarr"), mode="r").dtype == np.uint8
    assert [p.name for p in out.iterdir()] == ["a.zarr"]  # nothing else left behind


def _loaded(folder):
    from biounet.modeldir import load_model

    return load_model(folder)


def test_bad_zarr_inputs_refused_in_one_line(saved, tmp_path, capsys):
    model_dir, image = saved
    deep = zarr.create_array(store=str(tmp_path / "z.zarr"), shape=(3, 5, 40, 40), dtype="u2")
    deep[:] = 1
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("a", shape=(10, 10), dtype="u1")
    text = zarr.create_array(store=str(tmp_path / "s.zarr"), shape=(3, 40, 40), dtype="u1")
    _ome(tmp_path / "o.ome.zarr", np.ones((40, 40), np.uint8))
    cases = {
        "z.zarr": "expected one 2-D image",
        "g.zarr": "not a readable OME-Zarr image",
        "s.zarr": "3 channel(s) but the model expects 1",
    }
    del text
    for name, message in cases.items():
        code = main(["predict", str(model_dir), str(tmp_path / name), "--out", str(tmp_path / "o")])
        assert code == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    code = main(["predict", str(model_dir), str(tmp_path / "o.ome.zarr"), "--overlay", "--out",
                 str(tmp_path / "o")])  # fmt: skip
    assert code == 2 and "--overlay" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # checked before anything is written
    for bad in ("local:0", "local:x"):
        code = main(["predict", str(model_dir), str(tmp_path / "o.ome.zarr"), "--out",
                     str(tmp_path / "o"), "--cluster", bad])  # fmt: skip
        assert code == 2 and "--cluster local:N" in capsys.readouterr().err


def test_relative_paths_become_absolute(saved, tmp_path, monkeypatch):
    """Cluster workers may run in another folder: what the graph holds is absolute."""
    from biounet.configs import PredictConfig
    from biounet.predict_zarr import open_blockwise

    _, image = saved
    _ome(tmp_path / "r.ome.zarr", image)
    monkeypatch.chdir(tmp_path)
    item = open_blockwise("r.ome.zarr", "out", 1, PredictConfig())
    assert item.path.is_absolute() and item.target == tmp_path / "out" / "r.ome.zarr"
    assert item.image.array.store.root == tmp_path / "r.ome.zarr" / "0"  # what workers open


def test_killed_zarr_output_leaves_nothing_half_written(saved, tmp_path):
    import subprocess
    import sys

    from biounet.cli import FAULT_ENV

    model_dir, image = saved
    _ome(tmp_path / "k.ome.zarr", image)
    cmd = [sys.executable, "-m", "biounet", "predict", str(model_dir), str(tmp_path / "k.ome.zarr"),
           "--out", str(tmp_path / "out")]  # fmt: skip
    killed = subprocess.run(cmd, env={**__import__("os").environ, FAULT_ENV: "1"},
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -9 and "blocks written" in killed.stderr
    assert not (tmp_path / "out" / "k.ome.zarr").exists()
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["k.ome.zarr"]  # leftover gone


def test_calibrated_tiff_gives_an_ome_zarr_block_wise(saved, tmp_path):
    """A TIFF stating 0.65 µm pixels, predicted block by block (as on a cluster): an
    OME-Zarr output at 0.65 micrometer; an uncalibrated one: a plain zarr array."""
    from biounet.configs import PredictConfig
    from biounet.predict import predict_files

    model_dir, image = saved
    size = {"axes": "YX", "PhysicalSizeX": 0.65, "PhysicalSizeY": 0.65}
    tifffile.imwrite(tmp_path / "cal.tif", image, ome=True, metadata=size)
    tifffile.imwrite(tmp_path / "raw.tif", image)
    written = predict_files(model_dir, [tmp_path / "cal.tif", tmp_path / "raw.tif"],
                            tmp_path / "out", PredictConfig(blockwise=True))  # fmt: skip
    assert [w.name for w in written] == ["cal.ome.zarr", "raw.zarr"]
    labels = open_zarr_image(tmp_path / "out" / "cal.ome.zarr")
    assert labels.ome["x"]["scale"] == pytest.approx(0.65)
    assert labels.ome["x"]["unit"] == "micrometer"
    want = Model(*_loaded(model_dir), device="cpu").predict(image, "mask")
    assert np.array_equal(labels.array[:], want)


def test_readme_dask_example_runs(tmp_path, monkeypatch):
    """The README's Python example for dask arrays, on a BBBC039-like image in zarr."""
    import re
    from pathlib import Path

    import biounet

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("### Prediction on a dask cluster") :]
    code = next(b for b in re.findall(r"```python\n(.*?)```", section, re.S) if "from_zarr" in b)
    rng = np.random.default_rng(8)
    image = disk_image(disks((300, 420), rng, count=15), rng).astype(np.uint16) * 12
    monkeypatch.chdir(tmp_path)
    z = zarr.create_array(store="slide.zarr", shape=image.shape, dtype=image.dtype,
                          chunks=(128, 128))  # fmt: skip
    z[:] = image
    exec(compile("import biounet\n" + code, "README.md", "exec"), {})
    want = biounet.load("bbbc039").predict(image, output="instances")
    assert np.array_equal(zarr.open_array("labels.zarr", mode="r")[:], want)
