"""Train a release model on every labelled image in ../shared/data with a cross-validated recipe.

The recipe (training flags and steps) is one of bench/crossval.py's RECIPES, fixed before its
folds ran, and the post-processing the model stores is the one its folds chose, by rules also
fixed beforehand:

- ISBI 2012: `crossval.choose_membranes` over the recipe's folds (a threshold or watershed
  lines, with or without TTA) becomes ``postprocess.membranes`` and ``postprocess.tta``, so the
  plain `biounet predict` applies it;
- BBBC039: the growth family (`crossval.FAMILIES`) whose fit scored the higher held-out mean
  AP over the folds; within it, the entry best on the training images the fit sees (the fit
  `biounet train` runs, restricted to that family) becomes ``postprocess.instances``.

It refuses to run before all the recipe's folds are in bench/results/cv/RECIPE/ (``--partial``
allows fewer, for a trial run; never for a model that ships). The model trains on all images
for the recipe's steps (no validation, final weights) in a folder of its own under --work
(resumed after a kill), records the recipe, the folds and the choice in ``config.json``
(``training.release``), and then replaces --out whole.

Usage:
  .venv/bin/python bench/release.py isbi-base --out models/isbi2012
  .venv/bin/python bench/release.py bbbc-base --out runs/release/try --partial --steps 20
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from biounet.membranes import MembraneConfig
from biounet.modeldir import load_model, save_model
from crossval import (
    FAMILIES,
    RECIPES,
    K,
    choose_membranes,
    family_table,
    fit_choices,
    fit_pairs,
    fold_results,
    fold_split,
    fold_table,
    grid_scores,
    grid_table,
    machine,
    membrane_grid,
    nested_table,
    train_fold,
)
from score_unseen import summarize

MAX_MB = 20  # the release-models issue: shipped weights stay small
# the README titles `biounet.models()` shows (as the models shipped before releases had them)
DATASETS = {"isbi2012": "ISBI 2012 EM membranes", "bbbc039": "BBBC039 nuclei, instances"}
RULES = {
    "isbi2012": "among the membrane post-processings (`crossval.membrane_grid`) whose mean "
    "pixel error over the folds is at most the plain argmax's + 0.001, the lowest mean Rand "
    "error (`crossval.choose_membranes`)",
    "bbbc039": "the growth family (`crossval.FAMILIES`) whose fit scored the higher mean "
    "held-out mean AP over the folds; within it, the entry best on the (up to 20) training "
    "images the fit of `biounet train` sees",
}
MODELS = Path(__file__).resolve().parents[1] / "models"


def float16_megabytes(flags: list[str]) -> float:
    """MB of a model trained with `flags` (the last --base-channels wins), stored as float16."""
    from biounet.architecture import UNetConfig
    from biounet.model import UNet

    base = int(flags[len(flags) - 1 - flags[::-1].index("--base-channels") + 1])
    net = UNet(UNetConfig(base_channels=base))
    return sum(t.numel() for t in net.parameters()) * 2 / 1e6


def membrane_choice(results: list[dict]) -> tuple[dict, dict]:
    """The stored post-processing the ISBI folds chose, and what to record about it."""
    best, stats = choose_membranes(results)
    spec = dict(membrane_grid()[best])
    tta = spec.pop("tta")
    post = {"membranes": MembraneConfig(**spec).to_dict(), "tta": tta}
    means = {k: round(v[0], 4) for k, v in stats[best].items()}
    return post, {"membranes": best, "fold_means": means}


def instance_family(results: list[dict]) -> tuple[str, dict[str, float]]:
    """The growth family whose fit scored the higher mean held-out mean AP over the folds
    (ties: the first, the simpler), and each family's mean."""
    means = {}
    for family in FAMILIES:
        picks = [r["instance_grid"]["entries"][r["instance_grid"]["families"][family]]
                 for r in results]  # fmt: skip
        means[family] = statistics.mean(p["held_out"]["mean_ap"] for p in picks)
    return max(means, key=means.get), means


