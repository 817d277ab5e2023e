"""K-fold cross-validation of training recipes on ../shared/data, scored like unseen images.

Each recipe's training, number of steps and prediction flags are fixed here, beforehand; every
fold trains on the other folds' images with `biounet train`, keeps its final weights (no
selection on the fold it is scored on), predicts the held-out fold with the plain
`biounet predict` (plus the recipe's flags) and scores it with bench/score_unseen.py's
protocol. A recipe is compared with another by the mean and standard deviation of its fold
scores; the release models are then trained on all images with the recipe that wins.

Folds: ISBI 2012's 25 slices are consecutive sections (neighbours are near-duplicates), so
fold k holds the contiguous block 5k..5k+4; BBBC039's 100 fields of view are independent, so
its folds are a fixed shuffle (seed 39) of the sorted names dealt into 5 groups of 20.

Training runs for a fixed number of steps (not minutes), so a fold's result does not depend
on the machine's speed that day. Each finished fold writes
bench/results/cv/RECIPE/foldK.json (scores per image and overall, the commands, the time);
folds already there are skipped, so a study can be spread over sessions and machines.

Usage:
  .venv/bin/python bench/crossval.py isbi-base [--folds 0,1] [--data ../shared/data]
  .venv/bin/python bench/crossval.py --table            (every recipe's folds, mean +- sd)
Recipes: isbi-base, isbi-long, isbi-b64; bbbc-base, bbbc-long, bbbc-b64, bbbc-class3
(`RECIPES`). bench/release.py then trains on all images with the recipe that wins.
Recipes sharing a training (a "train" key) train it once per fold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

from _common import BIOUNET, run, use_final_weights
from biounet.checkpoints import newest_checkpoint
from biounet.instances import InstanceConfig, instances_from_probabilities
from biounet.io import list_images, pair_by_stem, read_image, read_mask
from biounet.membranes import MembraneConfig, membrane_mask
from biounet.metrics import instance_scores
from biounet.modeldir import load_info
from biounet.trainer import GROWTH, SEED_THRESHOLDS
from score_unseen import membrane_scores, predict_command, score_folder, summarize

K = 5
RESULTS = Path(__file__).resolve().parent / "results" / "cv"

ISBI_TRAIN = [
    "--foreground", "0", "--cell-class", "0", "--class-names", "interior,membrane",
    "--base-channels", "32", "--optimizer", "adam", "--lr", "0.001", "--save-dtype", "float16",
    "--w0", "3.0", "--lr-schedule", "cosine", "--no-class-balance", "--dice", "1",
    "--seed", "0", "--tile", "196", "--batch-size", "4",
]  # fmt: skip
BBBC_TRAIN = [
    "--mask-type", "instances", "--class-names", "background,nucleus", "--base-channels", "32",
    "--save-dtype", "float16", "--w0", "10", "--seed", "0",
]  # fmt: skip

# name -> dataset, the training (a key shared by recipes that train alike, its flags, steps)
# and the flags `biounet predict` gets. "base": the shipped models' recipes, their 20 and 15
# CPU minutes on the machine they were trained on given as steps (1816 and 1869 done).
# The alternatives the release-models issue names, fixed before any of their folds ran: the
# paper's full width (base 64: 62 MB in float16, over the 20 MB a shipped model may hold, so
# it can only tell whether width matters), twice the steps, and for BBBC039 the 3-class
# border target.
RECIPES = {
    "isbi-base": {"dataset": "isbi2012", "train": ("base", ISBI_TRAIN, 1800), "predict": []},
    "isbi-long": {"dataset": "isbi2012", "train": ("long", ISBI_TRAIN, 3600), "predict": []},
    "isbi-b64": {"dataset": "isbi2012", "train": ("b64", [*ISBI_TRAIN, "--base-channels", "64"],
                                                  1800), "predict": []},
    "bbbc-base": {"dataset": "bbbc039", "train": ("base", BBBC_TRAIN, 1870), "predict": []},
    "bbbc-long": {"dataset": "bbbc039", "train": ("long", BBBC_TRAIN, 3740), "predict": []},
    "bbbc-b64": {"dataset": "bbbc039", "train": ("b64", [*BBBC_TRAIN, "--base-channels", "64"],
                                                 1870), "predict": []},
    "bbbc-class3": {"dataset": "bbbc039", "train": ("class3", [*BBBC_TRAIN, "--touching",
                                                               "class"], 1870), "predict": []},
}  # fmt: skip
SCORES = {"isbi2012": ("pixel_error", "rand_error", "vi_merge", "vi_split"),
          "bbbc039": ("ap50", "mean_ap", "ap75")}  # fmt: skip


def folds(data: Path, dataset: str) -> list[list[str]]:
    """The `K` held-out groups of file names of `dataset`."""
    if dataset == "isbi2012":
        names = sorted(p.name for p in (data / "isbi2012" / "images").glob("*.png"))
        size = -(-len(names) // K)
        return [names[i : i + size] for i in range(0, len(names), size)]
    names = sorted(p.name for p in (data / "bbbc039" / "images").glob("*.tif"))
    shuffled = np.random.default_rng(39).permutation(names).tolist()
    return [sorted(shuffled[k::K]) for k in range(K)]


def fold_split(data: Path, dataset: str, held_out: list[str], out: Path) -> dict[str, Path]:
    """Symlinked train / val folders of one fold (nothing copied)."""
    truth = "labels" if dataset == "isbi2012" else "masks"
    source = data / dataset
    dirs = {}
    for part in ("train", "val"):
        for kind in ("images", truth):
            d = out / part / kind
            d.mkdir(parents=True, exist_ok=True)
            dirs[f"{part}_{kind if kind == 'images' else 'truth'}"] = d
    for image in sorted((source / "images").iterdir()):
        part = "val" if image.name in held_out else "train"
        masks = [m for m in (source / truth).iterdir() if m.stem == image.stem]
        for src, kind in ((image, "images"), (masks[0], truth)):
            link = out / part / kind / src.name
            if not link.is_symlink():
                link.symlink_to(src.resolve())
    return dirs


def train_fold(dirs: dict[str, Path], model: Path, flags: list[str], steps: int,
               validate: bool = True) -> float:  # fmt: skip
    """Train one fold's model (unless done) and keep its final weights; the loop's seconds.
    Without `validate`, every image trains (a release model): no validation, final weights."""
    if _steps_done(model) < steps:
        held_out = (["--val-images", str(dirs["val_images"]), "--val-masks",
                     str(dirs["val_truth"]), "--val-every", str(max(1, steps // 3))]
                    if validate else ["--val-fraction", "0"])  # fmt: skip
        cmd = [*BIOUNET, "train", "--images", str(dirs["train_images"]), "--masks",
               str(dirs["train_truth"]), *held_out, "--out", str(model), "--steps", str(steps),
               "--device", "cpu", "--checkpoint-every", "300", *flags]  # fmt: skip
        if newest_checkpoint(model) is not None:
            cmd.append("--resume")  # an interrupted fold goes on where it stopped
        run(cmd)
    if validate and not json.loads((model / "config.json").read_text())["training"].get(
        "weights_step"
    ):
        use_final_weights(model)
    last = (model / "training.csv").read_text().strip().splitlines()[-1]
    return float(last.split(",")[4])  # elapsed_s of the last step


def _steps_done(model: Path) -> int:
    """Steps of a finished training (its config records them at the end), else 0."""
    config = model / "config.json"
    if not config.is_file():
        return 0
    return (json.loads(config.read_text()).get("training") or {}).get("steps_done", 0)


def run_fold(recipe: str, k: int, data: Path, out: Path) -> dict:
    spec = RECIPES[recipe]
    dataset = spec["dataset"]
    held_out = folds(data, dataset)[k]
    fold_dir = out / dataset / f"fold{k}"
    dirs = fold_split(data, dataset, held_out, fold_dir)
    key, flags, steps = spec["train"]
    seconds = train_fold(dirs, fold_dir / key, flags, steps)
    kind = "membranes" if dataset == "isbi2012" else "instances"
    predictions = fold_dir / f"pred_{recipe}"
    command = predict_command(kind, fold_dir / key, dirs["val_images"], predictions,
                              spec["predict"])  # fmt: skip
    run(command)
    scores = score_folder(kind, predictions, dirs["val_images"], dirs["val_truth"])
    if dataset == "isbi2012" and not spec["predict"]:
        scores["membrane_grid"] = score_grid(fold_dir / key, dirs, fold_dir)
    if dataset == "bbbc039" and not spec["predict"]:
        scores["instance_grid"] = score_instance_grid(fold_dir / key, dirs)
    return {
        "recipe": recipe, "fold": k, "held_out": held_out, "train_steps": steps,
        "train_flags": flags, "predict": command[2:], "train_seconds": round(seconds, 1),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"), **scores,
    }  # fmt: skip


def machine() -> str:
    """The CPU model, its class for the engines' choice and its cores, e.g. "Intel(R) Xeon(R)
    Processor (amx), 2 cores" (platform.processor() is empty on Linux)."""
    from biounet.runtimes import cpu_class

    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in
             (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
             if line.startswith("model name")]  # fmt: skip
    name = names[0] if names else platform.processor() or platform.machine()
    return f"{name} ({cpu_class()}), {_cores()} cores"


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


