"""Score a model on labelled images it was not trained on, with one fixed protocol.

The release models are judged on images that are not in ../shared/data; every
cross-validation fold (bench/crossval.py) is scored the same way, so that a recipe's
cross-validated mean predicts what it does there. The prediction is the plain command a user
types, `biounet predict MODEL IMAGES --out DIR` (`--output instances` for instances), plus
whatever flags are given after ``--``.

Membranes (ISBI 2012-like EM; the truth's membrane value is 0 in ../shared/data):
  * pixel error: the fraction of pixels where the predicted mask (class 1 = membrane) and the
    true membranes differ;
  * predicted cells: the 4-connected non-membrane regions of the mask, the membrane pixels
    then given to the nearest region (`skimage.segmentation.expand_labels`);
  * true cells: the 4-connected non-membrane regions of the truth;
  * Rand error: 1 - the adapted Rand F-score (`skimage.metrics.adapted_rand_error`, the true
    membranes ignored); V_info split and merge (`skimage.metrics.variation_of_information`,
    the same pixels ignored). Each score is the mean over images.
Instances (BBBC039-like nuclei; 0 = background): matching at IoU >= t (`biounet.metrics`,
identical to stardist.matching), AP = TP / (TP + FP + FN) with TP, FP, FN pooled over the
images, at t = 0.5 and 0.75, and mean AP over t = 0.5, 0.55, ..., 0.95.

Usage:
  .venv/bin/python bench/score_unseen.py membranes models/isbi2012 IMAGES LABELS --out runs/u
  .venv/bin/python bench/score_unseen.py instances models/bbbc039 IMAGES MASKS --out runs/u
  ... -- --tta            (flags after -- go to `biounet predict`)
  ... --predictions DIR   (score masks already predicted there; no prediction is run)
Prints one table row and writes OUT/scores.json (per image and overall).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from skimage.measure import label
from skimage.metrics import adapted_rand_error, variation_of_information
from skimage.segmentation import expand_labels

from _common import BIOUNET, run
from biounet.io import list_images, pair_by_stem, read_mask
from biounet.metrics import instance_scores, pool_instance_scores

KINDS = ("membranes", "instances")


def membrane_cells(membrane: np.ndarray) -> np.ndarray:
    """Cells of a membrane mask: 4-connected non-membrane regions, grown over the membranes.

    Parameters
    ----------
    membrane : ndarray of bool, shape (H, W)

    Returns
    -------
    ndarray of int, shape (H, W)
        Labels 1..N, every pixel in one (all 0 when the mask has no non-membrane pixel).

    Examples
    --------
    >>> m = np.zeros((3, 5), bool); m[:, 2] = True
    >>> membrane_cells(m)[0].tolist()
    [1, 1, 1, 2, 2]
    """
    cells = label(~membrane, connectivity=1)
    return expand_labels(cells, distance=sum(membrane.shape))


def true_cells(membrane: np.ndarray) -> np.ndarray:
    """4-connected non-membrane regions of the truth, 0 on its membranes (ignored in scores)."""
    return label(~membrane, connectivity=1)


def membrane_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """The membrane protocol's scores of one image.

    Parameters
    ----------
    pred, truth : ndarray of bool, shape (H, W)
        Predicted and true membranes.

    Returns
    -------
    dict
        ``pixel_error``, ``rand_error``, ``vi_split``, ``vi_merge`` (float).
    """
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from the truth's {truth.shape}")
    cells, truth_cells = membrane_cells(pred), true_cells(truth)
    rand, _, _ = adapted_rand_error(truth_cells, cells, ignore_labels=(0,))
    split, merge = variation_of_information(truth_cells, cells, ignore_labels=(0,))
    return {
        "pixel_error": float(np.mean(pred != truth)),
        "rand_error": float(rand),
        "vi_split": float(split),
        "vi_merge": float(merge),
    }


def summarize(kind: str, per_image: dict[str, dict]) -> dict[str, float]:
    """Overall scores: means over images (membranes), pooled matching (instances)."""
    if kind == "membranes":
        keys = next(iter(per_image.values())).keys()
        return {k: float(np.mean([s[k] for s in per_image.values()])) for k in keys}
    pooled = pool_instance_scores(list(per_image.values()))
    ap = dict(zip(pooled["thresholds"], pooled["ap"], strict=True))
    return {"ap50": ap[0.5], "ap75": ap[0.75], "mean_ap": pooled["mean_ap"],
            "n_true": pooled["n_true"], "n_pred": pooled["n_pred"]}  # fmt: skip


def score_folder(kind: str, predictions: Path, images: Path, truths: Path,
                 membrane_value: int = 0) -> dict:  # fmt: skip
    """Score the predictions ``STEM.tif`` in `predictions` of every image in `images`."""
    per_image = {}
    for image, truth_path in pair_by_stem(list_images(images), truths):
        pred = read_mask(predictions / f"{image.stem}.tif")
        truth = read_mask(truth_path)
        if kind == "membranes":
            per_image[image.stem] = membrane_scores(pred == 1, truth == membrane_value)
        else:
            per_image[image.stem] = instance_scores(pred, truth)
    return {"overall": summarize(kind, per_image), "per_image": per_image}


def predict_command(kind: str, model: Path, images: Path, out: Path, extra: list[str]) -> list:
    """The plain `biounet predict` a user types, plus `extra` flags."""
    output = ["--output", "instances"] if kind == "instances" else []
    return [*BIOUNET, "predict", str(model), str(images), "--out", str(out), *output, *extra]


def row(kind: str, overall: dict) -> str:
    """One markdown table row of the overall scores."""
    keys = ("pixel_error", "rand_error", "vi_merge", "vi_split") if kind == "membranes" else (
        "ap50", "mean_ap", "ap75")  # fmt: skip
    return "| " + " | ".join(f"{overall[k]:.4f}" for k in keys) + " |"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=KINDS)
    p.add_argument("model", type=Path)
    p.add_argument("images", type=Path)
    p.add_argument("truths", type=Path, help="labels (membranes) or instance masks")
    p.add_argument("--out", type=Path, default=Path("runs/score_unseen"))
    p.add_argument("--predictions", type=Path, help="score these masks; predict nothing")
    p.add_argument("--membrane-value", type=int, default=0, help="the truth's membrane value")
    args = p.parse_args(argv)
    predictions = args.predictions
    if predictions is None:
        predictions = args.out / "predictions"
        run(predict_command(args.kind, args.model, args.images, predictions, extra))
    result = score_folder(args.kind, predictions, args.images, args.truths, args.membrane_value)
    command = None
    if args.predictions is None:
        command = predict_command(args.kind, args.model, args.images, predictions, extra)[2:]
    result = {"kind": args.kind, "model": str(args.model), "command": command} | result
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scores.json").write_text(json.dumps(result, indent=1))
    print(row(args.kind, result["overall"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