def instance_choice(results: list[dict], model: Path, dirs: dict[str, Path]) -> tuple[dict, dict]:
    """The stored instance post-processing: the chosen family's best entry on the training
    images the fit sees."""
    family, means = instance_family(results)
    grid, found = grid_scores(model, {"train": fit_pairs(dirs)})
    entries = {n: {"train_mean_ap": summarize("instances", found["train"][n])["mean_ap"]}
               for n in grid}  # fmt: skip
    name = fit_choices(entries, grid)[family]
    record = {"family": family, "fold_means": {f: round(m, 4) for f, m in means.items()},
              "instances": name}  # fmt: skip
    return {"instances": grid[name].to_dict()}, record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe", choices=sorted(RECIPES))
    p.add_argument("--out", type=Path, required=True, help="the model directory to write")
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--work", type=Path, default=Path("runs/release"))
    p.add_argument("--partial", action="store_true", help="allow fewer folds (a trial run)")
    p.add_argument("--steps", type=int, help="override the recipe's steps (a trial run)")
    args = p.parse_args(argv)
    spec = RECIPES[args.recipe]
    results = fold_results(args.recipe)
    trial = args.partial or args.steps is not None
    shipped = args.out.resolve().is_relative_to(MODELS)
    if args.out.exists() and not (args.out / "config.json").is_file():
        p.error(f"--out {args.out}: exists and holds no model; give a new folder or a model's")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps {args.steps}: give 1 or more")
    if trial and shipped:
        p.error(f"--out {args.out}: a trial run (--partial, --steps) never writes into models/")
    _, flags, steps = spec["train"]
    megabytes = float16_megabytes(flags)
    if megabytes > MAX_MB and shipped:
        p.error(f"{args.recipe}: {megabytes:.0f} MB of float16 weights; a shipped model may "
                f"hold {MAX_MB} MB (write it elsewhere with --out)")  # fmt: skip
    if spec["dataset"] == "bbbc039":
        results = [r for r in results if "instance_grid" in r]  # folds scored before the grid
    if not results or (len(results) < K and not args.partial):
        p.error(f"{args.recipe}: {len(results)} of {K} folds in bench/results/cv/; run "
                f"bench/crossval.py {args.recipe} first (or --partial for a trial)")  # fmt: skip
    dataset = spec["dataset"]
    dirs = fold_split(args.data, dataset, [], args.work / dataset / args.recipe / "data")
    steps = args.steps or steps
    # Trained in a folder of its own (resumed after a kill; a trial's has other steps), never
    # in --out, which may hold the model this one replaces.
    trained = args.work / dataset / f"{args.recipe}-{steps}steps"
    seconds = train_fold(dirs, trained, flags, steps, validate=False)
    if dataset == "isbi2012":
        post, record = membrane_choice(results)
    else:
        post, record = instance_choice(results, trained, dirs)
    model, info = load_model(trained)
    release = {"recipe": args.recipe, "folds": [r["fold"] for r in results], "steps": steps,
               "machine": machine(), "train_seconds": round(seconds, 1), **record}  # fmt: skip
    info = info.replace(postprocess={**(info.postprocess or {}), **post},
                        training={**info.training, "release": release})  # fmt: skip
    readme = model_readme(args.out, info, results, model)
    publish(trained, args.out, model, info, readme)
    print(f"{args.out}: {release}")
    return 0


def model_readme(out: Path, info, results: list[dict], model) -> str:
    """The model's README.md: its recipe, command, data, stored post-processing and how the
    folds chose it, the cross-validated scores, and the machine and time of its training."""
    from biounet.modeldir import WEIGHT_DTYPES

    release = info.training["release"]
    recipe = release["recipe"]
    name = out.name
    dataset = RECIPES[recipe]["dataset"]
    net = info.net
    parameters = sum(t.numel() for t in model.parameters())
    classes = ", ".join(f"{i} = {c}" for i, c in enumerate(info.class_names))
    files = info.training.get("train_files") or []
    post = json.dumps(info.postprocess, sort_keys=True)
    scores = [fold_table(recipe, results)]
    if dataset == "isbi2012":
        scores += [grid_table(results, recipe), nested_table(results, recipe)]
    else:
        scores.append(family_table(results, recipe))
    return "\n".join([
        f"# models/{name} — {DATASETS[dataset]}\n",
        f"Written by `bench/release.py {recipe} --out {out}` on "
        f"{time.strftime('%Y-%m-%d')}: bench/crossval.py's recipe `{recipe}` trained on every "
        f"labelled image of ../shared/data/{dataset}, keeping the last step's weights (no image "
        "held out, no checkpoint selected).\n",
        "| | |", "|---|---|",
        f"| classes | {classes} |",
        f"| network | depth {net.depth}, base {net.base_channels} channels, {net.padding} "
        f"padding, {net.in_channels} input channel(s): {parameters / 1e6:.2f} M parameters |",
        f"| weights | `weights.safetensors`, {info.weights_dtype}: "
        f"{parameters * WEIGHT_DTYPES[info.weights_dtype].itemsize / 1e6:.1f} MB |",
        f"| normalisation | {info.normalization.method} |",
        f"| data | {len(files)} images: {', '.join(files)} |",
        f"| training | {release['steps']} steps, precision {info.training.get('precision')}, "
        f"{release['train_seconds'] / 60:.0f} min on {release['machine']} |",
        f"| stored post-processing | `{post}`, applied by a plain `biounet predict` |",
        f"| how the folds chose it | {RULES[dataset]}: {_choice(release)} |",
        "\nCommand (recorded in `config.json`; its folders are symlinks to ../shared/data that "
        "bench/release.py makes):\n",
        f"```\n{info.training.get('command', '')}\n```\n",
        "## Validation: cross-validated scores\n",
        f"{len(results)} of {K} folds (`bench/crossval.py {recipe}`, results in "
        f"bench/results/cv/{recipe}/): each "
        "fold trained with this recipe on the other folds' images and scored on its own by "
        "bench/score_unseen.py's protocol. Reproduce: `bench/crossval.py "
        f"{recipe}`, then `bench/release.py {recipe} --out {out}`.",
        *[text for text in scores if text],
        "",
    ])  # fmt: skip


def _choice(release: dict) -> str:
    chosen = release.get("membranes") or f"{release['family']}, {release['instances']}"
    means = release["fold_means"]
    return f"{chosen} (fold means: {', '.join(f'{k} {v}' for k, v in means.items())})"


def publish(trained: Path, out: Path, model, info, readme: str) -> None:
    """`out` becomes the trained model with `info` and `readme`, whole or not at all: written
    beside it, checked by loading, then renamed over it (checkpoints stay behind)."""
    part = out.with_name(out.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    for f in trained.iterdir():
        if f.is_file() and f.name not in ("config.json", "weights.safetensors", "README.md"):
            shutil.copy2(f, part / f.name)
    save_model(part, model, info)
    (part / "README.md").write_text(readme)
    load_model(part)  # what is stored passes the load checks
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    part.rename(out)
    shutil.rmtree(old, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
