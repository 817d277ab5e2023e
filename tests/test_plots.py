"""Pictures a biologist reads at a glance: bright instance colours, 2-px contours."""

import numpy as np
from matplotlib.colors import rgb_to_hsv

from biounet.plots import instance_colours, instance_overlay, training_curves, weight_figure


def test_instance_colours_are_bright_and_saturated():
    hsv = rgb_to_hsv(instance_colours(5000).astype(np.float64) / 255)
    assert hsv[:, 2].min() >= 0.8 and hsv[:, 1].min() >= 0.5
    assert not ((hsv[:, 0] > 0.6) & (hsv[:, 0] < 0.72)).any()  # no deep blue
    # Neighbouring ids differ clearly in hue.
    step = np.abs(np.diff(hsv[:, 0]))
    assert np.minimum(step, 1 - step).min() > 0.1


def test_contours_are_two_pixels_inside_each_object():
    labels = np.zeros((40, 60), np.int32)
    yy, xx = np.mgrid[:40, :60]
    labels[(yy - 20) ** 2 + (xx - 18) ** 2 < 12**2] = 1
    labels[((yy - 20) ** 2 + (xx - 41) ** 2 < 12**2) & (labels == 0)] = 2  # touching
    gray = np.full(labels.shape, 100, np.uint8)
    rgb = instance_overlay(gray, labels)
    coloured = (rgb != 100).any(-1)
    # Brute force: an object pixel with another label within Chebyshev distance 2.
    want = np.zeros_like(coloured)
    padded = np.pad(labels, 2, constant_values=-1)
    for y, x in zip(*np.nonzero(labels), strict=True):
        want[y, x] = (padded[y : y + 5, x : x + 5] != labels[y, x]).any()
    assert np.array_equal(coloured, want)
    colours = instance_colours(3)
    for k in (1, 2):  # each object keeps its own line where they touch
        assert (rgb[want & (labels == k)] == colours[k]).all()
    filled = instance_overlay(gray, labels, fill=0.3)
    assert (filled[labels == 1][~want[labels == 1]] != 100).all()


def test_curves_and_weight_figure_are_labelled():
    rows = [{"step": s, "loss": 1 / s, "val_loss": 1.2 / s, "val_dice": 0.5} for s in (1, 2)]
    ax_loss, ax_dice = training_curves(rows).axes
    assert ax_loss.get_yscale() == "linear"
    assert "foreground" in ax_dice.get_ylabel()
    fig = weight_figure(np.zeros((8, 8), int), np.ones((8, 8)))
    assert "weight" in fig.axes[-1].get_ylabel()  # the colour bar


def test_augment_grid_marks_the_original_and_has_no_empty_cells():
    from biounet.plots import augment_grid

    pair = (np.random.default_rng(0).random((1, 20, 20)), np.eye(20, dtype=int))
    for n in (9, 8, 7, 12):
        fig = augment_grid([pair] * n)
        assert len(fig.axes) == n  # every cell holds a picture
        assert fig.axes[0].get_title() == "original" and fig.axes[1].get_title() == "augmented 1"
