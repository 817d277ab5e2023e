import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from biounet.errors import BiounetError
from biounet.io import (
    atomic_path,
    list_images,
    pair_by_stem,
    read_image,
    read_mask,
    write_tiff,
)
from biounet.masks import mask_to_classes
from biounet.normalize import NormalizeConfig, normalize


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_and_tiff_gray_round_trip(tmp_path, dtype):
    a = (np.arange(12 * 10).reshape(12, 10) * 37 % np.iinfo(dtype).max).astype(dtype)
    iio.imwrite(tmp_path / "a.png", a)
    tifffile.imwrite(tmp_path / "a.tif", a)
    for name in ("a.png", "a.tif"):
        img = read_image(tmp_path / name)
        assert img.shape == (1, 12, 10) and img.dtype == dtype
        assert np.array_equal(img[0], a)


def test_multichannel_layouts(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    iio.imwrite(tmp_path / "rgb.png", rgb)
    assert np.array_equal(read_image(tmp_path / "rgb.png"), np.moveaxis(rgb, -1, 0))
    chw = np.random.default_rng(0).integers(0, 4095, (2, 20, 30), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "two.tif", chw)
    assert np.array_equal(read_image(tmp_path / "two.tif", in_channels=2), chw)
    with pytest.raises(BiounetError, match="two.tif: has 2 channel.*expects 1"):
        read_image(tmp_path / "two.tif", in_channels=1)


def test_stack_nan_and_garbage_are_refused(tmp_path):
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((12, 20, 20), np.uint8))
    with pytest.raises(BiounetError, match="stack.tif.*3-D stack"):
        read_image(tmp_path / "stack.tif")
    f = np.zeros((8, 8), np.float32)
    f[2, 3] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", f)
    with pytest.raises(BiounetError, match="nan.tif: contains NaN"):
        read_image(tmp_path / "nan.tif")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(BiounetError, match="junk.png: cannot be read as an image"):
        read_image(tmp_path / "junk.png")


def test_mask_types():
    m = np.array([[0, 255], [255, 0]], np.uint8)
    classes, inst, kind = mask_to_classes(m, "m", None, 2)
    assert kind == "binary" and inst is None
    assert np.array_equal(classes, [[0, 1], [1, 0]])
    # The ISBI convention: 0 = membrane is the foreground we want.
    classes, _, _ = mask_to_classes(m, "m", "binary", 2, foreground=0)
    assert np.array_equal(classes, [[1, 0], [0, 1]])
    # Any two values; the larger is foreground by default.
    classes, _, _ = mask_to_classes(np.array([[3, 7]]), "m", None, 2)
    assert np.array_equal(classes, [[0, 1]])
    labels = np.array([[0, 1, 2], [0, 5, 5]], np.uint16)
    classes, inst, kind = mask_to_classes(labels, "m", None, 2)
    assert kind == "instances" and np.array_equal(inst, labels)
    assert np.array_equal(classes, labels > 0)
    classes, _, _ = mask_to_classes(np.array([[0, 1, 2]]), "m", "classes", 3)
    assert np.array_equal(classes, [[0, 1, 2]])
    with pytest.raises(BiounetError, match="m: mask values 0, 1, 2, 3 are not all class"):
        mask_to_classes(np.array([[0, 1, 2, 3]]), "m", "classes", 3)
    with pytest.raises(BiounetError, match="at most two values, found 3"):
        mask_to_classes(np.array([[0, 1, 2]]), "m", "binary", 2)


def test_float_masks_and_rgb_masks(tmp_path):
    tifffile.imwrite(tmp_path / "f.tif", np.array([[0.0, 1.0]], np.float32))
    assert read_mask(tmp_path / "f.tif").tolist() == [[0, 1]]
    tifffile.imwrite(tmp_path / "g.tif", np.array([[0.0, 0.5]], np.float32))
    with pytest.raises(BiounetError, match="fractional"):
        read_mask(tmp_path / "g.tif")
    rgb = np.repeat(np.array([[0, 255], [255, 0]], np.uint8)[..., None], 3, -1)
    iio.imwrite(tmp_path / "rgb.png", rgb)
    assert read_mask(tmp_path / "rgb.png").tolist() == [[0, 255], [255, 0]]


