"""Scale-out on one machine: 1 vs 2 DDP training processes, 1 vs 2 dask workers predicting.

Training: ISBI 2012 slices, the same global batch (1 process at --batch-size 2 against 2
torchrun processes at 1), steady-state tiles/s from training.csv (first logged row to last,
so start-up is left out). Prediction: a mosaic of BBBC039 images in zarr, masks with the
shipped bbbc039 model, whole-process wall time in this process, in one dask worker and in two
(``--cluster local:N``). Peak memory per process: the largest resident set among the run's
processes (getrusage of the children). Each configuration runs `--repeats` times,
alternating, and the median is reported.

    python bench/scale_out.py --data ../shared/data --repeats 3
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import zarr

PEAK = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
    "sys.exit(r)"
)


def run(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Wall seconds and the largest child's peak RSS (MB) of `cmd`."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK, *cmd], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})  # fmt: skip
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return wall, int(done.stderr.strip().splitlines()[-1]) / 1024


def training(data: Path, work: Path, steps: int, repeats: int) -> dict:
    biounet = [sys.executable, "-m", "biounet"]
    flags = ["train", "--images", str(data / "isbi2012/images"), "--masks",
             str(data / "isbi2012/labels"), "--foreground", "0", "--depth", "4",
             "--base-channels", "16", "--tile", "196", "--steps", str(steps), "--val-every",
             str(steps), "--checkpoint-every", str(steps)]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    configs = {
        "1 process, --batch-size 2": [*biounet, *flags, "--batch-size", "2"],
        "2 DDP processes, --batch-size 1": [*torchrun, "--nproc_per_node", "2", "-m",
                                            "biounet", *flags, "--batch-size", "1"],
    }  # fmt: skip
    results = {name: [] for name in configs}
    for _ in range(repeats):
        for name, cmd in configs.items():
            out = work / "model"
            shutil.rmtree(out, ignore_errors=True)
            wall, peak = run([*cmd, "--out", str(out)])
            rows = list(csv.DictReader((out / "training.csv").open()))
            first, last = rows[0], rows[-1]
            tiles = 2 * (int(last["step"]) - int(first["step"]))
            speed = tiles / (float(last["elapsed_s"]) - float(first["elapsed_s"]))
            results[name].append((speed, wall, peak))
    return _medians(results, ("tiles_per_s", "wall_s", "peak_mb"))


def prediction(data: Path, work: Path, repeats: int) -> dict:
    files = sorted((data / "bbbc039/images").iterdir())[:30]
    tiles = [tifffile.imread(f) for f in files]
    image = np.block([[tiles[r * 5 + c] for c in range(5)] for r in range(6)])
    z = zarr.create_array(store=str(work / "mosaic.zarr"), shape=image.shape,
                          dtype=image.dtype, chunks=(1024, 1024), overwrite=True)  # fmt: skip
    z[:] = image
    base = [sys.executable, "-m", "biounet", "predict", "bbbc039", str(work / "mosaic.zarr"),
            "--out", str(work / "pred")]  # fmt: skip
    configs = {
        "this process": base,
        "1 dask worker": [*base, "--cluster", "local:1"],
        "2 dask workers": [*base, "--cluster", "local:2"],
    }
    results = {name: [] for name in configs}
    for _ in range(repeats):
        for name, cmd in configs.items():
            shutil.rmtree(work / "pred", ignore_errors=True)
            wall, peak = run(cmd)
            results[name].append((image.size / wall / 1e6, wall, peak))
    return {"image": list(image.shape)} | _medians(results, ("megapixels_per_s", "wall_s",
                                                             "peak_mb"))  # fmt: skip


def _medians(results: dict, names: tuple[str, ...]) -> dict:
    return {
        config: {n: round(statistics.median(r[i] for r in runs), 3) for i, n in enumerate(names)}
        for config, runs in results.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--only", choices=("train", "predict"))
    args = p.parse_args()
    report = {"cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "predict":
            report["training"] = training(args.data, Path(tmp), args.steps, args.repeats)
        if args.only != "train":
            report["prediction"] = prediction(args.data, Path(tmp), args.repeats)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
