"""Every inference engine on this machine, forward only, and what each does to the results.

(1) Speed: one forward pass of the paper's network (depth 4, base 64 or --base, random He
    weights; the shipped models have base 32) over
    the tile `biounet predict` picks at each precision (`plan_tiles` for a 3072 x 3072 image),
    for every installed engine that runs that precision; the engines take turns, --repeat
    rounds after a warm-up each (the runtimes convert and compile first; that is not timed),
    median per engine, as a fraction of the tile's compute limit (its FLOPs over the
    matrix-product rate measured in this run). Where biounet's torch runs another layout
    than plain PyTorch (fp32 on CPUs without fast bf16: channels-last), "torch eager" is
    the peer in the default layout. This is what `biounet.runtimes.FASTEST` is read from.
(2) With --accuracy, the shipped models on the real data, each engine against torch fp32: the
    share of equal mask pixels on the 30 ISBI 2012 test slices (lowest slice and mean), and
    the instance AP@0.5 and mean AP over 0.5:0.95 on every third BBBC039 image.

Usage:  .venv/bin/python bench/engines.py [--repeat 3] [--base 64] [--accuracy]
            [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import format_rates, matmul_rates, median_time
from biounet.architecture import UNetConfig
from biounet.inference import Engine
from biounet.model import UNet
from biounet.precision import bytes_per_value, inference_format
from biounet.runtimes import PRECISIONS, cpu_class, cpu_has_fast_bf16, installed
from biounet.tiling import model_forward, plan_tiles

CPU = torch.device("cpu")


def speed(repeat: int, base: int = 64) -> None:
    net = UNetConfig(depth=4, base_channels=base)
    torch.manual_seed(0)
    model = UNet(net).eval()
    precisions = ["fp32", "bf16"] if cpu_has_fast_bf16() else ["fp32"]
    rates = matmul_rates()
    print(f"matrix product 4096^3: {format_rates(rates)}; CPU class {cpu_class()}", flush=True)
    with tempfile.TemporaryDirectory() as cache:
        for precision in precisions:
            plan = plan_tiles(net, (3072, 3072), bytes_per_value=bytes_per_value(precision))
            side = plan.y.tile_in
            x = np.random.default_rng(0).standard_normal((1, 1, side, side)).astype(np.float32)
            limit = net.forward_flops(side, side) / rates[precision]
            runs = {}
            for engine in installed():
                if precision in PRECISIONS[engine]:
                    runs[engine] = Engine(model, CPU, precision, None, engine, cache).forward
            if inference_format(precision, CPU) != torch.contiguous_format:
                # the peer: torch eager in its default layout, as plain PyTorch code runs it
                runs["torch eager"] = model_forward(
                    copy.deepcopy(model), precision, CPU, torch.contiguous_format
                )
            times = {}
            for _ in range(repeat):  # engines in turn, so that drifts of speed hit all alike
                for name, run in runs.items():
                    times.setdefault(name, []).append(
                        median_time(lambda r=run, b=x: r(b), 1, warmup=name not in times)
                    )
            times = {name: statistics.median(t) for name, t in times.items()}
            ref = times.get("torch eager", times["torch"])
            peer = "torch eager (default layout)" if "torch eager" in times else "torch"
            for engine, t in sorted(times.items(), key=lambda kv: kv[1]):
                print(f"base {base}, {precision} tile {side}->{plan.y.tile_out}: {engine:12s} "
                      f"{t:6.2f} s = {limit / t * 100:3.0f} % of the tile's limit, "
                      f"{ref / t:.2f}x {peer}",
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
    want = [ref.predict(im, tta=False) for im in slices]  # the engines differ in the network
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
            agree = [float((m.predict(im, tta=False) == w).mean())
                     for im, w in zip(slices, want, strict=True)]  # fmt: skip
            ap = scores(biounet.load("bbbc039", engine=engine, precision=precision, cache=cache))
            print(f"{engine} {precision}: ISBI masks equal to torch fp32's on "
                  f"{min(agree) * 100:.3f} % (lowest of {len(slices)} slices), "
                  f"{np.mean(agree) * 100:.3f} % (mean); BBBC039 AP@0.5 {ap[0]:.4f} "
                  f"({ap[0] - ap_ref[0]:+.4f}), mean AP {ap[1]:.4f} ({ap[1] - ap_ref[1]:+.4f})",
                  flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--base", type=int, default=64, help="base channels (shipped models: 32)")
    p.add_argument("--accuracy", action="store_true")
    p.add_argument("--data", type=Path, default=Path(__file__).parents[2] / "shared" / "data")
    args = p.parse_args()
    print(f"# {time.strftime('%F %H:%M')}, {platform.machine()}, {platform.processor() or ''} "
          f"CPU class {cpu_class()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, engines {', '.join(installed())}")  # fmt: skip
    speed(args.repeat, args.base)
    if args.accuracy:
        accuracy(args.data)


if __name__ == "__main__":
    main()
