"""ISBI 2012 EM membranes: biounet against a classical baseline, the padded variant and MONAI.

One run, same split, same CPU wall-clock training budget per trained row:
  (a) biounet: the paper's valid U-Net with elastic deformation and the border weight map,
      trained by `biounet train` (it was the shipped model until bench/release.py
      trained models/isbi2012 on all 25 slices);
  (b) the padded ("same") variant trained without elastic deformation and weight map;
  (c) MONAI BasicUNet + DiceCELoss + Adam + MONAI's elastic/flip/rotate augmentation;
  (d) a classical baseline: Gaussian-smoothed intensity threshold, fitted on the training slices.
The 25 public slices are consecutive sections: slices 00-19 train, the contiguous block 20-24
validates (no random pick: neighbours are near-duplicates). Metrics on 20-24: ISBI pixel error
(1 - best pixel F-score), fraction of wrong pixels at 0.5, Rand error (1 - V_rand),
V_info and the warping error, all from `biounet.metrics`.

Usage (every row, (a) with the shipped model's recipe; docs/benchmarks.md has the commands
of each published row):
  .venv/bin/python bench/isbi2012.py --data ../shared/data --budget 20 --out runs/isbi2012 \
      --w0 3 --no-class-balance --batch-size 4 --tile 196
Needs MONAI for row (c): `.venv/bin/pip install -c constraints.txt monai` (`make bench-deps`).
"""

from __future__ import annotations

import json
import math
import platform
import shlex
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

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
from biounet.metrics import pixel_error, rand_scores, warping_error
from biounet.normalize import NormalizeConfig, normalize

TRAIN = [f"{i:02d}" for i in range(20)]
VAL = [f"{i:02d}" for i in range(20, 25)]


def make_split(data: Path, out: Path) -> dict[str, Path]:
    """Symlinked train/val folders (nothing copied)."""
    dirs = {}
    for part, stems in (("train", TRAIN), ("val", VAL)):
        for kind in ("images", "labels"):
            d = out / "split" / part / kind
            d.mkdir(parents=True, exist_ok=True)
            for s in stems:
                link = d / f"{s}.png"
                if not link.exists():
                    link.symlink_to((data / "isbi2012" / kind / f"{s}.png").resolve())
            dirs[f"{part}_{kind}"] = d
    return dirs


def truth_membranes(data: Path, stems: list[str]) -> list[np.ndarray]:
    return [read_mask(data / "isbi2012" / "labels" / f"{s}.png") == 0 for s in stems]


def score(probs: list[np.ndarray], truths: list[np.ndarray]) -> dict:
    """Mean over the validation slices of the ISBI metrics of membrane probabilities."""
    rows = []
    for p, t in zip(probs, truths, strict=True):
        p = np.clip(p, 0.0, 1.0)
        px = pixel_error(p, t)
        rs = rand_scores(p, t)
        rows.append(
            {
                "pixel_error": px["pixel_fscore_error"],
                "wrong_pixels": px["pixel_error"],
                # Where the wrong pixels are: drawn too thick, or gaps.
                "false_membrane": float(np.mean((p > 0.5) & ~t)),
                "missed_membrane": float(np.mean((p <= 0.5) & t)),
                "rand_error": rs["rand_error"],
                "v_rand": rs["v_rand"],
                "v_rand_split": rs["v_rand_split"],
                "v_rand_merge": rs["v_rand_merge"],
                "rand_threshold": rs["rand_threshold"],
                "v_info": rs["v_info"],
                "warping_error": warping_error(p, t)["warping_error"],
            }
        )
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def predict_command(model: Path, images: Path, pred: Path, tta: bool, device: str) -> list[str]:
    """`biounet predict` of membrane probabilities for the validation slices."""
    return [
        *BIOUNET, "predict", str(model), str(images), "--out", str(pred), "--output", "prob",
        "--device", device, "--tta" if tta else "--no-tta",
    ]  # fmt: skip


def biounet_row(
    dirs: dict,
    model: Path,
    budget: float,
    extra: list[str],
    out: Path,
    tta: bool,
    skip_train: bool = False,
) -> tuple[list[np.ndarray], dict]:
    train_cmd = [
        *train_command(
            dirs["train_images"], dirs["train_labels"], dirs["val_images"], dirs["val_labels"],
            model, budget,
        ),
        "--foreground", "0", "--cell-class", "0", "--class-names", "interior,membrane",
        *extra,
    ]  # fmt: skip
    t_train = 60.0 * budget  # when reusing a trained model: the budget it trained under
    if not skip_train:
        if model.exists():
            import shutil

            shutil.rmtree(model)
        t_train = run(train_cmd)
    use_final_weights(model)
    pred = out / f"pred_{model.name}"  # one folder per model: variants of a row keep theirs
    t_pred = run(predict_command(model, dirs["val_images"], pred, tta, "cpu"))
    probs = [tifffile.imread(pred / f"{s}.tif")[1] for s in VAL]
    config = json.loads((model / "config.json").read_text())
    return probs, {
        "train_s": t_train,
        "predict_s": t_pred,
        "steps": config["training"]["steps_done"],
        "command": " ".join(shlex.quote(c) for c in train_cmd),
    }


