"""Tests of biounet.evaluate on small synthetic folders with hand-computed answers."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from biounet.errors import BiounetError
from biounet.evaluate import (
    MEMBRANE_KEYS,
    EvaluateConfig,
    evaluate_folders,
    evaluate_pair,
    format_table,
    load_report,
    pair_predictions,
    save_report,
)
from biounet.io import write_tiff

MEMBRANES = EvaluateConfig("membranes")
SEMANTIC = EvaluateConfig("semantic")
INSTANCES = EvaluateConfig("instances")


def folders(tmp_path: Path) -> tuple[Path, Path]:
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    pred.mkdir(parents=True)
    truth.mkdir()
    return pred, truth


def isbi_truth(size: int = 24) -> np.ndarray:
    """ISBI-style label image: 0 = membrane (a cross), 255 = the four cells."""
    truth = np.full((size, size), 255, np.uint8)
    truth[:, 10] = 0
    truth[14, :] = 0
    return truth


def as_probabilities(membrane: np.ndarray) -> np.ndarray:
    """(2, H, W) float32 as biounet writes: plane 0 interior, plane 1 membrane."""
    p1 = np.where(membrane, 0.9, 0.1).astype(np.float32)
    return np.stack([1 - p1, p1])


def squares(shape: tuple[int, int], boxes: list[tuple[int, int, int]]) -> np.ndarray:
    """uint16 instance labels: square k+1 at (row, col) with side s for each box."""
    labels = np.zeros(shape, np.uint16)
    for k, (r, c, s) in enumerate(boxes):
        labels[r : r + s, c : c + s] = k + 1
    return labels


def strict_json(obj: object) -> None:
    json.dumps(obj, allow_nan=False)


# -- membranes ----------------------------------------------------------------------------


@pytest.mark.parametrize("as_prob", [False, True])
def test_membranes_perfect(tmp_path: Path, as_prob: bool) -> None:
    pred, truth = folders(tmp_path)
    for stem in ("a", "b"):
        t = isbi_truth()
        iio.imwrite(truth / f"{stem}.png", t)
        membrane = t == 0
        write_tiff(
            pred / f"{stem}.tif",
            as_probabilities(membrane) if as_prob else membrane.astype(np.uint8),
        )
    report = evaluate_folders(pred, truth, MEMBRANES)
    strict_json(report)
    assert report["task"] == "membranes"
    assert report["config"]["truth_foreground"] == 0
    assert set(report["images"]) == {"a", "b"}
    for scores in [*report["images"].values(), report["mean"]]:
        assert set(scores) == set(MEMBRANE_KEYS)
        for key in ("pixel_error", "pixel_fscore_error", "rand_error", "warping_error"):
            assert scores[key] == pytest.approx(0.0, abs=1e-12)
        for key in ("v_rand", "v_info", "v_rand_split", "v_info_merge"):
            assert scores[key] == pytest.approx(1.0)


def test_membranes_broken_membrane_probabilities_match_mask() -> None:
    truth = isbi_truth()
    membrane = truth == 0
    membrane[3:6, 10] = False  # gap: the two upper cells merge
    mask = evaluate_pair(membrane.astype(np.uint8), truth, MEMBRANES)
    prob = evaluate_pair(as_probabilities(membrane), truth, MEMBRANES)
    assert mask["pixel_error"] == pytest.approx(3 / truth.size)
    assert mask["rand_error"] > 0.05
    assert mask["v_rand_split"] == pytest.approx(1.0)  # a merge, no split
    assert mask["v_rand_merge"] < 1.0
    assert mask["warping_error"] > 0
    # The probabilities binarise to the mask at every threshold of the sweep in (0.1, 0.9].
    for key in MEMBRANE_KEYS:
        assert prob[key] == pytest.approx(mask[key]), key


def test_membranes_truth_foreground_and_membrane_class() -> None:
    truth = (isbi_truth() == 0).astype(np.uint8)  # 1 = membrane
    pred = np.where(truth == 1, 2, 0).astype(np.uint8)  # membrane predicted as class 2
    config = EvaluateConfig("membranes", truth_foreground=1, membrane_class=2)
    assert evaluate_pair(pred, truth, config)["rand_error"] == pytest.approx(0.0, abs=1e-12)
    probs = np.zeros((3, *truth.shape), np.float32)
    probs[2] = truth
    probs[0] = 1 - truth
    assert evaluate_pair(probs, truth, config)["warping_error"] == 0.0
    with pytest.raises(BiounetError, match="2 probability planes, so no membrane plane 2"):
        evaluate_pair(probs[:2], truth, config)
    with pytest.raises(BiounetError, match="no cell interior"):
        evaluate_pair(pred, np.zeros_like(truth), MEMBRANES)


# -- semantic -----------------------------------------------------------------------------


def test_semantic_known_iou_and_binary_truth(tmp_path: Path) -> None:
    pred, truth = folders(tmp_path)
    t = np.zeros((4, 4), np.uint8)
    t[:, 2:] = 255  # binary {0, 255} truth: 255 is class 1
    iio.imwrite(truth / "a.png", t)
    iio.imwrite(truth / "b.png", t)
    p = (t > 0).astype(np.uint8)
    write_tiff(pred / "a.tif", p)  # perfect
    p_bad = p.copy()
    p_bad[:, 2] = 0  # one column of class 1 predicted as class 0
    write_tiff(pred / "b.tif", p_bad)
    report = evaluate_folders(pred, truth, SEMANTIC)
    strict_json(report)
    assert report["config"]["num_classes"] == 2
    assert report["config"]["truth_foreground"] == 255
    a, b = report["images"]["a"], report["images"]["b"]
    assert a["iou"] == [1.0, 1.0] and a["mean_iou"] == 1.0 and a["mean_dice"] == 1.0
    # class 0: tp 8, fp 4, fn 0; class 1: tp 4, fp 0, fn 4
    assert b["iou"] == pytest.approx([8 / 12, 4 / 8])
    assert b["dice"] == pytest.approx([16 / 20, 8 / 12])
    assert b["mean_iou"] == pytest.approx(7 / 12)
    assert report["mean"]["iou"] == pytest.approx([(1 + 8 / 12) / 2, (1 + 0.5) / 2])
    assert report["mean"]["mean_iou"] == pytest.approx((1 + 7 / 12) / 2)
    # pooled over both images: class 0 tp 16 fp 4 fn 0; class 1 tp 12 fp 0 fn 4
    assert report["pooled"]["iou"] == pytest.approx([16 / 20, 12 / 16])


def test_semantic_probabilities_match_masks(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    t = rng.integers(0, 3, (16, 20)).astype(np.uint8)
    logits = rng.normal(size=(3, 16, 20)) + 2.0 * (np.arange(3)[:, None, None] == t)
    probs = (np.exp(logits) / np.exp(logits).sum(0)).astype(np.float32)
    (tmp_path / "mask").mkdir()
    (tmp_path / "prob").mkdir()
    (tmp_path / "truth").mkdir()
    iio.imwrite(tmp_path / "truth" / "x.png", t)
    write_tiff(tmp_path / "mask" / "x.tif", probs.argmax(0).astype(np.uint8))
    write_tiff(tmp_path / "prob" / "x.tif", probs)
    by_mask = evaluate_folders(tmp_path / "mask", tmp_path / "truth", SEMANTIC)
    by_prob = evaluate_folders(tmp_path / "prob", tmp_path / "truth", SEMANTIC)
    assert by_prob == by_mask
    assert by_mask["config"]["num_classes"] == 3
    assert 0 < by_mask["mean"]["mean_iou"] < 1


def test_semantic_absent_class_and_bad_values() -> None:
    truth = np.array([[0, 0], [1, 1]], np.uint8)
    scores = evaluate_pair(truth, truth, EvaluateConfig("semantic", num_classes=3))
    assert scores["iou"] == [1.0, 1.0, None] and scores["mean_iou"] == 1.0
    with pytest.raises(BiounetError, match="prediction: predicted classes up to 5"):
        evaluate_pair(truth * 5, truth, EvaluateConfig("semantic", num_classes=3))


# -- instances ----------------------------------------------------------------------------


def test_instances_perfect_and_one_missed(tmp_path: Path) -> None:
    pred, truth = folders(tmp_path)
    t = squares((32, 32), [(2, 2, 8), (2, 20, 8), (20, 10, 9)])
    iio.imwrite(truth / "a.png", t)
    iio.imwrite(truth / "b.png", t)
    perfect = np.where(t > 0, 40 - t.astype(np.int32), 0).astype(np.uint16)  # other ids
    write_tiff(pred / "a.tif", perfect)
    missed = np.where(t == 3, 0, t).astype(np.uint16)
    write_tiff(pred / "b.tif", missed)
    report = evaluate_folders(pred, truth, INSTANCES)
    strict_json(report)
    a, b = report["images"]["a"], report["images"]["b"]
    assert a["ap_50"] == a["mean_ap"] == a["f1_50"] == a["seg"] == 1.0
    assert (a["n_true"], a["n_pred"], a["merges"], a["splits"]) == (3, 3, 0, 0)
    assert b["ap_50"] == pytest.approx(2 / 3) and b["mean_ap"] == pytest.approx(2 / 3)
    assert b["f1_50"] == pytest.approx(4 / 5) and b["seg"] == pytest.approx(2 / 3)
    assert b["fn"][0] == 1 and b["fp"][0] == 0
    pooled = report["pooled"]
    assert (pooled["tp"][0], pooled["fp"][0], pooled["fn"][0]) == (5, 0, 1)
    assert pooled["ap_50"] == pytest.approx(5 / 6) and pooled["f1_50"] == pytest.approx(10 / 11)
    assert pooled["seg"] == pytest.approx(5 / 6) and pooled["n_images"] == 2
    assert report["mean"]["ap_50"] == pytest.approx((1 + 2 / 3) / 2)
    with pytest.raises(BiounetError, match="probability map"):
        evaluate_pair(np.zeros((2, 32, 32), np.float32), t, INSTANCES)


# -- files, errors, report ----------------------------------------------------------------


def test_pairing_errors_name_the_file(tmp_path: Path) -> None:
    pred, truth = folders(tmp_path)
    t = isbi_truth()
    for stem in ("a", "b"):
        iio.imwrite(truth / f"{stem}.png", t)
    write_tiff(pred / "a.tif", (t == 0).astype(np.uint8))
    with pytest.raises(BiounetError, match=r"b\.png: no prediction named b\.\*"):
        evaluate_folders(pred, truth, MEMBRANES)
    write_tiff(pred / "b.tif", (t == 0).astype(np.uint8))
    write_tiff(pred / "c.tif", (t == 0).astype(np.uint8))
    with pytest.raises(BiounetError, match=r"c\.tif: no truth file named c\.\*"):
        evaluate_folders(pred, truth, MEMBRANES)
    (pred / "c.tif").unlink()
    iio.imwrite(pred / "a_overlay.png", np.zeros((24, 24, 3), np.uint8))  # skipped
    assert [s for s, _, _ in pair_predictions(pred, truth)] == ["a", "b"]
    iio.imwrite(pred / "a.png", t)
    with pytest.raises(BiounetError, match=r"a\.(png|tif): same file stem as"):
        pair_predictions(pred, truth)
    with pytest.raises(BiounetError, match="is a folder but"):
        pair_predictions(pred, truth / "a.png")


def test_shape_mismatch_names_both_files(tmp_path: Path) -> None:
    pred, truth = folders(tmp_path)
    iio.imwrite(truth / "a.png", isbi_truth(24))
    write_tiff(pred / "a.tif", (isbi_truth(20) == 0).astype(np.uint8))
    pattern = rf"{pred / 'a.tif'}: prediction has shape \(20, 20\) but {truth / 'a.png'}"
    with pytest.raises(BiounetError, match=pattern):
        evaluate_folders(pred, truth, MEMBRANES)
    with pytest.raises(BiounetError, match="same image size"):
        evaluate_folders(pred / "a.tif", truth / "a.png", SEMANTIC)


def test_single_files_table_and_round_trip(tmp_path: Path) -> None:
    t = isbi_truth()
    iio.imwrite(tmp_path / "slice.png", t)
    membrane = t == 0
    membrane[3:6, 10] = False
    write_tiff(tmp_path / "slice_pred.tif", as_probabilities(membrane))
    report = evaluate_folders(tmp_path / "slice_pred.tif", tmp_path / "slice.png", MEMBRANES)
    assert list(report["images"]) == ["slice"]
    path = save_report(tmp_path / "out" / "report.json", report)
    assert load_report(path) == report
    table = format_table(report)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["image", "pixel_error", "pixel_fscore_error"]
    assert any(line.startswith("slice ") for line in lines)
    assert lines[-1].startswith("mean ")
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(BiounetError, match="other.json: not a biounet evaluation report"):
        load_report(tmp_path / "other.json")


def test_table_rows_for_semantic_and_instances(tmp_path: Path) -> None:
    t = squares((16, 16), [(1, 1, 5), (8, 8, 6)])
    for config, columns in ((SEMANTIC, ["mean_iou", "iou_0", "iou_1"]), (INSTANCES, ["ap_50"])):
        pred, truth = folders(tmp_path / config.task)
        for stem in ("img_one", "img_two"):
            iio.imwrite(
                truth / f"{stem}.png", t if config is INSTANCES else (t > 0) * np.uint8(255)
            )
            write_tiff(pred / f"{stem}.tif", t if config is INSTANCES else (t > 0).astype(np.uint8))
        table = format_table(evaluate_folders(pred, truth, config))
        for word in ["img_one", "img_two", "mean", "pooled", *columns]:
            assert word in table
