import numpy as np
import pytest
from scipy import ndimage

from biounet.errors import BiounetError
from biounet.instances import InstanceConfig, instances_from_probabilities, instances_in_chunks
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


def test_a_high_seed_threshold_splits_cells_joined_by_a_faint_gap_without_shrinking_them():
    truth = touching_disks(2, 3)
    cell = np.where(truth > 0, 0.95, 0.05).astype(np.float32)
    cell[touching_borders(truth)] = 0.7  # the network drew the gaps, but only faintly
    probs = np.stack([1 - cell, cell])
    merged = instances_from_probabilities(probs, InstanceConfig(expand=0))
    assert merged.max() == 1  # the gaps are above 0.5: one clump
    split = instances_from_probabilities(probs, InstanceConfig(seed_threshold=0.9, expand=0))
    assert split.max() == 6
    # The extent comes from `threshold`, not from the seeds (pockets between disks are holes).
    np.testing.assert_array_equal(split > 0, ndimage.binary_fill_holes(truth > 0))
    scores = instance_scores(split, truth)
    assert scores["merges"] == 0 and scores["seg"] > 0.9


def scattered_clumps(shape=(230, 310), n=60, seed=0):
    """Probabilities of many touching, differently sized disks (and some with holes)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    for k in range(1, n + 1):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        r = rng.uniform(3, 9)
        disk = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (labels == 0)
        if r > 7:  # a ring: hole filling has work to do
            disk &= (yy - cy) ** 2 + (xx - cx) ** 2 >= 4
        labels[disk] = k
    carved = carve_borders(labels)
    noisy = (carved > 0) + rng.normal(0, 0.15, shape)
    return one_hot((ndimage.gaussian_filter(noisy, 1.0) > 0.5).astype(int), 2, blur=0.8)


@pytest.mark.parametrize(
    "config",
    [
        InstanceConfig(),
        InstanceConfig(expand=2, min_size=30),
        InstanceConfig(fill_holes=False),
        InstanceConfig(seed_threshold=0.9, expand=0, max_hole=8),
        InstanceConfig(expand=0, gap=3, max_hole=8),
    ],
)
@pytest.mark.parametrize("chunk", [37, 64, 1000])
def test_chunked_post_processing_equals_whole_image(config, chunk):
    probs = scattered_clumps()
    whole = instances_from_probabilities(probs, config)
    assert whole.max() > 30
    out = np.zeros(whole.shape, np.uint32)
    n = instances_in_chunks(probs, out, config, chunk=chunk, margin=40)
    assert n == whole.max()
    np.testing.assert_array_equal(out, whole)


def test_chunked_post_processing_flags_clumps_wider_than_the_margin(caplog):
    probs = one_hot(np.pad(np.ones((20, 120), int), 5), 2)  # one 120 px wide object
    out = np.zeros(probs.shape[1:], np.uint32)
    with caplog.at_level("WARNING", logger="biounet.instances"):
        instances_in_chunks(probs, out, InstanceConfig(max_hole=4), chunk=32, margin=16)
    assert "wider than the 16 px margin" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="biounet.instances"):
        instances_in_chunks(
            probs, np.zeros_like(out), InstanceConfig(max_hole=4), chunk=32, margin=130
        )
    assert caplog.text == ""


def test_chunked_post_processing_of_an_empty_map():
    out = np.zeros((50, 70), np.uint32)
    config = InstanceConfig(max_hole=4)
    assert instances_in_chunks(one_hot(out.astype(int), 2), out, config, 16, 8) == 0
    assert out.max() == 0


def ring_around_a_cell(shape=(160, 160), centre=(70, 80)):
    """A ring of cell (outer radius 45, inner 35) with a small cell inside its lumen."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    d2 = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2
    classes = ((d2 <= 45**2) & (d2 >= 35**2)).astype(int)
    classes[d2 <= 8**2] = 1
    return one_hot(classes, 2)


def test_only_small_holes_are_filled_so_a_cell_inside_a_ring_stays_a_cell():
    probs = ring_around_a_cell()
    labels = instances_from_probabilities(probs, InstanceConfig(expand=0))
    assert labels.max() == 2  # the lumen (70 px across) is not a hole to fill
    assert labels[70, 80] != labels[70, 80 + 40] and labels[70, 80 + 20] == 0


@pytest.mark.parametrize("chunk", [64, 70, 90])
def test_chunked_post_processing_equals_whole_image_around_a_large_lumen(chunk, caplog):
    probs = np.pad(ring_around_a_cell(), ((0, 0), (0, 140), (0, 140)), mode="edge")
    config = InstanceConfig(expand=0)
    whole = instances_from_probabilities(probs, config)
    out = np.zeros(whole.shape, np.uint32)
    with caplog.at_level("WARNING", logger="biounet.instances"):
        assert instances_in_chunks(probs, out, config, chunk=chunk, margin=100) == 2
    np.testing.assert_array_equal(out, whole)
    assert caplog.text == ""
    with caplog.at_level("WARNING", logger="biounet.instances"):
        instances_in_chunks(probs, np.zeros_like(out), config, chunk=chunk, margin=40)
    assert "wider than the 40 px margin" in caplog.text  # the ring does not fit: said so


