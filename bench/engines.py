"""Every inference engine on this machine, forward only, and what each does to the results.

(1) Speed: one forward pass of the paper's network (depth 4, base 64, random He weights) over
    the tile `biounet predict` picks at each precision (`plan_tiles` for a 3072 x 3072 image),
    for every installed engine that runs that precision; median of --repeat runs after a
    warm-up (the runtimes convert and compile first; that is not timed), as a fraction of the
    tile's compute limit (its FLOPs over the matrix-product rate measured in this run). This
    is what `biounet.runtimes.FASTEST` is read from.
(2) With --accuracy, the shipped models on the real data, each engine against torch fp32: the
    share of equal mask pixels on the 30 ISBI 2012 test slices (lowest slice and mean), and
    the instance AP@0.5 and mean AP over 0.5:0.95 on every third BBBC039 image.

Usage:  .venv/bin/python bench/engines.py [--repeat 3] [--accuracy] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import median_time
from biounet.architecture import UNetConfig
from biounet.inference import Engine
from biounet.model import UNet
from biounet.precision import bytes_per_value
from biounet.runtimes import PRECISIONS, cpu_class, cpu_has_fast_bf16, installed
from biounet.tiling import plan_tiles

CPU = torch.device("cpu")


def matmul_rate(dtype: torch.dtype, n: int = 4096) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n**3 / median_time(lambda: torch.mm(a, b), 5, warmup=True)


def speed(repeat: int) -> None:
    net = UNetConfig(depth=4, base_channels=64)
    torch.manual_seed(0)
    model = UNet(net).eval()
    precisions = ["fp32", "bf16"] if cpu_has_fast_bf16() else ["fp32"]
    rates = {"fp32": matmul_rate(torch.float32), "bf16": matmul_rate(torch.bfloat16)}
    print(f"matrix product 4096^3: bf16 {rates['bf16'] / 1e12:.2f}, fp32 "
          f"{rates['fp32'] / 1e12:.2f} TFLOP/s")  # fmt: skip
    with tempfile.TemporaryDirectory() as cache:
        for precision in precisions:
            plan = plan_tiles(net, (3072, 3072), bytes_per_value=bytes_per_value(precision))
            side = plan.y.tile_in
            x = np.random.default_rng(0).standard_normal((1, 1, side, side)).astype(np.float32)
            limit = net.forward_flops(side, side) / rates[precision]
            times = {}
            for engine in installed():
                if precision not in PRECISIONS[engine]:
                    continue
                run = Engine(model, CPU, precision, None, engine, cache).forward
                times[engine] = median_time(lambda r=run, b=x: r(b), repeat, warmup=True)
            base = times["torch"]
            for engine, t in sorted(times.items(), key=lambda kv: kv[1]):
                print(f"{precision} tile {side}->{plan.y.tile_out}: {engine:12s} {t:6.2f} s "
                      f"= {limit / t * 100:3.0f} % of the tile's limit, {base / t:.2f}x torch",
                      flush=True)  # fmt: skip


def accuracy(data: Path) -> None:
    import imageio.v3 as iio

    import biounet
    from biounet.metrics_instances import instance_scores, pool_instance_scores

    engines = [("torch", "bf16")] if cpu_has_fast_bf16() else []
    for engine in installed()[1:]:
        engines += [(engine, p) for p in PRECISIONS[engine] if p == "fp32" or cpu_has_fast_bf16()]
    slices = [iio.imread(p) for p in sorted((data / "isbi2012/test_images").glob("*.png"))]
    ref = biounet.load("isbi2012", engine="torch", precision="fp32")
    want = [ref.predict(im) for im in slices]
    names = sorted((data / "bbbc039/images").glob("*.tif"))[::3]
    pairs = [(iio.imread(p), iio.imread(data / "bbbc039/masks" / f"{p.stem}.png")) for p in names]

    def scores(model) -> tuple[float, float]:
        pooled = pool_instance_scores(
            [instance_scores(model.predict(im, "instances"), t) for im, t in pairs]
        )
        return pooled["ap"][0], pooled["mean_ap"]

    ap_ref = scores(biounet.load("bbbc039", engine="torch", precision="fp32"))
    print(f"torch fp32: BBBC039 ({len(pairs)} images) AP@0.5 {ap_ref[0]:.4f}, "
          f"mean AP {ap_ref[1]:.4f}")  # fmt: skip
    with tempfile.TemporaryDirectory() as cache:
        for engine, precision in engines:
            m = biounet.load("isbi2012", engine=engine, precision=precision, cache=cache)
            agree = [float((m.predict(im) == w).mean()) for im, w in zip(slices, want, strict=True)]
            ap = scores(biounet.load("bbbc039", engine=engine, precision=precision, cache=cache))
            print(f"{engine} {precision}: ISBI masks equal to torch fp32's on "
                  f"{min(agree) * 100:.3f} % (lowest of {len(slices)} slices), "
                  f"{np.mean(agree) * 100:.3f} % (mean); BBBC039 AP@0.5 {ap[0]:.4f} "
                  f"({ap[0] - ap_ref[0]:+.4f}), mean AP {ap[1]:.4f} ({ap[1] - ap_ref[1]:+.4f})",
                  flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--accuracy", action="store_true")
    p.add_argument("--data", type=Path, default=Path(__file__).parents[2] / "shared" / "data")
    args = p.parse_args()
    print(f"# {time.strftime('%F %H:%M')}, {platform.machine()}, {platform.processor() or ''} "
          f"CPU class {cpu_class()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, engines {', '.join(installed())}")  # fmt: skip
    speed(args.repeat)
    if args.accuracy:
        accuracy(args.data)


if __name__ == "__main__":
    main()