PLAIN = "plain t0.5"  # the plain argmax: the membrane grid's entry for no post-processing


def membrane_grid() -> dict[str, dict]:
    """The membrane post-processings every ISBI fold scores, fixed before any fold ran:
    thresholds alone, and watershed lines from seeds (`biounet.membranes`), each without and
    with TTA."""
    grid = {}
    for tta in (False, True):
        views = "tta" if tta else "plain"
        for t in (0.3, 0.4, 0.5):
            grid[f"{views} t{t}"] = {"tta": tta, "threshold": t}
        for seed in (0.05, 0.1, 0.2, 0.3, 0.4, 0.45):
            for min_seed in (10, 50):
                for smooth in (0.0, 1.0, 2.0):
                    grid[f"{views} t0.5 seeds<{seed} min{min_seed} smooth{smooth}"] = {
                        "tta": tta, "threshold": 0.5, "seed_threshold": seed,
                        "min_seed": min_seed, "smooth": smooth,
                    }  # fmt: skip
    return grid


def score_grid(model: Path, dirs: dict[str, Path], work: Path) -> dict[str, dict]:
    """Every `membrane_grid` post-processing's scores on one fold's held-out slices."""
    probs = {}
    for tta in (False, True):
        out = work / ("prob_tta" if tta else "prob")
        flags = ["--output", "prob"]
        flags.append("--tta" if tta else "--no-tta")  # not the model's stored choice
        run([*BIOUNET, "predict", str(model), str(dirs["val_images"]), "--out", str(out), *flags])
        probs[tta] = {p.stem: tifffile.imread(p) for p in sorted(out.glob("*.tif"))}
    truths = {p.stem: read_mask(p) == 0 for p in sorted(dirs["val_truth"].iterdir())}
    results = {}
    for name, spec in membrane_grid().items():
        config = MembraneConfig(**{k: v for k, v in spec.items() if k != "tta"})
        per_image = [membrane_scores(membrane_mask(p, config), truths[stem])
                     for stem, p in probs[spec["tta"]].items()]  # fmt: skip
        results[name] = {k: float(np.mean([s[k] for s in per_image])) for k in per_image[0]}
    return results