def test_three_class_chunked_post_processing_equals_whole_image():
    truth = touching_disks(4, 6)
    classes = (truth > 0).astype(int)
    classes[touching_borders(truth)] = 2
    probs = one_hot(classes, 3, blur=0.7)
    config = InstanceConfig(border_class=2, expand=0, max_hole=8)
    whole = instances_from_probabilities(probs, config)
    assert whole.max() == 24
    out = np.zeros(whole.shape, np.uint32)
    assert instances_in_chunks(probs, out, config, chunk=23, margin=120) == 24
    np.testing.assert_array_equal(out, whole)


def test_seeds_below_the_cell_threshold_are_refused():
    with pytest.raises(BiounetError, match="seed_threshold 0.3 is below threshold 0.5"):
        InstanceConfig(seed_threshold=0.3)


def test_gap_closes_carved_contacts_and_leaves_free_outlines_as_drawn():
    truth = touching_disks()
    carved = carve_borders(truth)
    probs = one_hot((carved > 0).astype(int), 2)
    as_drawn = instances_from_probabilities(probs, InstanceConfig(expand=0))
    grown = instances_from_probabilities(probs, InstanceConfig(expand=1))
    closed = instances_from_probabilities(probs, InstanceConfig(expand=0, gap=3))
    contacts = touching_borders(truth)
    assert closed.max() == truth.max() == 12  # no cell lost or merged
    # the carved contacts come back to their own cells...
    assert np.mean(closed[contacts] == truth[contacts]) > 0.95
    assert np.all(as_drawn[contacts] == 0)
    # ...and no outline away from another cell moves: the disks' free edges stay exact
    free = ~ndimage.binary_dilation(contacts, iterations=3)
    np.testing.assert_array_equal(closed[free], as_drawn[free])
    np.testing.assert_array_equal(closed[free] > 0, truth[free] > 0)
    wrong = [np.count_nonzero(labels != truth) for labels in (closed, grown, as_drawn)]
    assert wrong[0] < min(wrong[1:])  # fewer wrong pixels than growing all, or nothing


def test_gap_closes_gaps_up_to_its_width_and_no_wider():
    classes = np.zeros((20, 40), int)
    classes[5:15, 2:10] = 1
    classes[5:15, 13:21] = 1  # a 3 px gap: closed
    classes[5:15, 25:33] = 1  # a 4 px gap: left open
    labels = instances_from_probabilities(one_hot(classes, 2), InstanceConfig(expand=0, gap=3))
    assert labels.max() == 3
    want = classes.copy()
    want[5:15, 10:13] = 1
    np.testing.assert_array_equal(labels > 0, want > 0)
    assert np.all(labels[5:15, 10] == labels[10, 5])  # each side to the nearer box
    assert np.all(labels[5:15, 12] == labels[10, 15])  # (the middle column is a tie)
    assert np.all(labels[:, 21:25] == 0)


@pytest.mark.parametrize(
    "field, value",
    [("gap", -1), ("expand", 1.5), ("min_size", True), ("threshold", float("nan")),
     ("threshold", 1.0), ("seed_threshold", 0.0), ("cell_class", -1), ("max_hole", "8"),
     ("fill_holes", "yes")],
)  # fmt: skip
def test_bad_config_values_are_refused_by_name(field, value):
    with pytest.raises(BiounetError, match=field):
        InstanceConfig(**{field: value})


def test_gap_in_chunks_stays_exact_and_quiet_where_cells_sit_near_each_other(caplog):
    """A lattice of boxes 4 px apart: with gap 3 every box is within 2 gap of the next, yet each
    depends only on its neighbours, so the blocks equal the whole map and nothing is flagged."""
    classes = np.zeros((230, 230), int)
    for y in range(3, 225, 10):
        for x in range(3, 225, 10):
            classes[y : y + 6, x : x + 6] = 1
    classes[63:69, 69] = 1  # one box 1 px wider: a 3 px gap to its right-hand neighbour
    probs = one_hot(classes, 2)
    config = InstanceConfig(expand=0, gap=3, max_hole=8)
    whole = instances_from_probabilities(probs, config)
    assert whole.max() == 23 * 23
    assert np.all(whole[63:69, 70:73] > 0) and np.all(whole[63:69, 59:63] == 0)  # closed; 4 px not
    out = np.zeros(whole.shape, np.uint32)
    with caplog.at_level("WARNING", logger="biounet.instances"):
        instances_in_chunks(probs, out, config, chunk=64, margin=40)
    np.testing.assert_array_equal(out, whole)
    assert caplog.text == ""
