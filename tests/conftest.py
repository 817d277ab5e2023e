"""Shared fixtures: small synthetic data with known answers, and the real data when present."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _torch_engine(request, monkeypatch):
    """Tests compare predictions bit for bit, which only one engine gives: torch. So the
    engine `auto` picks in this process is torch, and so is `biounet predict`'s default in
    the subprocesses tests start ($BIOUNET_ENGINE), unless a test is marked `runtimes`: those
    see what is installed. (A subprocess calling `biounet.load` itself, as the napari test's
    viewer does, compares against itself.)"""
    if request.node.get_closest_marker("runtimes") is None:
        import biounet.runtimes

        monkeypatch.setattr(biounet.runtimes, "installed", lambda: ("torch",))
        monkeypatch.setenv("BIOUNET_ENGINE", "torch")


def disks(
    shape: tuple[int, int],
    rng: np.random.Generator,
    count: int = 6,
    radius: tuple[int, int] = (8, 16),
) -> np.ndarray:
    """Instance label image (int32) of random non-overlapping-ish disks."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    for k in range(1, count + 1):
        r = rng.integers(*radius)
        cy, cx = rng.integers(r, shape[0] - r), rng.integers(r, shape[1] - r)
        labels[((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) & (labels == 0)] = k
    return labels


def disk_image(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 image: bright disks on a dark noisy background."""
    img = np.where(labels > 0, 180.0, 40.0) + rng.normal(0, 12, labels.shape)
    return img.clip(0, 255).astype(np.uint8)


def write_disk_pairs(
    images: Path,
    masks: Path,
    pairs: int,
    shape: tuple[int, int],
    *,
    instances: bool = False,
    prefix: str = "",
    seed: int = 0,
    **disk_options,
) -> tuple[Path, Path]:
    """Folders `images` and `masks` (made here) of `pairs` synthetic disk images, PREFIXk.png,
    with binary masks (0/255), or uint16 instance labels with `instances`."""
    rng = np.random.default_rng(seed)
    images.mkdir()
    masks.mkdir()
    for k in range(pairs):
        labels = disks(shape, rng, **disk_options)
        iio.imwrite(images / f"{prefix}{k}.png", disk_image(labels, rng))
        mask = labels.astype(np.uint16) if instances else ((labels > 0) * 255).astype(np.uint8)
        iio.imwrite(masks / f"{prefix}{k}.png", mask)
    return images, masks


@pytest.fixture
def disk_folders(tmp_path: Path) -> tuple[Path, Path]:
    """Folders images/ and masks/ with 4 synthetic 96x120 disk images and binary masks."""
    return write_disk_pairs(tmp_path / "images", tmp_path / "masks", 4, (96, 120), prefix="img")


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "isbi2012").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (../shared/data beside the checkout)")
    return SHARED_DATA


def concurrent_matches_alone(model) -> bool:
    """Whether four predictions run at once in threads equal each run alone, bit for bit."""
    import threading

    images = [np.random.default_rng(k).random((150 + 8 * k, 170)) for k in range(4)]
    alone = [model.predict(im, "prob") for im in images]
    results = [None] * len(images)

    def run(k):
        results[k] = model.predict(images[k], "prob")

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return all(np.array_equal(a, b) for a, b in zip(alone, results, strict=True))
