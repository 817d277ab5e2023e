"""BBBC039 nuclei: biounet instances against its own ablation, a classical pipeline and Cellpose 3.

One run, same split, same CPU wall-clock training budget per trained row:
  (a) biounet: the paper's valid U-Net, elastic deformation, weight map with the border term
      (w0 = 10, sigma = 5), contact pixels of touching nuclei carved to background; trained by
      `biounet train`, instances by `biounet predict --output instances` (its output is the
      shipped model, models/bbbc039);
  (b) the same without the border term (w0 = 0: class balance only), the paper's ablation;
  (c) classical: Gaussian smoothing, Otsu threshold, hole filling, distance-transform
      watershed (scikit-image), smoothing and peak distance fitted on the training images;
  (d) Cellpose 3 (cellpose==3.1.1.3) trained from scratch with its command line's defaults
      (bench/cellpose_peer.py, in its own virtual environment .venv-cellpose), given the same
      bf16 autocast + channels-last fast path biounet uses on this CPU;
  (e) the same Cellpose as shipped (fp32), as a user would run it.
The budget bounds each training loop; label preprocessing (biounet's weight maps, Cellpose's
flow fields) runs before the clock starts, for both. "train min" is the loop's time.
Split: a fixed random pick (seed 39) of 20 of the 100 shared images validates, 80 train (the
images are independent fields of view, unlike ISBI's consecutive sections). Scores pooled
over the 20 validation images with `biounet.metrics`: AP = TP/(TP+FP+FN) at IoU 0.5, mean AP
over IoU 0.5:0.95, F1 at 0.5, merges, splits, SEG. Every row is scored with its final weights.

Usage:
  .venv/bin/python bench/bbbc039.py --data ../shared/data --budget 15 --out runs/bbbc039 \
      --ship models/bbbc039
Row (d) needs `python3 -m venv .venv-cellpose && .venv-cellpose/bin/pip install
torch==2.13.0 cellpose==3.1.1.3` (or --cellpose-python pointing at such an interpreter).
"""

from __future__ import annotations

import json
import platform
import shlex
import shutil
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.segmentation import relabel_sequential, watershed

from _common import (
    BIOUNET,
    print_table,
    run,
    save_rows,
    split_bench_args,
    train_command,
    use_final_weights,
)
from biounet.io import read_image, read_mask
from biounet.metrics import instance_scores, pool_instance_scores

N_VAL = 20


def make_split(data: Path, out: Path) -> tuple[dict[str, Path], list[str], list[str]]:
    """Symlinked train/val folders (nothing copied) and the stems of each part."""
    stems = sorted(f.stem for f in (data / "bbbc039" / "images").glob("*.tif"))
    if len(stems) < N_VAL + 10:
        raise SystemExit(f"{data / 'bbbc039' / 'images'}: expected ~100 images, found {len(stems)}")
    val = sorted(np.random.default_rng(39).choice(stems, N_VAL, replace=False).tolist())
    train = [s for s in stems if s not in val]
    dirs = {}
    for part, part_stems in (("train", train), ("val", val)):
        for kind, ext in (("images", "tif"), ("masks", "png")):
            d = out / "split" / part / kind
            if d.exists():
                shutil.rmtree(d)
            d.mkdir(parents=True)
            for s in part_stems:
                (d / f"{s}.{ext}").symlink_to((data / "bbbc039" / kind / f"{s}.{ext}").resolve())
            dirs[f"{part}_{kind}"] = d
    return dirs, train, val


