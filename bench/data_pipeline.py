"""Data pipeline cost against the training step it feeds (issue: the paper's training recipe).

Measures, on real data, in one run:
  1. weight map (class balance + border term) per image, computed once per image at load;
  2. one augmented 572x572 training tile (elastic + rotation + flips + gray, image cubic,
     labels nearest, weights linear) and one plain tile;
  3. one training step (forward + backward + SGD) of the paper's base-64 valid U-Net on that
     tile, at the training precision;
  4. training tiles/s through `fit`'s DataLoader with the pipeline on and off (0 and 1
     workers).

Usage:  .venv/bin/python bench/data_pipeline.py [--data ../shared/data] [--steps 8]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import median_time
from biounet.architecture import UNetConfig
from biounet.augment import AugmentConfig
from biounet.checkpoints import DirectoryRecorder
from biounet.data import DataConfig, TileDataset, load_sample, tile_geometry
from biounet.io import list_images, pair_by_stem
from biounet.loop import TrainConfig, fit
from biounet.losses import weighted_cross_entropy
from biounet.model import UNet
from biounet.modeldir import ModelInfo
from biounet.normalize import NormalizeConfig
from biounet.precision import autocast, memory_format, resolve_precision


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--steps", type=int, default=8, help="training steps per throughput run")
    p.add_argument("--images", type=int, default=5, help="BBBC039 images to load")
    args = p.parse_args()

    net = UNetConfig()  # the paper's network: depth 4, base 64, valid
    precision = resolve_precision("auto", torch.device("cpu"))
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, precision {precision}, {time.strftime('%F')}"
    )

    bbbc = args.data / "bbbc039"
    pairs = pair_by_stem(list_images(bbbc / "images"), bbbc / "masks")[: args.images]
    data = DataConfig()
    load_times, samples = [], []
    for image, mask in pairs:
        t = time.perf_counter()
        samples.append(load_sample(image, mask, net, NormalizeConfig(), data))
        load_times.append(time.perf_counter() - t)
    from biounet.weightmap import border_weights

    cells = [s.instances for s in samples]
    wm = statistics.median(median_time(lambda c=c: border_weights(c), 3) for c in cells)
    n_cells = statistics.median(len(np.unique(c)) - 1 for c in cells)
    load_ms = statistics.median(load_times) * 1000
    print(
        f"border weight map, 520x696, ~{n_cells:.0f} nuclei: {wm * 1000:.1f} ms/image "
        f"(once per image; full load incl. reading {load_ms:.0f} ms)"
    )

    geo = tile_geometry(net, 388)
    on = TileDataset(samples, geo, seed=0, length=10**6, augment=AugmentConfig())
    off = TileDataset(samples, geo, seed=0, length=10**6, augment=None)
    counter = iter(range(10**6))
    t_aug = median_time(lambda: on[next(counter)], 15)
    t_plain = median_time(lambda: off[next(counter)], 15)
    print(
        f"tile {geo.tile_in}->{geo.tile_out}: augmented {t_aug * 1000:.1f} ms, "
        f"plain {t_plain * 1000:.1f} ms"
    )

    torch.manual_seed(0)
    model = UNet(net).to(memory_format=memory_format(precision))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.99)
    image, target, weight = on[0]
    x = image[None].to(memory_format=memory_format(precision))

    def step():
        with autocast(precision, torch.device("cpu")):
            logits = model(x)
        loss = weighted_cross_entropy(logits, target[None], weight[None])
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up
    t_step = median_time(step, 3)
    print(f"training step, base-64 valid U-Net, 572x572: {t_step:.2f} s")
    print(
        f"data pipeline / step: {t_aug / t_step * 100:.1f} % per tile "
        f"(+ weight map amortised over the tiles drawn from each image)"
    )

    info = ModelInfo(net, ("background", "nucleus"))
    for aug, workers in ((None, 0), (AugmentConfig(), 0), (AugmentConfig(), 1)):
        cfg = TrainConfig(
            steps=args.steps,
            tile=388,
            num_workers=workers,
            val_every=10**6,
            checkpoint_every=10**6,
            log_every=10**6,
            precision="auto",
        )
        torch.manual_seed(0)
        m = UNet(net)
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            fit(m, info, samples, [], cfg, DirectoryRecorder(Path(tmp)), augment=aug)
            dt = time.perf_counter() - t
        label = "on " if aug else "off"
        print(
            f"training, pipeline {label}, {workers} worker(s): {args.steps / dt:.3f} tiles/s "
            f"({args.steps} steps, {dt:.1f} s incl. first-step warm-up and final save)"
        )


if __name__ == "__main__":
    main()
