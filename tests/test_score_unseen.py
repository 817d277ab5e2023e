"""The release models' scoring protocol (bench/score_unseen.py) and cross-validation folds
(bench/crossval.py), on known answers."""

import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from biounet.membranes import MembraneConfig  # noqa: E402
from crossval import (  # noqa: E402
    choose_membranes,
    family_table,
    fit_choices,
    folds,
    instance_grid,
    machine,
    membrane_grid,
    nested_membranes,
    nested_table,
)
from score_unseen import membrane_cells, membrane_scores, summarize  # noqa: E402


def _membranes(*columns: int, rows: tuple[int, ...] = ()) -> np.ndarray:
    """A 20 x 30 mask with 1 px membranes at these columns and rows."""
    m = np.zeros((20, 30), bool)
    m[:, list(columns)] = True
    m[list(rows), :] = True
    return m


def test_cells_take_the_membranes_of_their_side():
    cells = membrane_cells(_membranes(10, 20))
    assert cells.min() == 1 and cells.max() == 3  # every pixel in a cell
    assert (cells[:, :10] == cells[0, 0]).all() and (cells[:, 11:20] == cells[0, 15]).all()


def test_perfect_prediction_scores_zero():
    truth = _membranes(10, 20, rows=(8,))
    scores = membrane_scores(truth, truth)
    assert scores == pytest.approx(
        {"pixel_error": 0.0, "rand_error": 0.0, "vi_split": 0.0, "vi_merge": 0.0}, abs=1e-12
    )


def test_a_missing_membrane_is_a_merge_and_an_extra_one_a_split():
    truth = _membranes(10, 20)
    merged = membrane_scores(_membranes(10), truth)
    assert merged["pixel_error"] == pytest.approx(20 / 600)
    assert merged["vi_merge"] > 0.5 and merged["vi_split"] == pytest.approx(0, abs=1e-12)
    split = membrane_scores(_membranes(10, 20, rows=(8,)), truth)
    assert split["vi_split"] > 0.5 and split["vi_merge"] == pytest.approx(0, abs=1e-12)
    assert 0 < split["rand_error"] < 1 and 0 < merged["rand_error"] < 1


def _rand_f_brute_force(true: np.ndarray, pred: np.ndarray) -> float:
    """1 - F of pixel pairs together in both (the SNEMI3D adapted Rand, true 0 ignored)."""
    keep = true.ravel() > 0
    t, p = true.ravel()[keep], pred.ravel()[keep]
    both = same_t = same_p = 0
    for i, j in combinations(range(t.size), 2):
        st, sp = t[i] == t[j], p[i] == p[j]
        both, same_t, same_p = both + (st and sp), same_t + st, same_p + sp
    precision, recall = both / same_p, both / same_t
    return 1 - 2 * precision * recall / (precision + recall)


def test_rand_error_matches_a_brute_force_pair_count():
    rng = np.random.default_rng(3)
    truth = np.zeros((9, 11), bool)
    truth[4, :] = truth[:, 5] = True
    pred = truth.copy()
    pred[4, 1:4] = False  # a gap: two true cells merge
    pred[rng.random(pred.shape) < 0.05] = True
    from score_unseen import true_cells

    expected = _rand_f_brute_force(true_cells(truth), membrane_cells(pred))
    assert membrane_scores(pred, truth)["rand_error"] == pytest.approx(expected)


def test_instances_pool_over_images():
    from biounet.metrics import instance_scores

    truth = np.zeros((20, 20), np.int32)
    truth[2:8, 2:8], truth[12:18, 12:18] = 1, 2
    pred = truth.copy()
    pred[12:18, 12:18] = 0  # one missed object in the second image
    per_image = {"a": instance_scores(truth, truth), "b": instance_scores(pred, truth)}
    overall = summarize("instances", per_image)
    assert overall["ap50"] == pytest.approx(3 / 4)  # TP 3, FN 1, FP 0
    assert overall["n_true"] == 4 and overall["n_pred"] == 3


def _fake_data(root: Path) -> Path:
    for dataset, ext, count in (("isbi2012", "png", 25), ("bbbc039", "tif", 100)):
        (root / dataset / "images").mkdir(parents=True)
        for i in range(count):
            (root / dataset / "images" / f"{i:03d}.{ext}").touch()
    return root


def test_folds_partition_the_images(tmp_path):
    data = _fake_data(tmp_path)
    isbi = folds(data, "isbi2012")
    assert isbi == [[f"{i:03d}.png" for i in range(5 * k, 5 * k + 5)] for k in range(5)]
    bbbc = folds(data, "bbbc039")
    assert [len(f) for f in bbbc] == [20] * 5
    assert sorted(sum(bbbc, [])) == sorted(f"{i:03d}.tif" for i in range(100))
    assert bbbc == folds(data, "bbbc039")  # fixed, not drawn anew
    assert bbbc[0] != [f"{i:03d}.tif" for i in range(20)]  # shuffled, not cut by name