def instance_grid(border_class: int | None) -> dict[str, InstanceConfig]:
    """The instance post-processings every BBBC039 fold scores: `biounet train`'s fit grid
    (seed thresholds x growth), fixed before any fold ran."""
    return {
        f"seeds>{seed} expand{g['expand']} gap{g['gap']}": InstanceConfig(
            border_class=border_class, seed_threshold=seed, **g
        )
        for seed in SEED_THRESHOLDS
        for g in GROWTH
    }


# Families of growth the fit may choose from: the old fit (no gap closing) against the new.
FAMILIES = {"fit without gap": lambda c: c.gap == 0, "fit with gap": lambda c: True}


def score_instance_grid(model: Path, dirs: dict[str, Path]) -> dict:
    """Per `instance_grid` entry, the pooled mean AP on the training images the fit sees and
    the scores on the held-out images; per family, the entry the fit would pick (best on the
    training images; ties: the first)."""
    held_out = sorted(pair_by_stem(list_images(dirs["val_images"]), dirs["val_truth"]))
    parts = {"train": fit_pairs(dirs), "held_out": held_out}
    grid, found = grid_scores(model, parts)
    result = {"entries": {}, "families": {}}
    for name in grid:
        result["entries"][name] = {
            "train_mean_ap": summarize("instances", found["train"][name])["mean_ap"],
            "held_out": summarize("instances", found["held_out"][name]),
        }
    result["families"] = fit_choices(result["entries"], grid)
    stored = InstanceConfig(**load_info(model).postprocess["instances"])
    result["stored_is_the_fit_with_gap"] = grid[result["families"]["fit with gap"]] == stored
    return result