def threshold_row(data: Path) -> tuple[list[np.ndarray], dict]:
    """Smoothed intensity, membrane where dark: sigma and threshold fitted on the train slices."""
    from scipy import ndimage

    def load(stems):
        return [
            normalize(read_image(data / "isbi2012" / "images" / f"{s}.png"), NormalizeConfig())[0]
            for s in stems
        ]

    train_imgs, train_truth = load(TRAIN), truth_membranes(data, TRAIN)
    t0 = time.perf_counter()
    best = (math.inf, None, None)
    for sigma in (0.5, 1.0, 1.5, 2.0, 3.0):
        smooth = [ndimage.gaussian_filter(x, sigma) for x in train_imgs]
        for thr in np.linspace(0.05, 0.95, 37):
            err = np.mean(
                [np.mean((s < thr) != t) for s, t in zip(smooth, train_truth, strict=True)]
            )
            if err < best[0]:
                best = (err, sigma, thr)
    _, sigma, thr = best
    # A soft membrane "probability" that crosses 0.5 at the fitted threshold, so the metrics'
    # threshold sweeps can trade thickness against merges as they do for the networks.
    probs = [1 / (1 + np.exp((ndimage.gaussian_filter(x, sigma) - thr) / 0.05)) for x in load(VAL)]
    return probs, {
        "train_s": time.perf_counter() - t0,
        "predict_s": 0.0,
        "steps": 0,
        "command": f"gaussian sigma={sigma}, threshold={thr:.3f} (fitted on 00-19)",
    }


def monai_row(
    data: Path,
    budget: float,
    seed: int = 0,
    steps: int | None = None,
    device: torch.device | None = None,
) -> tuple[list[np.ndarray], dict]:
    """MONAI's own recipe: BasicUNet, DiceCELoss, Adam, dictionary transforms, sliding window.

    Trains for `budget` minutes, or for exactly `steps` steps where given (bench/isbi2012_seeds.py
    replays the CPU budget's step count on a faster device).
    """
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
    from monai.networks.nets import BasicUNet
    from monai.transforms import (
        Compose,
        Rand2DElasticd,
        RandFlipd,
        RandRotate90d,
        RandSpatialCropd,
    )

    from biounet.precision import autocast, resolve_precision

    torch.manual_seed(seed)
    norm = NormalizeConfig()
    items = [
        {
            "image": normalize(read_image(data / "isbi2012" / "images" / f"{s}.png"), norm),
            "label": (read_mask(data / "isbi2012" / "labels" / f"{s}.png") == 0)[None].astype(
                np.float32
            ),
        }
        for s in TRAIN
    ]
    transforms = Compose(
        [
            RandSpatialCropd(keys=["image", "label"], roi_size=(256, 256), random_size=False),
            Rand2DElasticd(
                keys=["image", "label"],
                spacing=(30, 30),
                magnitude_range=(5, 6),
                prob=0.5,
                rotate_range=(np.pi / 4,),
                padding_mode="reflection",
                mode=("bilinear", "nearest"),
            ),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=1),
            RandRotate90d(keys=["image", "label"], prob=0.5),
        ]
    )
    transforms.set_random_state(seed)
    device = device or torch.device("cpu")
    precision = resolve_precision("auto", device)  # bf16 autocast where fast: a fair peer
    if precision == "fp16":  # this loop has no loss scaling; fp16 gradients would underflow
        precision = "fp32"
    net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2).to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    t0, step_count = time.perf_counter(), 0
    net.train()
    while step_count < steps if steps is not None else time.perf_counter() - t0 < 60 * budget:
        batch = [transforms(items[i]) for i in rng.integers(0, len(items), 4)]
        x = torch.stack([torch.as_tensor(b["image"]) for b in batch]).float().to(device)
        y = torch.stack([torch.as_tensor(b["label"]) for b in batch]).float().to(device)
        with autocast(precision, device):
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step_count += 1
    t_train = time.perf_counter() - t0
    net.eval()
    probs, t0 = [], time.perf_counter()
    for s in VAL:
        x = torch.as_tensor(normalize(read_image(data / "isbi2012" / "images" / f"{s}.png"), norm))[
            None
        ].float()
        with torch.inference_mode(), autocast(precision, device):
            out = sliding_window_inference(
                x.to(device), (512, 512), 4, net, overlap=0.25, mode="gaussian"
            )
        probs.append(torch.softmax(out.float(), 1)[0, 1].cpu().numpy())
    return probs, {
        "train_s": t_train,
        "predict_s": time.perf_counter() - t0,
        "steps": step_count,
        "command": "BasicUNet(2D, features (32,32,64,128,256,32)), DiceCELoss, "
        "Adam 1e-3, 4 x 256^2 crops, Rand2DElasticd/RandFlipd/"
        "RandRotate90d, sliding_window_inference roi 512 gaussian",
    }