def score(pred: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> dict:
    pooled = pool_instance_scores([instance_scores(pred[s], truth[s]) for s in truth])
    return {
        "ap50": pooled["ap"][0],
        "mean_ap": pooled["mean_ap"],
        "f1_50": pooled["f1"][0],
        "merges": pooled["merges"],
        "splits": pooled["splits"],
        "seg": pooled["seg"],
        "n_true": pooled["n_true"],
        "n_pred": pooled["n_pred"],
    }


def biounet_row(
    name: str, dirs: dict, model: Path, budget: float, extra: list[str], out: Path, skip: bool
) -> tuple[dict[str, np.ndarray], dict]:
    """Train (unless `skip`: score the model already in `model`), predict, read the labels."""
    train_cmd = [
        *train_command(
            dirs["train_images"], dirs["train_masks"], dirs["val_images"], dirs["val_masks"],
            model, budget,
        ),
        "--mask-type", "instances", "--class-names", "background,nucleus",
        *extra,
    ]  # fmt: skip
    t_wall = None
    if not skip:
        if model.exists():
            shutil.rmtree(model)
        t_wall = run(train_cmd)
    use_final_weights(model)
    pred = out / f"pred_{name}"
    t_pred = run(
        [
            *BIOUNET,
            "predict",
            str(model),
            str(dirs["val_images"]),
            "--out",
            str(pred),
            "--output",
            "instances",
            "--device",
            "cpu",
        ]
    )
    config = json.loads((model / "config.json").read_text())
    labels = {f.stem: tifffile.imread(f) for f in pred.glob("*.tif")}
    return labels, {
        "train_s": config["training"]["last"]["elapsed_s"],
        "train_wall_s": t_wall,
        "predict_s": t_pred,
        "steps": config["training"]["steps_done"],
        "precision": "bf16 autocast",
        "command": " ".join(shlex.quote(c) for c in train_cmd),
    }


def classical(image: np.ndarray, sigma: float, min_distance: int) -> np.ndarray:
    """Otsu foreground, split by a watershed on the distance transform from its maxima."""
    smooth = ndimage.gaussian_filter(image.astype(np.float32), sigma)
    fg = ndimage.binary_fill_holes(smooth > threshold_otsu(smooth))
    dist = ndimage.distance_transform_edt(fg)
    comps, _ = ndimage.label(fg)
    peaks = peak_local_max(dist, min_distance=min_distance, labels=comps, exclude_border=False)
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-dist, markers, mask=fg)
    sizes = np.bincount(labels.ravel())
    labels[(sizes < 20)[labels]] = 0  # specks
    return relabel_sequential(labels)[0]


def classical_row(data: Path, train: list[str], val: list[str]) -> tuple[dict, dict]:
    def load(stems):
        images = {s: read_image(data / "bbbc039" / "images" / f"{s}.tif")[0] for s in stems}
        masks = {s: read_mask(data / "bbbc039" / "masks" / f"{s}.png") for s in stems}
        return images, masks

    t0 = time.perf_counter()
    images, masks = load(train)
    best = (-1.0, None)
    for sigma in (1.0, 2.0):
        for md in (3, 5, 7, 9, 12, 15, 20):
            pred = {s: classical(images[s], sigma, md) for s in train}
            ap = score(pred, masks)["ap50"]
            if ap > best[0]:
                best = (ap, (sigma, md))
    sigma, md = best[1]
    t_fit = time.perf_counter() - t0
    images, _ = load(val)
    t0 = time.perf_counter()
    pred = {s: classical(images[s], sigma, md) for s in val}
    return pred, {
        "train_s": t_fit,
        "predict_s": time.perf_counter() - t0,
        "steps": 0,
        "precision": "fp64",
        "command": f"gaussian sigma={sigma}, Otsu, fill holes, EDT watershed from maxima "
        f"min_distance={md} (fitted on the training images: AP@0.5 {best[0]:.3f})",
    }


