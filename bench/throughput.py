"""Prediction and training throughput against this machine's compute limit.

One run, one synthetic image (uint8 TIFF, default 4096 x 4096), the paper's network (depth 4,
base 64) with one set of random He weights shared by every row:
  (a) `biounet predict MODEL IMAGE --out DIR`, file to file, all defaults (automatic tile and
      precision), in a child process (its start-up, reading and writing included);
  (b) MONAI `sliding_window_inference` (roi 512, overlap 0.25, gaussian blending, sw_batch_size
      4 as in MONAI's examples) over the padded variant with the same weights, fp32 as its
      examples run it, and at its best: the precision and layout biounet's torch predicts in
      (bf16 autocast + channels-last with fast bf16, else fp32 + channels-last), given to the
      peer too; in
      memory (no file reading or writing charged); one run each (minutes long: warm-up is
      noise);
  (c) a plain whole-image fp32 forward of the padded variant as milesial/Pytorch-UNet does,
      at --whole (default 2048 x 2048: 4096 x 4096 does not fit in 24 GB);
  (d) the compute limit: FLOPs of one pass of the valid network over the whole image (no
      tiling overhead: `UNetConfig.forward_flops` per output pixel x pixels) divided by the
      matrix-product FLOP/s measured in this run (bf16 and fp32 4096^3 torch.mm; on a GPU
      see --device below).
  (f) with each (a): the forward passes alone over the same tiles in this process (one real
      input window per call, after a warm-up call that compiles), file to file / forward only,
      the start-up (a whole `biounet predict` run on a 300 x 300 px image), and file to file
      in this process (`predict_files`: no interpreter start, no imports).
Then a tile sweep (bf16 forward time per output megapixel against tile size) and training:
tiles/s of `biounet.loop.fit` (elastic augmentation + weight maps on, base 64, 388 px
tiles, the training precision) against the training limit, 3 x the forward FLOPs of a
572 px tile at the bf16 matrix-product rate.

`--device cuda` runs every row on the GPU (rows a, f in children that see it): the limit is
then the GPU's measured n^3 matrix-product rate (n = 8192), MONAI runs on the same GPU (after
one warm-up pass, as biounet's rows get one), and training runs there; e.g. the GPU figures
of the performance issue:
  bench/throughput.py --device cuda --size 4096 --rows a,f,b,t
  bench/throughput.py --device cuda --size 16384 --rows a,b --engines auto

Row (a) runs once per engine (`--engines`, default auto and every installed one), each after a
warm-up on a small image that converts the network into a fresh cache (conversion is once per
model, not per image). `--precision fp32` gives the rows of a CPU without fast bf16.

Usage:  .venv/bin/python bench/throughput.py [--size 4096] [--whole 2048] [--rows a,f,b,c,s,t]
                                             [--engines auto,torch,...] [--precision fp32]
                                             [--device cpu|cuda]
Needs MONAI for (b) (`make bench-deps`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

from _common import format_rates, matmul_rates, median_time
from biounet.architecture import UNetConfig
from biounet.configs import Tiling
from biounet.inference import engine_plan
from biounet.model import UNet
from biounet.modeldir import ModelInfo, save_model
from biounet.normalize import NormalizeConfig, normalize
from biounet.precision import autocast, inference_format, resolve_precision
from biounet.runtimes import choose, cpu_class, installed
from biounet.tiling import model_forward

CPU = torch.device("cpu")
BIOUNET_PREDICT = [sys.executable, "-m", "biounet", "predict"]


def flops_per_output_pixel(net: UNetConfig, size: int) -> float:
    out = net.snap_output(size, up=True)
    return net.forward_flops(out + 2 * net.margin, out + 2 * net.margin) / out**2


def synthetic_image(size: int, seed: int = 0) -> np.ndarray:
    """Blob-like texture: random noise at 1/8 resolution, upsampled by pixel repetition."""
    coarse = np.random.default_rng(seed).integers(0, 255, (size // 8 + 1, size // 8 + 1))
    return np.kron(coarse, np.ones((8, 8)))[:size, :size].astype(np.uint8)


def run_child(cmd: list[str], env: dict | None = None, gpu: bool = False) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of a child process (it sees the GPU only if `gpu`)."""
    t = time.perf_counter()
    env = os.environ | ({} if gpu else {"CUDA_VISIBLE_DEVICES": ""}) | (env or {})
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return time.perf_counter() - t, usage.ru_maxrss / 1024


