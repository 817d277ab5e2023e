"""Peak memory and speed of one tile's forward pass, per engine, precision and tile size.

Each configuration runs in a fresh child process: the paper's network (depth 4, base 64,
random He weights) set up by `biounet.inference.Engine` with that engine, one forward pass on
a small input (conversion or loading from the cache, compilation), then two passes on the
tile; the child reports its peak RSS (getrusage) and the second pass's time. This is what
the tile size of each engine is chosen from (`docs/benchmarks.md`).

Usage:  .venv/bin/python bench/tile_memory.py [--runs torch:bf16:956,openvino:bf16:956,...]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time

RUNS = (
    "torch:bf16:956,openvino:bf16:956,torch:bf16:1212,openvino:bf16:1212,"
    "torch:fp32:700,openvino:fp32:700,onnxruntime:fp32:700,openvino:fp32:956,"
    "onnxruntime:fp32:956"
)


def child(engine: str, precision: str, tile: int, cache: str) -> None:
    import numpy as np
    import torch

    from biounet.architecture import UNetConfig
    from biounet.inference import Engine
    from biounet.model import UNet

    torch.manual_seed(0)
    net = UNetConfig(base_channels=64)
    run = Engine(UNet(net), torch.device("cpu"), precision, engine=engine, cache=cache)
    run.forward(np.zeros((1, 1, 204, 204), np.float32))  # set-up: convert or load, compile
    x = np.random.default_rng(0).random((1, 1, tile, tile), dtype=np.float32)
    run.forward(x)  # compiles this shape
    t = time.perf_counter()
    run.forward(x)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = net.output_size(tile)
    print(json.dumps({"peak_mb": peak, "seconds": seconds, "mp_s": out * out / 1e6 / seconds}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=RUNS, help="engine:precision:tile, comma-separated")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]), args.child[3])
        return
    print(f"# {time.strftime('%F %H:%M')}, {platform.machine()}, U-Net depth 4 base 64")
    print("| engine | precision | tile in | peak RSS MB | forward s | output MP/s |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as cache:
        for spec in args.runs.split(","):
            engine, precision, tile = spec.split(":")
            # a first child converts into the cache, so that the measured one loads
            cmd = [sys.executable, __file__, "--child", engine, precision, tile, cache]
            subprocess.run(cmd, capture_output=True, check=True)
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"| {engine} | {precision} | {tile} | {r['peak_mb']:.0f} | "
                  f"{r['seconds']:.2f} | {r['mp_s']:.3f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