def cellpose_row(
    python: Path, dirs: dict, out: Path, budget: float, precision: str
) -> tuple[dict, dict]:
    pred = out / f"pred_cellpose_{precision}"
    cmd = [
        str(python),
        str(Path(__file__).with_name("cellpose_peer.py")),
        "--train-images",
        str(dirs["train_images"]),
        "--train-masks",
        str(dirs["train_masks"]),
        "--val-images",
        str(dirs["val_images"]),
        "--out",
        str(pred),
        "--budget",
        str(budget),
        "--precision",
        precision,
    ]
    run(cmd)
    meta = json.loads((pred / "meta.json").read_text())
    labels = {f.stem: tifffile.imread(f) for f in pred.glob("*.tif")}
    return labels, {
        "train_s": meta["train_s"],
        "predict_s": meta["predict_s"],
        "steps": meta["batches"],
        "precision": "bf16 autocast" if precision == "bf16" else "fp32",
        "command": f"cellpose 3.1.1.3 from scratch, CLI defaults (SGD lr 0.2, batch 8, "
        f"224 px, 500 epochs), stopped by the budget after {meta['epochs']:.1f} epochs",
    }


def main() -> None:
    p = split_bench_args(__doc__, "bbbc039", 15.0, "c,a,b,d,e")
    p.add_argument("--cellpose-python", type=Path, default=Path(".venv-cellpose/bin/python"))
    p.add_argument(
        "--skip-train",
        default="",
        help="comma-separated rows among a, b: score the models already trained",
    )
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dirs, train, val = make_split(args.data, args.out)
    truth = {s: read_mask(args.data / "bbbc039" / "masks" / f"{s}.png") for s in val}
    header = (
        f"{time.strftime('%F %H:%M')}, {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, budget {args.budget} min/row, "
        f"{len(train)} train / {len(val)} val images"
    )
    print("#", header, flush=True)
    common = [
        "--base-channels",
        str(args.base_channels),
        "--save-dtype",
        "float16",
        "--val-every",
        "500",
        "--checkpoint-every",
        "250",
    ]
    skip = set(args.skip_train.split(","))
    results = {}
    for row in args.rows.split(","):
        if row == "a":
            extra = [*common, "--w0", "10"]
            pred, meta = biounet_row(
                "a", dirs, args.ship, args.budget, extra, args.out, "a" in skip
            )
            name = "(a) biounet U-Net, border weight map w0=10"
        elif row == "b":
            model_b = args.out / "model_b"
            pred, meta = biounet_row(
                "b", dirs, model_b, args.budget, [*common, "--w0", "0"], args.out, "b" in skip
            )
            name = "(b) same, no border term (w0=0)"
        elif row == "c":
            pred, meta = classical_row(args.data, train, val)
            name = "(c) Otsu + distance-transform watershed"
        elif row == "d":
            pred, meta = cellpose_row(args.cellpose_python, dirs, args.out, args.budget, "bf16")
            name = "(d) Cellpose 3, from scratch, bf16 fast path"
        elif row == "e":
            pred, meta = cellpose_row(args.cellpose_python, dirs, args.out, args.budget, "fp32")
            name = "(e) Cellpose 3, from scratch, as shipped (fp32)"
        else:
            raise SystemExit(f"unknown row {row!r}")
        missing = set(truth) - set(pred)
        if missing:
            raise SystemExit(f"row {row}: no prediction for {sorted(missing)[:3]}")
        results[name] = score(pred, truth) | meta
        print(name, json.dumps(results[name]), flush=True)
        # Saved after every row, so an interrupted run keeps the rows it finished.
        rows = save_rows(args.out / "results.json", header, {name: results[name]}, val=val)
    print_table(
        header,
        [
            ("AP@0.5", lambda r: f"{r['ap50']:.3f}"),
            ("mean AP 0.5:0.95", lambda r: f"{r['mean_ap']:.3f}"),
            ("F1@0.5", lambda r: f"{r['f1_50']:.3f}"),
            ("merges", lambda r: r["merges"]),
            ("splits", lambda r: r["splits"]),
            ("SEG", lambda r: f"{r['seg']:.3f}"),
            ("precision", lambda r: r["precision"]),
            ("train min", lambda r: f"{r['train_s'] / 60:.1f}"),
            ("steps", lambda r: r["steps"]),
        ],
        rows,
    )


if __name__ == "__main__":
    main()
