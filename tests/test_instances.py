import numpy as np
import pytest
from scipy import ndimage

from biounet.instances import InstanceConfig, instances_from_probabilities
from biounet.metrics import instance_scores
from biounet.weightmap import carve_borders, touching_borders


def touching_disks(rows=3, cols=4, r=9, step=17):
    """Grid of disks of radius r whose centres are 17 px apart: neighbours overlap -> touch."""
    shape = (rows * step + 2 * r + 4, cols * step + 2 * r + 4)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    k = 0
    for i in range(rows):
        for j in range(cols):
            k += 1
            cy, cx = r + 2 + i * step, r + 2 + j * step
            labels[((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (labels == 0)] = k
    return labels


def one_hot(classes, k, blur=0.0):
    probs = np.stack([(classes == c).astype(np.float32) for c in range(k)])
    if blur:
        probs = ndimage.gaussian_filter(probs, (0, blur, blur))
        probs /= probs.sum(0, keepdims=True)
    return probs


@pytest.mark.parametrize("blur", [0.0, 0.7])
def test_touching_disks_of_known_count_are_separated_exactly(blur):
    truth = touching_disks()
    assert touching_borders(truth).any()  # the disks really touch
    assert ndimage.label(truth > 0)[1] < truth.max()  # and merge as plain foreground
    carved = carve_borders(truth)
    labels = instances_from_probabilities(
        one_hot((carved > 0).astype(int), 2, blur), InstanceConfig()
    )
    assert labels.max() == truth.max() == 12
    scores = instance_scores(labels, truth)
    assert scores["tp"][0] == 12 and scores["merges"] == 0 and scores["splits"] == 0
    assert scores["seg"] > 0.85  # growing back restores most of the carved pixels


def test_three_class_border_model():
    truth = touching_disks(2, 3)
    classes = (truth > 0).astype(int)
    classes[touching_borders(truth)] = 2
    labels = instances_from_probabilities(
        one_hot(classes, 3), InstanceConfig(border_class=2, expand=0)
    )
    assert labels.max() == 6
    assert instance_scores(labels, truth)["seg"] > 0.9


def test_ids_are_consecutive_small_objects_removed_and_empty_is_empty():
    classes = np.zeros((40, 40), int)
    classes[2:12, 2:12] = 1
    classes[30:32, 30:32] = 1  # 4 px of noise
    classes[20:30, 5:15] = 1
    labels = instances_from_probabilities(one_hot(classes, 2), InstanceConfig(min_size=10))
    assert labels.dtype == np.uint32
    assert sorted(np.unique(labels)) == [0, 1, 2]
    assert labels[31, 31] == 0
    empty = instances_from_probabilities(one_hot(np.zeros((30, 20), int), 2), InstanceConfig())
    assert empty.shape == (30, 20) and empty.max() == 0


def test_holes_are_filled():
    classes = np.zeros((30, 30), int)
    classes[5:25, 5:25] = 1
    classes[12:16, 12:16] = 0  # a hole
    labels = instances_from_probabilities(one_hot(classes, 2), InstanceConfig())
    assert labels.max() == 1 and labels[13, 13] == 1