def test_pairing_and_listing(tmp_path):
    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    for name in ("b.png", "a.tif"):
        iio.imwrite(tmp_path / "i" / name, np.zeros((4, 4), np.uint8))
    iio.imwrite(tmp_path / "m" / "a.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "i" / "notes.txt").write_text("ignored")
    assert [p.name for p in list_images(tmp_path / "i")] == ["a.tif", "b.png"]
    with pytest.raises(BiounetError, match="b.png: no mask named b"):
        pair_by_stem(list_images(tmp_path / "i"), tmp_path / "m")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.tif"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
    write_tiff(target, np.ones((3, 3), np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["out.tif"]


def test_percentile_normalisation_handles_12_bit_data_in_uint16():
    rng = np.random.default_rng(0)
    img = rng.integers(100, 4096, (1, 64, 64)).astype(np.uint16)
    x = normalize(img, NormalizeConfig())
    assert x.dtype == np.float32
    assert np.percentile(x, 1) == pytest.approx(0, abs=1e-6)
    assert np.percentile(x, 99.8) == pytest.approx(1, abs=1e-6)
    flat = normalize(np.full((1, 4, 4), 7, np.uint16), NormalizeConfig())
    assert np.all(flat == 0)
    assert normalize(img, NormalizeConfig("dtype")).max() <= 4095 / 65535 + 1e-7


# -- pixel sizes ---------------------------------------------------------------------------


def _calibrated_tiffs(folder, image):
    """The same image as an OME-TIFF, an ImageJ TIFF and a TIFF with centimetre tags, each
    stating 0.65 µm pixels, and one with the common 72 dpi default (no calibration)."""
    tifffile.imwrite(folder / "ome.tif", image, ome=True,
                     metadata={"axes": "YX", "PhysicalSizeX": 0.65, "PhysicalSizeXUnit": "µm",
                               "PhysicalSizeY": 0.65, "PhysicalSizeYUnit": "µm"})  # fmt: skip
    tifffile.imwrite(folder / "imagej.tif", image, imagej=True, resolution=(1 / 0.65, 1 / 0.65),
                     metadata={"unit": "micron"})  # fmt: skip
    tifffile.imwrite(folder / "tags.tif", image, resolution=(1e4 / 0.65, 1e4 / 0.65),
                     resolutionunit="CENTIMETER")  # fmt: skip
    tifffile.imwrite(folder / "dpi.tif", image, resolution=(72, 72), resolutionunit="INCH")


def test_pixel_sizes_are_read_from_ome_imagej_and_tags(tmp_path):
    from biounet.io import read_pixel_size

    _calibrated_tiffs(tmp_path, np.zeros((20, 30), np.uint16))
    for name in ("ome", "imagej", "tags"):
        size = read_pixel_size(tmp_path / f"{name}.tif")
        assert (
            size.unit == "µm" and size.x == pytest.approx(0.65) and size.y == pytest.approx(0.65)
        ), name
    assert read_pixel_size(tmp_path / "dpi.tif") is None
    assert read_pixel_size(tmp_path / "none.png") is None


def test_outputs_carry_the_inputs_pixel_size(tmp_path):
    """Masks (in memory and streamed), instances and probabilities: OME-TIFFs at 0.65 µm."""
    from biounet.architecture import UNetConfig
    from biounet.cli import main
    from biounet.io import read_pixel_size
    from biounet.model import UNet
    from biounet.modeldir import ModelInfo, save_model

    net = UNetConfig(depth=2, base_channels=4)
    save_model(tmp_path / "m", UNet(net), ModelInfo(net, ("background", "cell")))
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    _calibrated_tiffs(tmp_path / "in", rng.integers(0, 255, (60, 70)).astype(np.uint8))
    for flags in (["--output", "mask"], ["--output", "prob"], ["--output", "instances"],
                  ["--stream"]):  # fmt: skip
        out = tmp_path / "out"
        assert main(["predict", str(tmp_path / "m"), str(tmp_path / "in"), "--out", str(out),
                     *flags]) == 0  # fmt: skip
        for name in ("ome", "imagej", "tags"):
            size = read_pixel_size(out / f"{name}.tif")
            assert size is not None and size.x == pytest.approx(0.65), (flags, name)
            with tifffile.TiffFile(out / f"{name}.tif") as tif:
                assert tif.is_ome
        assert read_pixel_size(out / "dpi.tif") is None  # nothing invented
        with tifffile.TiffFile(out / "dpi.tif") as tif:
            assert not tif.is_ome


def test_nonsense_pixel_sizes_state_nothing(tmp_path):
    """Zero or unparsable sizes are ignored: predicting such a file still works."""
    from biounet.io import read_pixel_size, write_tiff

    image = np.zeros((10, 12), np.uint8)
    zero = {"axes": "YX", "PhysicalSizeX": 0.0, "PhysicalSizeY": 0.0}
    tifffile.imwrite(tmp_path / "zero.tif", image, ome=True, metadata=zero)
    broken = "<OME><Pixels PhysicalSizeX="
    tifffile.imwrite(tmp_path / "xml.tif", image, description=broken, metadata=None)
    for name in ("zero", "xml"):
        assert read_pixel_size(tmp_path / f"{name}.tif") is None, name
    write_tiff(tmp_path / "out.tif", image, read_pixel_size(tmp_path / "zero.tif"))
    assert tifffile.imread(tmp_path / "out.tif").shape == (10, 12)
