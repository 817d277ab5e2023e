"""Membrane masks from probabilities: the threshold, and watershed lines that close gaps."""

import numpy as np
import pytest

from biounet.errors import BiounetError
from biounet.membranes import MembraneConfig, membrane_mask


def _probs(membrane: np.ndarray) -> np.ndarray:
    """(2, H, W) softmax probabilities of a membrane probability map."""
    membrane = membrane.astype(np.float32)
    return np.stack([1 - membrane, membrane])


def _grid_with_gaps(gap: float) -> np.ndarray:
    """A 60 x 60 map of four cells between a cross of membrane, one arm drawn faint."""
    p = np.full((60, 60), 0.02, np.float32)
    p[28:32, :] = 0.95
    p[:, 28:32] = 0.95
    p[28:32, 5:20] = gap  # the left arm fades: the two left cells touch through it
    return p


def test_threshold_alone_is_the_argmax_of_two_classes():
    rng = np.random.default_rng(0)
    probs = _probs(rng.random((40, 50)))
    mask = membrane_mask(probs, MembraneConfig())
    np.testing.assert_array_equal(mask, probs.argmax(0) == 1)
    np.testing.assert_array_equal(
        membrane_mask(probs, MembraneConfig(threshold=0.3)), probs[1] > 0.3
    )


def test_lines_close_a_faint_gap_and_split_the_merged_cells():
    from skimage.measure import label

    probs = _probs(_grid_with_gaps(0.4))
    plain = membrane_mask(probs, MembraneConfig())
    closed = membrane_mask(probs, MembraneConfig(seed_threshold=0.1, min_seed=20))
    assert label(~plain, connectivity=1).max() == 3  # the two left cells merged
    assert label(~closed, connectivity=1).max() == 4
    # only line pixels were added, inside the gap's rows, and nothing was removed
    assert (closed >= plain).all()
    added = np.argwhere(closed & ~plain)
    assert len(added) <= 15 and set(added[:, 1]) <= set(range(5, 20))
    assert set(added[:, 0]) <= set(range(28, 32))


def test_lines_lie_inside_a_membrane_that_is_drawn():
    probs = _probs(_grid_with_gaps(0.95))
    for smooth in (0.0, 1.5):
        config = MembraneConfig(seed_threshold=0.2, min_seed=5, smooth=smooth)
        np.testing.assert_array_equal(membrane_mask(probs, config), probs[1] > 0.5)


def test_seeds_are_never_covered_and_small_seeds_draw_no_lines():
    p = _grid_with_gaps(0.4)
    p[10, 45] = 0.9  # speckle inside a cell: the cell must not be cut around it
    probs = _probs(p)
    mask = membrane_mask(probs, MembraneConfig(seed_threshold=0.1, min_seed=20))
    assert not mask[p < 0.1].any()
    # every seed too small, or no seed at all: no line
    for config in (MembraneConfig(seed_threshold=0.1, min_seed=5000),
                   MembraneConfig(seed_threshold=0.01)):  # fmt: skip
        np.testing.assert_array_equal(membrane_mask(probs, config), p > 0.5)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"threshold": 1.0}, "`threshold` must be in \\(0, 1\\)"),
        ({"threshold": float("nan")}, "`threshold` must be a finite number"),
        ({"threshold": 0.4, "seed_threshold": 0.5}, "`seed_threshold` must be in \\(0, 0.4\\]"),
        ({"seed_threshold": 0.0}, "`seed_threshold` must be in"),
        ({"min_seed": 0}, "`min_seed` must be >= 1"),
        ({"min_seed": 2.5}, "`min_seed` must be an integer"),
        ({"min_seed": True}, "`min_seed` must be an integer"),
        ({"smooth": -1}, "`smooth` must be in \\[0, 20\\]"),
        ({"smooth": True}, "`smooth` must be a finite number"),
        ({"membrane_class": -1}, "`membrane_class` must be >= 0"),
        ({"membrane_class": True}, "`membrane_class` must be an integer"),
    ],
)
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(BiounetError, match=match):
        MembraneConfig(**bad)


def test_a_class_the_probabilities_lack_is_refused():
    with pytest.raises(BiounetError, match="membrane class 2 is not among the 2 classes"):
        membrane_mask(np.zeros((2, 4, 4), np.float32), MembraneConfig(membrane_class=2))


def _voronoi_membranes(shape, cells: int, seed: int) -> np.ndarray:
    """An EM-like membrane probability map: Voronoi cells, boundaries 3 px wide, some faint."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    centres = rng.random((cells, 2)) * shape
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    d = (yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2
    owner = d.argmin(-1)
    edge = ndimage.morphological_gradient(owner, size=3) > 0
    p = np.where(edge, 0.9, 0.05) + rng.normal(0, 0.03, shape)
    faint = rng.random(shape) < 0.002  # gaps: discs of faint membrane
    p[ndimage.binary_dilation(faint, iterations=4) & edge] = 0.35
    return np.clip(p, 0, 1).astype(np.float32)


@pytest.mark.parametrize(("chunk", "margin"), [(48, 40), (64, 64)])
def test_chunks_equal_the_whole_map(chunk, margin):
    from biounet.membranes import classes_in_chunks, membrane_classes

    probs = _probs(_voronoi_membranes((190, 230), 60, seed=1))
    for config in (MembraneConfig(seed_threshold=0.2, min_seed=10),
                   MembraneConfig(seed_threshold=0.1, min_seed=20, smooth=1.0)):  # fmt: skip
        whole = membrane_classes(probs, config)
        assert whole.sum() > membrane_mask(probs, MembraneConfig()).sum()  # lines were drawn
        out = np.full(whole.shape, 7, np.uint8)
        classes_in_chunks(probs, out, config, chunk=chunk, margin=margin)
        np.testing.assert_array_equal(out, whole)


def test_classes_of_three_class_probabilities():
    from biounet.membranes import membrane_classes

    rng = np.random.default_rng(4)
    probs = rng.random((3, 30, 40)).astype(np.float32)
    probs /= probs.sum(0)
    config = MembraneConfig(membrane_class=1, threshold=0.4)
    classes = membrane_classes(probs, config)
    on = probs[1] > 0.4
    assert (classes[on] == 1).all()
    np.testing.assert_array_equal(classes[~on], np.where(probs[2] > probs[0], 2, 0)[~on])