def fit_pairs(dirs: dict[str, Path]) -> list[tuple[Path, Path]]:
    """The (up to 20, evenly spaced) training pairs a fit is scored on, as
    `biounet.trainer.fit_postprocess` takes them."""
    train = sorted(pair_by_stem(list_images(dirs["train_images"]), dirs["train_truth"]))
    return train[:: -(-len(train) // 20)]


def grid_scores(model: Path, parts: dict[str, list]) -> tuple[dict, dict]:
    """`model`'s `instance_grid` and, per part, entry and image stem, `instance_scores`; the
    probabilities of each image are computed once (plain, no TTA)."""
    import biounet

    info = load_info(model)
    # as `fit_postprocess` computes them: torch on the CPU at the training's precision
    precision = info.training["train_config"]["precision"]
    net = biounet.load(model, device="cpu", precision=precision, engine="torch")
    grid = instance_grid(info.postprocess["instances"]["border_class"])
    found = {part: {name: {} for name in grid} for part in parts}
    for part, pairs in parts.items():
        for image, truth_path in pairs:
            probs = net.predict(read_image(image, 1), output="prob", tta=False)
            truth = read_mask(truth_path)
            for name, config in grid.items():
                labels = instances_from_probabilities(probs, config)
                found[part][name][image.stem] = instance_scores(labels, truth)
    return grid, found


def fit_choices(entries: dict[str, dict], grid: dict[str, InstanceConfig]) -> dict[str, str]:
    """Per family of `FAMILIES`, the grid entry with the best training mean AP (ties: the
    first, as the fit breaks them)."""
    choices = {}
    for family, member in FAMILIES.items():
        names = [n for n, c in grid.items() if member(c)]
        choices[family] = max(names, key=lambda n: entries[n]["train_mean_ap"])
    return choices


def family_table(results: list[dict], title: str) -> str:
    """Markdown: per growth family, the held-out scores of the entry the fit picks on each
    fold, mean +- sd over folds, and the per-fold difference to the first family."""
    results = [r for r in results if "instance_grid" in r]
    if not results:
        return ""
    keys = SCORES["bbbc039"]
    lines = [f"\n{title}: instance post-processing over {len(results)} fold(s), mean +- sd\n",
             "| fit | " + " | ".join(keys) + " | mean AP - first row |",
             "|---" * (len(keys) + 2) + "|"]  # fmt: skip
    first = None
    for family in FAMILIES:
        chosen = [r["instance_grid"]["entries"][r["instance_grid"]["families"][family]]["held_out"]
                  for r in results]  # fmt: skip
        cells = [_mean_sd([c[k] for c in chosen]) for k in keys]
        first = first or [c["mean_ap"] for c in chosen]
        cells.append(_mean_sd([c["mean_ap"] - f for c, f in zip(chosen, first, strict=True)]))
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_sd(values: list[float]) -> str:
    """ "mean +- sd", or the one value with "(one fold)": no spread to report yet."""
    if len(values) < 2:
        return f"{statistics.mean(values):.4f} (one fold)"
    return f"{statistics.mean(values):.4f} +- {statistics.stdev(values):.4f}"


def table(recipes: list[str]) -> str:
    """Markdown: per recipe, each finished fold's overall scores, then mean +- sd over folds."""
    found = {recipe: fold_results(recipe) for recipe in recipes}
    return "\n".join(fold_table(recipe, results) for recipe, results in found.items() if results)


def fold_table(recipe: str, results: list[dict]) -> str:
    """Markdown: one recipe's folds (`results`), their overall scores and mean +- sd."""
    keys = SCORES[RECIPES[recipe]["dataset"]]
    lines = [f"\n{recipe} ({RECIPES[recipe]['dataset']})\n",
             "| fold | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]  # fmt: skip
    for r in results:
        cells = [f"{r['overall'][k]:.4f}" for k in keys]
        lines.append(f"| {r['fold']} | " + " | ".join(cells) + " |")
    cells = [_mean_sd([r["overall"][k] for r in results]) for k in keys]
    lines.append(f"| mean of {len(results)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def choose_membranes(results: list[dict]) -> tuple[str, dict]:
    """The rule, fixed before any fold ran, that picks the ISBI post-processing: the lowest
    mean Rand error among the grid entries whose mean pixel error is at most the plain
    argmax's ("plain t0.5") + 0.001. Returns its name and its (mean, sd) per score."""
    names = list(results[0]["membrane_grid"])
    stats = {}
    for name in names:
        values = {k: [r["membrane_grid"][name][k] for r in results] for k in SCORES["isbi2012"]}
        stats[name] = {k: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
                       for k, v in values.items()}  # fmt: skip
    limit = stats[PLAIN]["pixel_error"][0] + 0.001
    allowed = [n for n in names if stats[n]["pixel_error"][0] <= limit]
    best = min(allowed, key=lambda n: stats[n]["rand_error"][0])
    return best, stats


def fold_results(recipe: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((RESULTS / recipe).glob("fold*.json"))]


def grid_table(results: list[dict], title: str, top: int = 8) -> str:
    """Markdown: the ISBI post-processings by mean Rand error over `results` (folds), the
    chosen one marked, with each one's per-fold change of Rand error against the plain
    argmax (what models/isbi2012 gave before the folds chose)."""
    results = [r for r in results if "membrane_grid" in r]
    if not results:
        return ""
    best, stats = choose_membranes(results)
    order = sorted(stats, key=lambda n: stats[n]["rand_error"][0])
    shown = list(dict.fromkeys([*order[:top], PLAIN, "tta t0.5", best]))
    keys = SCORES["isbi2012"]
    lines = [
        f"\n{title}: post-processing over {len(results)} fold(s), mean +- sd\n",
        "| post-processing | " + " | ".join(keys) + " | rand_error - plain, per fold |",
        "|---" * (len(keys) + 2) + "|",
    ]
    for name in shown:
        cells = [f"{stats[name][k][0]:.4f} +- {stats[name][k][1]:.4f}" for k in keys]
        change = [r["membrane_grid"][name]["rand_error"] - r["membrane_grid"][PLAIN]["rand_error"]
                  for r in results]  # fmt: skip
        cells.append(_mean_sd(change))
        lines.append(f"| {name}{' (chosen)' if name == best else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def nested_membranes(results: list[dict]) -> list[dict]:
    """Per fold, the post-processing `choose_membranes` picks on the *other* folds, and its
    scores and the plain argmax's on this fold: what the choice gives on slices it did not
    see (the chosen entry's mean over all folds flatters it, having been picked on them)."""
    results = [r for r in results if "membrane_grid" in r]
    if len(results) < 2:
        return []
    nested = []
    for i, r in enumerate(results):
        name, _ = choose_membranes(results[:i] + results[i + 1 :])
        nested.append({"fold": r["fold"], "chosen": name, "scores": r["membrane_grid"][name],
                       "plain": r["membrane_grid"][PLAIN]})  # fmt: skip
    return nested


def nested_table(results: list[dict], title: str) -> str:
    """Markdown: `nested_membranes` per fold, then mean +- sd of each score and of its
    per-fold change against the plain argmax."""
    nested = nested_membranes(results)
    if not nested:
        return ""
    keys = ("pixel_error", "rand_error")
    lines = [f"\n{title}: each fold scored with the post-processing chosen on the other folds\n",
             "| fold | chosen on the other folds | " + " | ".join(keys) + " | "
             + " | ".join(f"{k} - plain" for k in keys) + " |",
             "|---" * (2 * len(keys) + 2) + "|"]  # fmt: skip
    for n in nested:
        cells = [f"{n['scores'][k]:.4f}" for k in keys]
        cells += [f"{n['scores'][k] - n['plain'][k]:+.4f}" for k in keys]
        lines.append(f"| {n['fold']} | {n['chosen']} | " + " | ".join(cells) + " |")
    cells = [_mean_sd([n["scores"][k] for n in nested]) for k in keys]
    cells += [_mean_sd([n["scores"][k] - n["plain"][k] for n in nested]) for k in keys]
    lines.append(f"| mean of {len(nested)} | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe", nargs="?", choices=sorted(RECIPES))
    p.add_argument("--folds", default=",".join(str(k) for k in range(K)))
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--out", type=Path, default=Path("runs/cv"))
    p.add_argument("--table", action="store_true", help="print every recipe's folds")
    p.add_argument("--grid", type=Path, metavar="MODEL",
                   help="score the post-processing grid of MODEL on ISBI fold --folds")  # fmt: skip
    args = p.parse_args(argv)
    if args.grid is not None:
        if not args.folds.isdigit():
            p.error("--grid scores one fold: give --folds K")
        k = int(args.folds)
        fold_dir = args.out / "isbi2012" / f"fold{k}"
        dirs = fold_split(args.data, "isbi2012", folds(args.data, "isbi2012")[k], fold_dir)
        grid = score_grid(args.grid, dirs, fold_dir / f"grid_{args.grid.name}")
        print(grid_table([{"membrane_grid": grid}], f"{args.grid} on fold {k}"))
        return 0
    if args.table or args.recipe is None:
        print(table(sorted(RECIPES)))
        for recipe in sorted(RECIPES):
            found = fold_results(recipe)
            for text in (grid_table(found, recipe), nested_table(found, recipe),
                         family_table(found, recipe)):  # fmt: skip
                if text:
                    print(text)
        return 0
    for k in (int(f) for f in args.folds.split(",")):
        target = RESULTS / args.recipe / f"fold{k}.json"
        if target.is_file():
            print(f"{target}: done", flush=True)
            continue
        result = run_fold(args.recipe, k, args.data, args.out)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".json.part")  # a kill leaves no half-written fold
        partial.write_text(json.dumps(result, indent=1))
        partial.replace(target)
        print(table([args.recipe]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