def main() -> None:
    p = split_bench_args(__doc__, "isbi2012", 20.0, "d,a,b,c")
    p.add_argument("--no-tta", action="store_true", help="row (a) without 8-fold TTA")
    p.add_argument(
        "--w0",
        type=float,
        default=3.0,
        help="row (a): border weight w0 (3: on EM, where every membrane pixel lies "
        "between two cells, the paper's 10 draws membranes too thick)",
    )
    p.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default="cosine",
        help="rows a, b: learning-rate schedule (cosine: decays to 0 over the budget)",
    )
    p.add_argument("--batch-norm", action="store_true", help="row (a): batch normalisation")
    p.add_argument("--seed", type=int, default=0, help="rows a, c: training seed")
    p.add_argument("--tile", type=int, default=388, help="row (a): output tile side")
    p.add_argument("--batch-size", type=int, default=1, help="row (a): tiles per step")
    p.add_argument(
        "--no-class-balance",
        action="store_true",
        help="row (a): border term only, no class-frequency balance w_c",
    )
    p.add_argument(
        "--dice",
        type=float,
        default=0.0,
        help="row (a): weight of a soft Dice term added to the weighted cross-entropy",
    )
    p.add_argument(
        "--skip-train",
        action="store_true",
        help="rows a, b: score the models already trained in --ship and --out",
    )
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dirs = make_split(args.data, args.out)
    truths = truth_membranes(args.data, VAL)
    width = ["--base-channels", str(args.base_channels)]
    header = (
        f"{time.strftime('%F %H:%M')}, {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, budget {args.budget} min/row"
    )
    print("#", header, flush=True)
    results = {}
    for row in args.rows.split(","):
        if row == "a":
            probs, meta = biounet_row(
                dirs,
                args.ship,
                args.budget,
                [
                    *width,
                    "--optimizer",
                    "adam",
                    "--lr",
                    "0.001",
                    "--save-dtype",
                    "float16",
                    "--w0",
                    str(args.w0),
                    "--lr-schedule",
                    args.lr_schedule,
                    *(["--batch-norm"] if args.batch_norm else []),
                    *(["--no-class-balance"] if args.no_class_balance else []),
                    *(["--dice", f"{args.dice:g}"] if args.dice else []),
                    "--seed",
                    str(args.seed),
                    "--tile",
                    str(args.tile),
                    "--batch-size",
                    str(args.batch_size),
                    "--val-every",
                    "200",
                    "--checkpoint-every",
                    "200",
                ],
                args.out,
                not args.no_tta,
                args.skip_train,
            )
            name = (
                f"(a) biounet U-Net, valid, elastic + weight map w0={args.w0:g}, "
                f"lr {args.lr_schedule}"
                + (", batch norm" if args.batch_norm else "")
                + (", no class balance" if args.no_class_balance else "")
                + (f", + {args.dice:g} x Dice" if args.dice else "")
                + (f", seed {args.seed}" if args.seed else "")
                + (
                    f", {args.batch_size} x {args.tile}² tiles"
                    if (args.batch_size, args.tile) != (1, 388)
                    else ""
                )
                + (", TTA" if not args.no_tta else "")
            )
        elif row == "b":
            probs, meta = biounet_row(
                dirs,
                args.out / "model_b",
                args.budget,
                [
                    *width,
                    "--padding",
                    "same",
                    "--no-augment",
                    "--w0",
                    "0",
                    "--lr-schedule",
                    args.lr_schedule,
                    "--optimizer",
                    "adam",
                    "--lr",
                    "0.001",
                    "--val-every",
                    "200",
                    "--checkpoint-every",
                    "200",
                ],
                args.out,
                False,
                args.skip_train,
            )
            name = f"(b) padded U-Net, no elastic, no weight map, lr {args.lr_schedule}"
        elif row == "c":
            probs, meta = monai_row(args.data, args.budget, seed=args.seed)
            name = "(c) MONAI BasicUNet + DiceCELoss" + (f", seed {args.seed}" if args.seed else "")
        elif row == "d":
            probs, meta = threshold_row(args.data)
            name = "(d) smoothed intensity threshold"
        else:
            raise SystemExit(f"unknown row {row!r}")
        # Kept for later looks (thresholds, split/merge parts) without retraining.
        tag = args.ship.name if row == "a" else row  # variants of (a) differ by --ship
        if row == "c" and args.seed:
            tag += f"_s{args.seed}"
        tifffile.imwrite(args.out / f"probs_{tag}.tif", np.stack(probs).astype(np.float32))
        results[name] = score(probs, truths) | meta
        print(name, json.dumps(results[name]), flush=True)
    rows = save_rows(args.out / "results.json", header, results)
    print_table(
        header,
        [
            ("pixel error", lambda r: f"{r['pixel_error']:.4f}"),
            ("wrong px @0.5", lambda r: f"{r['wrong_pixels']:.4f}"),
            ("Rand error", lambda r: f"{r['rand_error']:.4f}"),
            ("V_info", lambda r: f"{r['v_info']:.4f}"),
            ("warping error", lambda r: f"{r['warping_error']:.5f}"),
            ("train min", lambda r: f"{r['train_s'] / 60:.1f}"),
            ("steps", lambda r: r["steps"]),
        ],
        rows,
    )


if __name__ == "__main__":
    main()
