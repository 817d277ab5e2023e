"""ISBI 2012: the seed spread of each recipe, at the step count it reaches in the CPU budget.

bench/isbi2012.py trains each row once for 20 CPU minutes; a second seed of row (a) moved its
Rand error by 0.03, more than the gap between rows. This script trains several seeds of each
recipe for a fixed number of steps (the number that recipe reached in the 20-minute CPU run,
given per recipe), on whatever device is present: on an H200 with 16 cores, six runs side by
side took about 3.3 minutes each. Same split (train 00-19, validate 20-24), same prediction
(8-fold TTA for biounet recipes, MONAI's sliding window for MONAI), same scoring as
bench/isbi2012.py.
Step-matched, not time-matched: a recipe that is slower per step on the CPU must be given its
smaller CPU step count.

Usage (on a GPU machine; recipes as NAME:STEPS, see RECIPES):
  python bench/isbi2012_seeds.py --data ../shared/data --out runs/isbi2012_seeds \
      --recipes a:2574,monai:2501 --seeds 0,1,2 --jobs 6
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import tifffile
import torch

from _common import BIOUNET, use_final_weights
from isbi2012 import VAL, make_split, monai_row, predict_command, score, truth_membranes

# Row (a) of bench/isbi2012.py and variants of it: flags after `biounet train`.
A = [
    "--foreground", "0", "--cell-class", "0", "--class-names", "interior,membrane",
    "--base-channels", "32", "--optimizer", "adam", "--lr", "0.001", "--save-dtype", "float16",
    "--w0", "3", "--lr-schedule", "cosine", "--val-every", "200", "--checkpoint-every", "200",
]  # fmt: skip
R = [*A, "--no-class-balance", "--batch-size", "4", "--tile", "196"]
RECIPES = {
    "a": A,
    "a_b2": [*A, "--batch-size", "2"],
    "a_b4_t196": [*A, "--batch-size", "4", "--tile", "196"],
    "a_nocb": [*A, "--no-class-balance"],
    # models/isbi2012's recipe before the Dice term (~1880 steps in the CPU budget)
    "a_nocb_b4_t196": R,
    # 2 x 2 on it: the paper's w0 10, and a soft Dice term; r_dice is models/isbi2012's recipe
    "r_w0_10": [*R, "--w0", "10"],
    "r_dice": [*R, "--dice", "1"],
    "r_w0_10_dice": [*R, "--w0", "10", "--dice", "1"],
    "a_w0_10": [*A, "--w0", "10"],
    "a_bn": [*A, "--batch-norm"],
    "a_lr5e-4": [*A, "--lr", "0.0005"],
    "monai": None,  # bench/isbi2012.py's monai_row
}


def run_quiet(cmd: list[str], log: Path, env: dict) -> None:
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env=env)


def one_run(args, dirs, truths, recipe: str, steps: int, seed: int, threads: int) -> dict:
    name = f"{recipe}_s{seed}"
    t0 = time.perf_counter()
    if RECIPES[recipe] is None:
        cmd = [sys.executable, __file__, "--data", str(args.data), "--out", str(args.out),
               "--monai-job", f"{seed}:{steps}"]  # fmt: skip
    else:
        model = args.out / f"model_{name}"
        if model.exists():  # a rerun into the same --out trains afresh
            shutil.rmtree(model)
        cmd = [
            *BIOUNET, "train", "--images", str(dirs["train_images"]),
            "--masks", str(dirs["train_labels"]), "--val-images", str(dirs["val_images"]),
            "--val-masks", str(dirs["val_labels"]), "--out", str(model), "--steps", str(steps),
            "--seed", str(seed), "--workers", str(args.workers), *RECIPES[recipe],
        ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    log = args.out / f"log_{name}.txt"
    log.unlink(missing_ok=True)
    try:
        run_quiet(cmd, log, env)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"{name} failed (exit {exc.returncode}); see {log}") from None
    if RECIPES[recipe] is None:
        probs = list(tifffile.imread(args.out / f"probs_monai_s{seed}.tif"))
        done = steps
    else:
        use_final_weights(model)
        pred = args.out / f"pred_{name}"
        run_quiet(predict_command(model, dirs["val_images"], pred, True, "auto"), log, env)
        probs = [tifffile.imread(pred / f"{s}.tif")[1] for s in VAL]
        done = json.loads((model / "config.json").read_text())["training"]["steps_done"]
    result = score(probs, truths) | {
        "recipe": recipe,
        "seed": seed,
        "steps": done,
        "wall_s": time.perf_counter() - t0,
    }
    print(f"{name}: rand {result['rand_error']:.4f} pixel {result['pixel_error']:.4f}", flush=True)
    return result


METRICS = (
    "rand_error",
    "pixel_error",
    "v_info",
    "warping_error",
    "false_membrane",
    "v_rand_split",
    "v_rand_merge",
)


def summary(results: list[dict]) -> dict:
    by = {}
    for r in results:
        by.setdefault(r["recipe"], []).append(r)
    out = {}
    for recipe, rs in by.items():
        row = {"seeds": [r["seed"] for r in rs], "steps": rs[0]["steps"]}
        for k in METRICS:
            v = np.array([r[k] for r in rs])
            row[k] = {
                "mean": float(v.mean()),
                "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                "min": float(v.min()),
                "max": float(v.max()),
            }
        out[recipe] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--out", type=Path, default=Path("runs/isbi2012_seeds"))
    p.add_argument("--recipes", default="a:2574,monai:2501", help="NAME:STEPS,...")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side")
    p.add_argument("--workers", type=int, default=2, help="data loader processes per run")
    p.add_argument("--monai-job", help=argparse.SUPPRESS)  # SEED:STEPS, one MONAI run
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.monai_job:
        seed, steps = map(int, args.monai_job.split(":"))
        probs, meta = monai_row(args.data, 0.0, seed=seed, steps=steps, device=device)
        tifffile.imwrite(args.out / f"probs_monai_s{seed}.tif", np.stack(probs))
        return
    dirs = make_split(args.data, args.out)
    truths = truth_membranes(args.data, VAL)
    jobs, seen = [], set()
    for item in args.recipes.split(","):
        recipe, _, steps = item.partition(":")
        if recipe not in RECIPES or not steps.isdigit() or recipe in seen:
            raise SystemExit(
                f"--recipes: {item!r} is not NAME:STEPS with a new NAME from {', '.join(RECIPES)}"
            )
        seen.add(recipe)
        jobs += [(recipe, int(steps), int(s)) for s in args.seeds.split(",")]
    jobs.sort(key=lambda job: job[2])  # seed-major: a run cut short still has every recipe
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    header = (
        f"{time.strftime('%F %H:%M')}, {platform.machine()}, torch {torch.__version__}, "
        f"{device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
        f"{args.jobs} runs side by side"
    )
    print("#", header, flush=True)
    results, report = [], {"header": header, "runs": [], "summary": {}}
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(one_run, args, dirs, truths, r, n, s, threads) for r, n, s in jobs]
        for future in as_completed(futures):
            try:
                results.append(future.result())
            except Exception:
                pool.shutdown(cancel_futures=True)  # the finished runs stay in seeds.json
                raise
            # Written after every run, so a run stopped at its time limit keeps what it has.
            report = {"header": header, "runs": results, "summary": summary(results)}
            (args.out / "seeds.json").write_text(json.dumps(report, indent=2))
    print("\n| recipe | steps | seeds | Rand error mean ± sd | pixel error mean ± sd |")
    print("|---|---|---|---|---|")
    for recipe, row in report["summary"].items():
        cells = [f"{row[k]['mean']:.4f} ± {row[k]['sd']:.4f}" for k in METRICS[:2]]
        print(f"| {recipe} | {row['steps']} | {len(row['seeds'])} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