def test_every_grid_entry_is_a_valid_post_processing():
    grid = membrane_grid()
    assert "plain t0.5" in grid and "tta t0.5" in grid
    for spec in grid.values():
        MembraneConfig(**{k: v for k, v in spec.items() if k != "tta"})


def test_the_choice_keeps_the_pixel_error_and_lowers_the_rand_error():
    def fold(values):
        return {"membrane_grid": {name: dict(zip(("pixel_error", "rand_error", "vi_merge",
                "vi_split"), v, strict=True)) for name, v in values.items()}}  # fmt: skip

    folds_ = [
        fold(
            {"plain t0.5": (0.07, 0.09, 0, 0), "a": (0.0705, 0.03, 0, 0), "b": (0.09, 0.01, 0, 0)}
        ),
        fold(
            {"plain t0.5": (0.08, 0.07, 0, 0), "a": (0.0805, 0.05, 0, 0), "b": (0.10, 0.02, 0, 0)}
        ),
    ]
    best, stats = choose_membranes(folds_)
    assert best == "a"  # "b" merges less but costs pixel error
    assert stats["a"]["rand_error"][0] == pytest.approx(0.04)


def test_each_fold_is_scored_with_the_choice_of_the_other_folds():
    def fold(k, a, b):
        keys = ("pixel_error", "rand_error", "vi_merge", "vi_split")
        grid = {"plain t0.5": (0.07, 0.09, 0, 0), "a": (0.07, a, 0, 0), "b": (0.07, b, 0, 0)}
        return {"fold": k, "membrane_grid": {n: dict(zip(keys, v, strict=True))
                                             for n, v in grid.items()}}  # fmt: skip

    folds_ = [fold(0, 0.03, 0.05), fold(1, 0.03, 0.05), fold(2, 0.08, 0.01)]
    assert choose_membranes(folds_)[0] == "b"  # on all three folds
    nested = nested_membranes(folds_)
    assert [n["chosen"] for n in nested] == ["b", "b", "a"]  # each without its own fold
    assert [n["scores"]["rand_error"] for n in nested] == [0.05, 0.05, 0.08]
    text = nested_table(folds_, "t")
    assert "| 2 | a | 0.0700 | 0.0800 | +0.0000 | -0.0100 |" in text
    assert text.strip().endswith("| -0.0300 +- 0.0173 |")
    assert nested_membranes(folds_[:1]) == [] and nested_table(folds_[:1], "t") == ""


def test_the_machine_is_named_with_its_cpu_class_and_cores():
    import os

    text = machine()
    assert text.endswith(f"), {len(os.sched_getaffinity(0))} cores")
    assert any(f"({c})" in text for c in ("amx", "avx512_bf16", "avx512", "avx2", "other"))


def test_instance_grid_is_the_fit_grid_and_each_family_picks_on_training_scores():
    grid = instance_grid(None)
    assert len(grid) == 20 and {c.gap for c in grid.values()} == {0, 3, 5}
    entries = {name: {"train_mean_ap": 0.5} for name in grid}
    assert fit_choices(entries, grid) == {"fit without gap": next(iter(grid))} | {
        "fit with gap": next(iter(grid))
    }  # ties: the first entry, as the fit breaks them
    entries["seeds>0.8 expand0 gap3"]["train_mean_ap"] = 0.7
    entries["seeds>0.7 expand1 gap0"]["train_mean_ap"] = 0.6
    assert fit_choices(entries, grid) == {
        "fit without gap": "seeds>0.7 expand1 gap0",
        "fit with gap": "seeds>0.8 expand0 gap3",
    }


def test_family_table_gives_the_per_fold_difference():
    def fold(old, new):
        entries = {"a": {"held_out": {"ap50": 0.9, "mean_ap": old, "ap75": 0.8}},
                   "b": {"held_out": {"ap50": 0.9, "mean_ap": new, "ap75": 0.8}}}  # fmt: skip
        families = {"fit without gap": "a", "fit with gap": "b"}
        return {"instance_grid": {"entries": entries, "families": families}}

    text = family_table([fold(0.70, 0.72), fold(0.80, 0.81)], "t")
    assert "| fit with gap | 0.9000 +- 0.0000 | 0.7650 +- 0.0636 | 0.8000 +- 0.0000 | " in text
    assert text.strip().endswith("0.0150 +- 0.0071 |")


