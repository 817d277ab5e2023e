"""Cluster prediction (dask.distributed) gives the one-process result, a killed worker too.

A ~3000 x 3400 mosaic of BBBC039 nuclei images in zarr, the shipped bbbc039 model, fp32:
labels and masks identical to one process, probabilities within 1e-5 (identical, in fact),
with two worker processes, one of them killed midway in one run.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

distributed = pytest.importorskip("distributed", reason="the cluster extra is not installed")

ROWS, COLS = 6, 5  # 3120 x 3480 px


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory):
    from .conftest import SHARED_DATA

    folder = SHARED_DATA / "bbbc039" / "images"
    if not folder.is_dir():
        pytest.skip(f"BBBC039 not found at {folder} (../shared/data beside the checkout)")
    files = sorted(folder.iterdir())[: ROWS * COLS]
    tiles = [tifffile.imread(f) for f in files]
    image = np.block([[tiles[r * COLS + c] for c in range(COLS)] for r in range(ROWS)])
    path = tmp_path_factory.mktemp("mosaic") / "mosaic.zarr"
    z = zarr.create_array(store=str(path), shape=image.shape, dtype=image.dtype,
                          chunks=(1000, 1000))  # fmt: skip
    z[:] = image
    return path, image


@pytest.fixture(scope="module")
def reference(mosaic):
    """One process, in memory: what `biounet predict mosaic.tif` writes."""
    import biounet

    model = biounet.load("bbbc039", device="cpu", precision="fp32")
    return model, model.predict(mosaic[1], "prob")


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as c:
        yield c


def _predict(mosaic_path, out, output, address):
    cmd = [sys.executable, "-m", "biounet", "predict", "bbbc039", str(mosaic_path), "--out",
           str(out), "--precision", "fp32", "--output", output, "--cluster", address]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cluster_labels_equal_one_process(mosaic, reference, cluster, tmp_path):
    from biounet.predict import output_array

    model, probs = reference
    run = _predict(mosaic[0], tmp_path, "instances", cluster.scheduler_address)
    _, err = run.communicate(timeout=600)
    assert run.returncode == 0, err
    labels = zarr.open_array(str(tmp_path / "mosaic.zarr"), mode="r")
    want = output_array(probs.copy(), model._info, "instances")
    assert want.max() > 500  # hundreds of nuclei
    assert np.array_equal(labels[:], want)


def test_cluster_with_a_worker_killed(mosaic, reference, cluster, tmp_path):
    _, probs = reference
    run = _predict(mosaic[0], tmp_path, "prob", cluster.scheduler_address)
    with distributed.Client(cluster) as client:
        pids = client.run(os.getpid)
        deadline = time.monotonic() + 300
        while not _chunks_written(tmp_path) and time.monotonic() < deadline:
            assert run.poll() is None, run.communicate()[1]
            time.sleep(0.2)
        assert run.poll() is None  # midway: some blocks written, not all
        os.kill(next(iter(pids.values())), signal.SIGKILL)
        _, err = run.communicate(timeout=600)
    assert run.returncode == 0, err
    got = zarr.open_array(str(tmp_path / "mosaic.zarr"), mode="r")[:]
    assert np.abs(got - probs).max() <= 1e-5
    assert np.array_equal(got.argmax(0), probs.argmax(0))  # the masks


def _chunks_written(out: Path) -> bool:
    return any(f.is_file() for p in out.glob(".mosaic.zarr.*.part") for f in p.rglob("c/*/*/*"))


def test_local_cluster_masks(mosaic, reference, tmp_path):
    """``--cluster local:2`` starts its own workers; a crop of the mosaic, as a TIFF."""
    from biounet.predict import output_array

    model, _ = reference
    crop = mosaic[1][:700, :900]
    tifffile.imwrite(tmp_path / "crop.tif", crop)
    run = _predict(tmp_path / "crop.tif", tmp_path / "out", "mask", "local:2")
    _, err = run.communicate(timeout=600)
    assert run.returncode == 0, err
    want = output_array(model.predict(crop, "prob"), model._info, "mask")
    assert np.array_equal(zarr.open_array(str(tmp_path / "out" / "crop.zarr"))[:], want)


def test_no_scheduler_at_the_address_is_one_line(mosaic, tmp_path):
    run = _predict(mosaic[0], tmp_path / "out", "mask", "tcp://127.0.0.1:1")
    _, err = run.communicate(timeout=120)
    assert run.returncode == 2
    assert "--cluster tcp://127.0.0.1:1: no dask scheduler answers there" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
