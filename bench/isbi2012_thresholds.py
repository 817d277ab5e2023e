"""ISBI 2012: where the Rand error of a membrane probability map comes from, threshold by threshold.

For each saved probability stack (`probs_*.tif` from bench/isbi2012.py, slices 20-24) and each
threshold: V_rand with its split and merge parts as scored; the split part again with the
predicted-membrane pixels inside true cells left out (scored, each is a one-pixel segment, so
a membrane drawn thick reads as splits); the fraction of true cell pixels called membrane; and
the number of predicted segments. Means over the slices.

Usage:
  python bench/isbi2012_thresholds.py --data ../shared/data \
      runs/isbi2012_v2/probs_model_a_nocb_b4.tif runs/isbi2012_v2/probs_c_s1.tif
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from biounet.metrics import rand_info_scores
from isbi2012 import VAL, truth_membranes

CELLS = ndimage.generate_binary_structure(2, 1)  # 4-connected, as rand_scores


def at_threshold(prob: np.ndarray, true_membrane: np.ndarray, t: float) -> dict:
    true_seg, _ = ndimage.label(~true_membrane, structure=CELLS)
    pred_seg, n_pred = ndimage.label(prob < t, structure=CELLS)
    scored = rand_info_scores(pred_seg, true_seg)
    # True label 0 is ignored: this leaves out the predicted-membrane pixels in true cells.
    cut_only = rand_info_scores(pred_seg, np.where(pred_seg > 0, true_seg, 0))
    return {
        "v_rand": scored["v_rand"],
        "split": scored["v_rand_split"],
        "merge": scored["v_rand_merge"],
        "split_without_membrane_px": cut_only["v_rand_split"],
        "cell_px_called_membrane": float(np.mean(prob[~true_membrane] >= t)),
        "segments": n_pred,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--thresholds", default="0.3,0.5,0.7,0.85")
    p.add_argument("probs", type=Path, nargs="+", help="probs_*.tif, one plane per slice 20-24")
    args = p.parse_args()
    truths = truth_membranes(args.data, VAL)
    keys = ["v_rand", "split", "merge", "split_without_membrane_px", "cell_px_called_membrane"]
    print("| probabilities | threshold | " + " | ".join(keys) + " | segments |")
    print("|---|---|" + "---|" * (len(keys) + 1))
    for path in args.probs:
        stack = tifffile.imread(path)
        for t in map(float, args.thresholds.split(",")):
            rows = [at_threshold(p, m, t) for p, m in zip(stack, truths, strict=True)]
            mean = {k: np.mean([r[k] for r in rows]) for k in [*keys, "segments"]}
            cells = " | ".join(f"{mean[k]:.4f}" for k in keys)
            print(f"| {path.stem} | {t:g} | {cells} | {mean['segments']:.0f} |")


if __name__ == "__main__":
    main()
