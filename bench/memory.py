"""Peak memory (RSS) of `biounet predict` on synthetic uint8 TIFFs of growing size.

Each size runs in a fresh child process that reports its own peak RSS (getrusage), so sizes
do not contaminate each other; a first run on a 512 px image converts the network into a
fresh cache folder (engines other than torch), so that no size pays the conversion. The input
TIFFs are written tile by tile (never held whole), as a microscope or slide scanner would
store them: tiled, zlib-compressed.

With `--output instances` (use it with models/bbbc039) the texture is nuclei-like disks and
the child writes instance labels through the block-wise post-processing.

The model runs without its stored TTA and membrane lines (`_common.network_only`): the figures
measure the network's streamed argmax, comparable with those taken before models stored their
post-processing; `--stored-postprocess` measures the model as `biounet predict` runs it.

Usage:  .venv/bin/python bench/memory.py [--model models/isbi2012] [--sizes 2048,4096,8192,16384]
            [--output mask|instances] [--tile N] [--stored-postprocess]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

from _common import network_only


def disks(rng: np.random.Generator, tile: int) -> np.ndarray:
    """Bright blurred disks of radius 7-12 px on a dark noisy background, like nuclei."""
    from scipy import ndimage

    fg = np.zeros((tile + 30, tile + 30), bool)  # disks may overhang; cropped below
    for _ in range(tile * tile // 2500):
        cy, cx = rng.integers(0, tile, 2)
        r = rng.uniform(7, 12)
        yy, xx = np.mgrid[-12:13, -12:13]
        fg[cy : cy + 25, cx : cx + 25] |= yy**2 + xx**2 <= r * r
    fg = fg[12 : tile + 12, 12 : tile + 12]
    image = ndimage.gaussian_filter(fg * 180.0, 1.5) + rng.normal(20, 6, fg.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_synthetic(path: Path, size: int, kind: str = "noise", tile: int = 512) -> None:
    """Random texture (noise, or nuclei-like disks), generated and written one tile at a time."""
    rng = np.random.default_rng(size)

    def tiles():
        tiles_per_side = -(-size // tile)
        for _ in range(tiles_per_side * tiles_per_side):
            if kind == "disks":
                yield disks(rng, tile)
            else:
                yield rng.integers(0, 255, (tile, tile), dtype=np.uint8)

    tifffile.imwrite(
        path,
        data=tiles(),
        shape=(size, size),
        dtype=np.uint8,
        tile=(tile, tile),
        compression="zlib",
    )


def child(model: str, image: str, out: str, precision: str, output: str, tile: int | None) -> None:
    from biounet.cli import main

    t = time.perf_counter()
    argv = [
        "predict",
        model,
        image,
        "--out",
        out,
        "--precision",
        precision,
        "--stream",
        "--device",
        "cpu",
    ]
    code = main([*argv, "--output", output, *(["--tile", str(tile)] if tile else [])])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"code": code, "peak_rss_mb": peak_mb, "seconds": time.perf_counter() - t}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/isbi2012")
    p.add_argument("--sizes", default="2048,4096,8192,16384")
    p.add_argument("--precision", default="auto")
    p.add_argument("--output", default="mask", choices=("mask", "instances"))
    p.add_argument("--tile", type=int, help="a fixed output tile (default: automatic per image)")
    p.add_argument("--stored-postprocess", action="store_true",
                   help="keep the model's stored TTA and membrane lines")  # fmt: skip
    p.add_argument("--child", nargs=3, metavar=("MODEL", "IMAGE", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child, args.precision, args.output, args.tile)
        return
    print(
        f"# {time.strftime('%F %H:%M')}, {platform.machine()}, model {args.model}, "
        f"precision {args.precision}, output {args.output}, tile {args.tile or 'automatic'}, "
        f"stored post-processing {'on' if args.stored_postprocess else 'off'}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        env = os.environ | {"BIOUNET_CACHE": str(Path(tmp) / "cache")}  # a cold cache
        model = args.model if args.stored_postprocess else str(network_only(args.model, Path(tmp)))

        def measure(size: int) -> tuple[dict, float]:
            image = Path(tmp) / f"synthetic_{size}.tif"
            write_synthetic(image, size, "disks" if args.output == "instances" else "noise")
            done = subprocess.run(
                [sys.executable, __file__, "--precision", args.precision, "--output",
                 args.output, *(["--tile", str(args.tile)] if args.tile else []),
                 "--child", model, str(image), str(Path(tmp) / "out")],
                capture_output=True, text=True, check=True, env=env,
            )  # fmt: skip
            megabytes = image.stat().st_size / 1e6
            image.unlink()
            return json.loads(done.stdout.strip().splitlines()[-1]), megabytes

        # The first run converts the network into the cache (engines other than torch); the
        # sizes after it load it, as every run after a model's first does.
        first, _ = measure(512)
        print(f"first run, 512 x 512 (converts into the cache): {first['peak_rss_mb']:.0f} MB")
        print("| image | input file MB | peak RSS MB | seconds | megapixels/s |")
        print("|---|---|---|---|---|")
        for size in (int(s) for s in args.sizes.split(",")):
            r, megabytes = measure(size)
            mpix = size * size / 1e6
            print(
                f"| {size} x {size} | {megabytes:.0f} | {r['peak_rss_mb']:.0f} | "
                f"{r['seconds']:.1f} | {mpix / r['seconds']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