def test_a_release_stores_what_the_folds_chose():
    from release import instance_family, membrane_choice

    grid = membrane_grid()
    lines = "tta t0.5 seeds<0.4 min50 smooth0.0"
    folds_ = []
    for shift in (0.0, 0.01):
        scores = {n: {"pixel_error": 0.08, "rand_error": 0.09 + shift, "vi_merge": 0.0,
                      "vi_split": 0.0} for n in grid}  # fmt: skip
        scores["plain t0.5"]["pixel_error"] = 0.0795
        scores[lines]["rand_error"] = 0.02 + shift
        folds_.append({"membrane_grid": scores})
    post, record = membrane_choice(folds_)
    assert post == {"tta": True, "membranes": MembraneConfig(seed_threshold=0.4,
                                                             min_seed=50).to_dict()}  # fmt: skip
    assert record["membranes"] == lines and record["fold_means"]["rand_error"] == 0.025

    def fold(old, new):
        entries = {"a": {"held_out": {"mean_ap": old}}, "b": {"held_out": {"mean_ap": new}}}
        families = {"fit without gap": "a", "fit with gap": "b"}
        return {"instance_grid": {"entries": entries, "families": families}}

    assert instance_family([fold(0.70, 0.72), fold(0.80, 0.79)])[0] == "fit with gap"
    assert instance_family([fold(0.70, 0.69), fold(0.80, 0.80)])[0] == "fit without gap"
    assert instance_family([fold(0.70, 0.70)])[0] == "fit without gap"  # a tie: the simpler


def test_a_release_readme_states_the_recipe_the_choice_and_the_folds():
    from biounet.architecture import UNetConfig
    from biounet.model import UNet
    from biounet.modeldir import ModelInfo
    from release import model_readme

    def fold(k, old, new):
        entries = {"a": {"held_out": {"ap50": 0.9, "mean_ap": old, "ap75": 0.8}},
                   "b": {"held_out": {"ap50": 0.9, "mean_ap": new, "ap75": 0.8}}}  # fmt: skip
        return {
            "fold": k,
            "overall": {"ap50": 0.9, "mean_ap": old, "ap75": 0.8},
            "instance_grid": {
                "entries": entries,
                "families": {"fit without gap": "a", "fit with gap": "b"},
            },
        }

    release = {"recipe": "bbbc-base", "folds": [0, 1], "steps": 1870, "machine": "cpu X, 2 cores",
               "train_seconds": 1500.0, "family": "fit with gap", "instances": "b",
               "fold_means": {"fit without gap": 0.75, "fit with gap": 0.765}}  # fmt: skip
    net = UNetConfig(depth=1, base_channels=2, num_classes=2)
    info = ModelInfo(net=net, class_names=("background", "nucleus"), weights_dtype="float16",
                     training={"release": release, "command": "biounet train --steps 1870",
                               "train_files": ["a.tif", "b.tif"], "precision": "bf16"},
                     postprocess={"instances": {"gap": 3}})  # fmt: skip
    text = model_readme(
        Path("models/bbbc039"), info, [fold(0, 0.70, 0.72), fold(1, 0.80, 0.81)], UNet(net)
    )
    assert text.startswith("# models/bbbc039 — BBBC039 nuclei, instances\n")
    assert "\n## Validation: cross-validated scores\n" in text  # bioimage.io's section
    assert "| classes | 0 = background, 1 = nucleus |" in text
    assert "| data | 2 images: a.tif, b.tif |" in text
    assert "| training | 1870 steps, precision bf16, 25 min on cpu X, 2 cores |" in text
    assert '`{"instances": {"gap": 3}}`, applied by a plain `biounet predict`' in text
    assert "fit with gap, b (fold means: fit without gap 0.75, fit with gap 0.765)" in text
    assert "```\nbiounet train --steps 1870\n```" in text
    assert "2 of 5 folds" in text and "| mean of 2 | 0.9000 +- 0.0000 | 0.7500 +- 0.0707 |" in text
    assert text.rstrip().endswith("| 0.0150 +- 0.0071 |")  # the family table's paired change


def test_network_only_drops_stored_tta_and_lines_but_keeps_instances(tmp_path):
    """The memory and overlap benches measure the network's tiles: their copy of a model
    predicts as the model would without its stored TTA and membrane lines."""
    import json

    import biounet
    from _common import network_only
    from biounet.cli import main

    model = tmp_path / "m"
    assert main(["-q", "init", str(model), "--depth", "2", "--base-channels", "4"]) == 0
    config = json.loads((model / "config.json").read_text())
    config["postprocess"] = {"tta": True, "membranes": {"seed_threshold": 0.2},
                             "instances": {"seed_threshold": 0.7}}  # fmt: skip
    (model / "config.json").write_text(json.dumps(config))
    copy = network_only(model, tmp_path / "work")
    assert json.loads((copy / "config.json").read_text())["postprocess"] == {
        "instances": {"seed_threshold": 0.7}
    }
    assert (copy / "weights.safetensors").resolve() == (model / "weights.safetensors").resolve()
    image = np.random.default_rng(0).integers(0, 255, (60, 70)).astype(np.uint8)
    plain = biounet.load(model, engine="torch", precision="fp32")
    net = biounet.load(copy, engine="torch", precision="fp32")
    np.testing.assert_array_equal(
        net.predict(image, "prob"), plain.predict(image, "prob", tta=False)
    )