def monai_row(
    model: UNet, x: torch.Tensor, precision: str, fmt: torch.memory_format, device: torch.device
) -> float:
    """Seconds of MONAI's sliding window over `x` (on `device`: the image's transfer and the
    result's stay on the device, as MONAI's examples keep them)."""
    from monai.inferers import sliding_window_inference

    model = model.to(device, memory_format=fmt)
    x = x.to(device).contiguous(memory_format=fmt)

    def run() -> None:
        with torch.inference_mode(), autocast(precision, device):
            sliding_window_inference(x, (512, 512), 4, model, overlap=0.25, mode="gaussian")
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        run()  # cuDNN picks its kernels on the first windows: a warm-up, as for biounet's rows
    t = time.perf_counter()
    run()
    seconds = time.perf_counter() - t
    model.to(CPU, memory_format=torch.contiguous_format)  # as the next rows expect it
    return seconds


def forward_only(
    model: UNet, image: np.ndarray, engine: str, precision: str, cache, device: torch.device
) -> float:
    """Seconds of the forward passes alone over the tiles `biounet predict` computes for
    `image` with this engine (one real input window, run once per batch of the plan, after a
    warm-up call that compiles): the time file to file would take with free reading and
    writing and no start-up."""
    from biounet.inference import Engine
    from biounet.mirror import mirror_crop

    run = Engine(copy.deepcopy(model), device, precision, engine=engine, cache=cache)
    tiling = Tiling()
    plan = run.plan(image.shape, tiling)
    window = normalize(mirror_crop(image[None], -plan.y.context, -plan.x.context,
                                   *plan.tile_shape), NormalizeConfig())  # fmt: skip
    batch = np.stack([window] * tiling.batch_size)
    run.forward(batch)  # compiles
    calls = -(-plan.count(image.shape) // tiling.batch_size)
    t = time.perf_counter()
    for _ in range(calls):
        run.forward(batch)
    return time.perf_counter() - t


def in_process(tmp: Path, engine: str, precision: str, cache: Path, device: torch.device) -> float:
    """Seconds of `biounet.predict.predict_files` on ``tmp/image.tif`` in this process: file to
    file without the interpreter's start and the imports."""
    from biounet.configs import PredictConfig
    from biounet.predict import predict_files

    config = PredictConfig(engine=engine, precision=precision, cache=cache)
    t = time.perf_counter()
    predict_files(tmp / "model", [tmp / "image.tif"], tmp / "inside", config, device)
    return time.perf_counter() - t


def training_rate(net: UNetConfig, steps: int, device: torch.device) -> float:
    """Tiles/s of `fit` after warm-up: (time of 2 + steps) - (time of 2 steps), over steps."""
    from scipy import ndimage

    from biounet.augment import AugmentConfig
    from biounet.checkpoints import DirectoryRecorder
    from biounet.data import DataConfig, load_sample
    from biounet.loop import TrainConfig, fit

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        samples = []
        for i in range(4):  # touching disks: the weight map has real borders to weigh
            centres = rng.uniform(0, 520, (60, 2))
            yy, xx = np.mgrid[:520, :696]
            dist = np.full((520, 696), np.inf)
            labels = np.zeros((520, 696), np.uint16)
            for k, (cy, cx) in enumerate(centres, 1):
                d = np.hypot(yy - cy, xx - cx * 696 / 520)
                closer = (d < 18) & (d < dist)
                labels[closer], dist[closer] = k, d[closer]
            image = ndimage.gaussian_filter((labels > 0) * 200.0, 2) + rng.normal(
                20, 5, labels.shape
            )
            tifffile.imwrite(Path(tmp) / f"{i}.tif", image.astype(np.uint16))
            tifffile.imwrite(Path(tmp) / f"{i}_mask.tif", labels)
            samples.append(
                load_sample(
                    Path(tmp) / f"{i}.tif",
                    Path(tmp) / f"{i}_mask.tif",
                    net,
                    NormalizeConfig(),
                    DataConfig(),
                )
            )
        info = ModelInfo(net, ("background", "cell"))
        times = []
        for n in (2, 2 + steps):
            cfg = TrainConfig(
                steps=n,
                tile=388,
                val_every=10**6,
                checkpoint_every=10**6,
                log_every=10**6,
                precision="auto",
            )
            torch.manual_seed(0)
            with tempfile.TemporaryDirectory() as out:
                t = time.perf_counter()
                recorder = DirectoryRecorder(Path(out))
                fit(UNet(net), info, samples, [], cfg, recorder, augment=AugmentConfig(),
                    device=device)  # fmt: skip
                times.append(time.perf_counter() - t)
    return steps / (times[1] - times[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096, help="image side for rows a, b")
    p.add_argument("--whole", type=int, default=2048, help="image side for row c")
    p.add_argument("--base-channels", type=int, default=64)
    p.add_argument(
        "--rows",
        default="a,f,b,c,s,t",
        help="a, f (forward only, with a), b, c, s (tile sweep), t (training)",
    )
    p.add_argument("--train-steps", type=int, default=6)
    p.add_argument(
        "--engines",
        help="engines of row (a), each file to file (default: auto and every installed one; "
        "on a GPU auto and torch)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="where every row computes (cuda: the limit is the GPU's measured matrix-product "
        "rate, MONAI runs on the same GPU)",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32"),
        help="fp32: the rows of a CPU without fast bf16 (row a, b fp32, limit fp32)",
    )
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no GPU here")
    gpu = device.type == "cuda"
    engines = args.engines or ",".join(("auto", "torch") if gpu else ("auto", *installed()))
    rows = set(args.rows.split(","))
    valid = UNetConfig(base_channels=args.base_channels)
    same = UNetConfig(base_channels=args.base_channels, padding="same")
    precision = resolve_precision(args.precision, device)
    fast = precision  # the limit that applies to `auto`: its precision's product rate
    where = torch.cuda.get_device_name(device) if gpu else f"CPU class {cpu_class()}"
    print(
        f"# {time.strftime('%F %H:%M')}, {platform.machine()} ({where}), "
        f"torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, auto precision = {precision}, "
        f"U-Net depth 4 base {args.base_channels}"
    )
    peak = matmul_rates(device=device)
    side = 8192 if gpu else 4096
    print(f"matrix product {side}^3: {format_rates(peak)}", flush=True)
    mpix = args.size**2 / 1e6
    work = flops_per_output_pixel(valid, args.size) * args.size**2
    limit = {k: mpix / (work / v) for k, v in peak.items()}  # megapixels/s at the limit
    print(
        f"(d) compute limit, {args.size}^2 ({work / 1e12:.1f} TFLOP, valid network, no "
        f"tiling overhead): " + ", ".join(f"{k} {v:.3f} MP/s" for k, v in sorted(limit.items()))
    )
    results: dict[str, float] = {}
    torch.manual_seed(0)
    model = UNet(valid)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image = synthetic_image(args.size)
        if "a" in rows:
            save_model(tmp / "model", model, ModelInfo(valid, ("background", "foreground")))
            tifffile.imwrite(tmp / "image.tif", image)
            cache = tmp / "cache"  # each runtime converts once, in a warm-up on a small image
            tifffile.imwrite(tmp / "small.tif", image[:300, :300])
            for engine in engines.split(","):
                chosen, prec = choose(engine, args.precision, device, valid)
                child = [*BIOUNET_PREDICT, str(tmp / "model"), "--device", args.device,
                         "--engine", engine, "--precision", args.precision]  # fmt: skip
                env = {"BIOUNET_CACHE": str(cache)}
                run_child([*child, str(tmp / "small.tif"), "--out", str(tmp / "warm")], env, gpu)
                seconds, rss = run_child(
                    [*child, str(tmp / "image.tif"), "--out", str(tmp / "pred")], env, gpu
                )
                key = "a" if engine == "auto" else f"a_{engine}"
                results[key] = mpix / seconds
                print(
                    f"(a) biounet predict --engine {engine} ({chosen}, {prec}), file to file: "
                    f"{seconds:.1f} s, {results[key]:.3f} MP/s = "
                    f"{results[key] / limit[fast] * 100:.0f} % of the {fast} limit; "
                    f"peak RSS {rss:.0f} MB",
                    flush=True,
                )
                plan = engine_plan(valid, image.shape, Tiling(), prec, chosen)
                print(f"    tile {plan.tile_shape[0]}->{plan.y.tile_out} px at {prec}, "
                      f"{plan.count(image.shape)} tiles", flush=True)  # fmt: skip
                if "f" in rows:
                    start, _ = run_child(
                        [*child, str(tmp / "small.tif"), "--out", str(tmp / "warm")], env, gpu
                    )
                    alone = forward_only(model, image, engine, args.precision, cache, device)
                    inside = in_process(tmp, engine, args.precision, cache, device)
                    print(
                        f"    (f) forward only, the same tiles in process: {alone:.1f} s; "
                        f"file to file / forward only = {seconds / alone:.3f}; start-up "
                        f"(a whole run on 300 x 300 px) {start:.1f} s; file to file in this "
                        f"process (after the imports) {inside:.1f} s = {inside / alone:.3f}",
                        flush=True,
                    )
        x = torch.from_numpy(normalize(image[None], NormalizeConfig()))[None]
        padded = UNet(same)
        padded.load_state_dict(model.state_dict())
        padded.eval()
        if "b" in rows:
            # MONAI as its examples run it (fp32, default layout), and at its best on this
            # CPU: the precision and layout biounet's torch predicts in
            best = inference_format(precision, device)
            for key, prec, fmt in (("b_fp32", "fp32", torch.contiguous_format),
                                   ("b_best", precision, best)):  # fmt: skip
                if key == "b_best" and (prec, fmt) == ("fp32", torch.contiguous_format):
                    continue
                seconds = monai_row(padded, x, prec, fmt, device)
                results[key] = mpix / seconds
                print(
                    f"(b) MONAI sliding window, {prec}, {str(fmt).split('.')[-1]}: "
                    f"{seconds:.1f} s, {results[key]:.3f} MP/s",
                    flush=True,
                )
        if "c" in rows:
            xw = x[..., : args.whole, : args.whole].to(device).contiguous()
            padded.to(device)
            with torch.inference_mode():
                if gpu:
                    padded(xw[..., :256, :256])  # warm-up (cuDNN's choice of kernels)
                t = time.perf_counter()
                padded(xw)
                if gpu:
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - t
            padded.to(CPU)
            results["c"] = args.whole**2 / 1e6 / seconds
            print(
                f"(c) whole-image fp32 forward, {args.whole}^2: {seconds:.1f} s, "
                f"{results['c']:.3f} MP/s",
                flush=True,
            )
    for a in sorted(k for k in results if k.startswith("a")):
        for key, label in (("b_fp32", "MONAI fp32"), ("b_best", "MONAI's best"), ("c", "whole"),
                           ("a_torch", "torch")):  # fmt: skip
            if key in results and key != a:
                print(f"    ({a}) / {label}: {results[a] / results[key]:.2f}x")
    if "s" in rows:
        forward = model_forward(copy.deepcopy(model), precision, device)
        print("tile sweep, forward only, batch 1:")
        for out in (388, 580, 772, 964, 1156):
            size = out + 2 * valid.margin
            batch = np.zeros((1, 1, size, size), np.float32)
            seconds = median_time(lambda b=batch: forward(b), 3, warmup=True)
            print(
                f"    tile {size}->{out}: {seconds:.2f} s, {out**2 / 1e6 / seconds:.3f} MP/s "
                f"(limit {limit[fast]:.3f}), kept/computed area {out**2 / size**2:.2f}",
                flush=True,
            )
    if "t" in rows:
        rate = training_rate(valid, args.train_steps, device)
        train_limit = peak[fast] / (3 * valid.forward_flops(572, 572))
        print(
            f"training, 572->388 tiles, augmentation + weight maps: {rate:.3f} tiles/s; "
            f"limit (3 x forward FLOPs at the {fast} rate) {train_limit:.3f} tiles/s = "
            f"{rate / train_limit * 100:.0f} %"
        )
    print(json.dumps({"limit_mp_s": limit, "matmul_flops": peak, "results": results}))


if __name__ == "__main__":
    main()
