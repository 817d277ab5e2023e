"""Cellpose 3 trained from scratch on a time budget: the peer row (d) of bench/bbbc039.py.

Runs in its own virtual environment (cellpose 3.1.1.3 pins numpy < 2.1), so it imports nothing
from biounet: `bench/bbbc039.py` calls it as a subprocess and scores the label images it writes.

Recipe = the cellpose command line's training defaults (`python -m cellpose --train`): SGD,
learning rate 0.2, weight decay 1e-5, batch 8, 224 px crops, diameter rescaling to 30 px,
grayscale (channels [0, 0]), no pretrained weights (`--pretrained_model None`), its default
500 epochs. Training stops when the budget is spent (checked before each batch). The flow
fields are computed before the clock starts, as biounet's weight maps are. On this CPU the
budget ends well before epoch 400, where the schedule's only decay starts, so the run is
exactly a shorter run with its defaults: 10 warm-up epochs, then the constant rate.

`--precision bf16` gives Cellpose the fast path biounet uses on this CPU (bf16 autocast,
channels-last; ~3.7x faster per batch than its stock fp32 here), for training and
prediction alike; Cellpose's own MKL-DNN input conversion is switched off for it, as the
two do not combine. `--precision fp32` is Cellpose as shipped.

Usage (normally from bench/bbbc039.py):
  .venv-cellpose/bin/python bench/cellpose_peer.py --train-images DIR --train-masks DIR \
      --val-images DIR --out DIR --budget 15
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from cellpose import dynamics, models, train
from cellpose import io as cp_io


def read(path: Path) -> np.ndarray:
    return cp_io.imread(str(path))


def new_model() -> models.CellposeModel:
    return models.CellposeModel(gpu=False, pretrained_model=False, model_type=None, diam_mean=30.0)


def use_bf16(net: torch.nn.Module) -> None:
    """Run the network under bf16 autocast in channels-last; outputs back to fp32 for the loss."""
    net.mkldnn = False  # its to_mkldnn() input conversion fails under autocast
    net.to(memory_format=torch.channels_last)
    forward = net.forward

    def fast_forward(x, *args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward(x.contiguous(memory_format=torch.channels_last), *args, **kwargs)
        return tuple(o.float() if torch.is_tensor(o) else o for o in out)

    net.forward = fast_forward


class BudgetSpent(Exception):
    pass


def fit(model, images, labels, budget_s: float, save: Path) -> int:
    """Train until the budget is spent; return the number of batches trained.

    `labels` are label images or the flows `dynamics.labels_to_flows` made of them.
    """
    deadline = time.perf_counter() + budget_s
    augment = train.transforms.random_rotate_and_resize
    batches = 0

    def guarded(*args, **kwargs):
        nonlocal batches
        if time.perf_counter() > deadline:
            raise BudgetSpent
        batches += 1
        return augment(*args, **kwargs)

    train.transforms.random_rotate_and_resize = guarded
    try:
        train.train_seg(
            model.net,
            train_data=images,
            train_labels=labels,
            channels=[0, 0],
            normalize=True,
            learning_rate=0.2,
            weight_decay=1e-5,
            SGD=True,
            batch_size=8,
            n_epochs=500,
            save_path=str(save),
            save_every=10**6,
            model_name="cellpose_scratch",
        )
    except BudgetSpent:
        pass
    finally:
        train.transforms.random_rotate_and_resize = augment
    return batches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-images", type=Path, required=True)
    p.add_argument("--train-masks", type=Path, required=True)
    p.add_argument("--val-images", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget", type=float, default=15.0, help="training minutes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    stems = sorted(f.stem for f in args.train_images.iterdir() if not f.name.startswith("."))
    images = [read(next(args.train_images.glob(f"{s}.*"))) for s in stems]
    masks = [read(next(args.train_masks.glob(f"{s}.*"))).astype(np.int32) for s in stems]
    work = args.out / "work"
    work.mkdir(exist_ok=True)

    t0 = time.perf_counter()
    flows = dynamics.labels_to_flows(masks, device=torch.device("cpu"))
    flows_s = time.perf_counter() - t0
    # train_seg drops images with fewer than 5 objects (min_train_masks): epochs count the rest
    n_kept = sum(len(np.unique(m)) - 1 >= 5 for m in masks)

    model = new_model()
    if args.precision == "bf16":
        use_bf16(model.net)
    t0 = time.perf_counter()
    batches = fit(model, images, flows, 60 * args.budget, work)
    train_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    val = sorted(f for f in args.val_images.iterdir() if not f.name.startswith("."))
    # The mean training diameter: eval rescales by diam_mean / diameter, as training did.
    diameter = float(model.net.diam_labels.item())
    for f in val:
        labels = model.eval(read(f), channels=[0, 0], diameter=diameter)[0]
        tifffile.imwrite(args.out / f"{f.stem}.tif", labels.astype(np.uint16))
    meta = {
        "batches": batches,
        "epochs": batches / -(-n_kept // 8),
        "flows_s": flows_s,
        "precision": args.precision,
        "train_s": train_s,
        "predict_s": time.perf_counter() - t0,
        "diam_labels": diameter,
        "torch_threads": torch.get_num_threads(),
    }
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2))
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
