"""The napari plugin: its manifest validates, the widget's work equals `Model.predict` and
lands at the input layer's scale (headless, `ViewerModel`), and a real `napari.Viewer` with
the widget docked segments an image under a virtual display (Xvfb) where one can be had."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari", reason="the napari extra is not installed")
pytest.importorskip("npe2", reason="the napari extra is not installed")

import biounet  # noqa: E402
from biounet.napari.sample import isbi_sample, synthetic_em  # noqa: E402
from biounet.napari.segment import predict_layer, segment, snapshot  # noqa: E402

from .conftest import SHARED_DATA  # noqa: E402


def test_manifest_validates():
    npe2 = Path(sys.executable).with_name("npe2")
    done = subprocess.run(
        [str(npe2), "validate", "biounet"], capture_output=True, text=True, timeout=300
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert "valid!" in report and "invalid" not in report.lower(), report


def test_manifest_names_the_widget_and_sample():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("biounet")
    assert [w.display_name for w in manifest.contributions.widgets] == ["U-Net segmentation"]
    assert [s.key for s in manifest.contributions.sample_data] == ["isbi2012"]
    for command in manifest.contributions.commands:  # every python_name resolves
        module, _, name = command.python_name.partition(":")
        assert callable(getattr(__import__(module, fromlist=[name]), name))


@pytest.fixture()
def viewer_model():
    from napari.components import ViewerModel

    return ViewerModel()


def test_widget_logic_equals_model_predict_at_the_layer_scale(viewer_model):
    image = synthetic_em(size=200)
    layer = viewer_model.add_image(image, name="em", scale=(0.65, 0.65), translate=(10, 20))
    (mask,) = segment(viewer_model, layer, "isbi2012", "mask")
    want = biounet.load("isbi2012").predict(image, "mask")
    assert mask.__class__.__name__ == "Labels" and mask.name == "em mask"
    np.testing.assert_array_equal(mask.data, want)
    assert tuple(mask.scale) == (0.65, 0.65) and tuple(mask.translate) == (10, 20)
    probs = segment(viewer_model, layer, "isbi2012", "prob")
    assert [p.name for p in probs] == ["em p(interior)", "em p(membrane)"]
    want = biounet.load("isbi2012").predict(image, "prob")
    for k, p in enumerate(probs):
        np.testing.assert_allclose(p.data, want[k], atol=1e-6)
        assert tuple(p.scale) == (0.65, 0.65)
    assert len(viewer_model.layers) == 4


def test_widget_logic_segments_stacks_and_instances(viewer_model):
    stack = np.stack([synthetic_em(size=120, seed=s) for s in (1, 2)])
    layer = viewer_model.add_image(stack, name="stack", scale=(2.0, 0.5, 0.5))
    done = []
    result = predict_layer(
        snapshot(layer), "bbbc039", "instances", progress=lambda d, t: done.append(d / t)
    )
    model = biounet.load("bbbc039")
    assert result.data.shape == stack.shape and result.kind == "labels"
    for z in range(2):
        np.testing.assert_array_equal(result.data[z], model.predict(stack[z], "instances"))
    assert result.options["scale"] == (2.0, 0.5, 0.5)
    assert done and done[-1] == 1.0 and done == sorted(done)


def test_widget_logic_reports_bad_model_folder(viewer_model, tmp_path):
    layer = viewer_model.add_image(synthetic_em(size=64))
    with pytest.raises(biounet.BiounetError, match="nowhere"):
        predict_layer(snapshot(layer), str(tmp_path / "nowhere"))
    four_d = viewer_model.add_image(np.zeros((2, 2, 30, 30), np.uint8), name="4d")
    with pytest.raises(biounet.BiounetError, match="'4d' has shape"):
        predict_layer(snapshot(four_d), "isbi2012")


def test_widget_logic_rgb_and_channels_last_layers(viewer_model, tmp_path):
    """An RGB layer segments as gray with a one-channel model; a channels-last layer of a
    two-channel model lands at the scale of its spatial axes, not its channel axis."""
    rgb = np.stack([synthetic_em(size=100, seed=s) for s in (3, 4, 5)], axis=-1)
    layer = viewer_model.add_image(rgb, name="rgb", rgb=True, scale=(0.5, 0.25))
    result = predict_layer(snapshot(layer), "isbi2012", "mask")
    gray = rgb.astype(np.float32).mean(axis=-1)
    np.testing.assert_array_equal(result.data, biounet.load("isbi2012").predict(gray, "mask"))
    assert result.options["scale"] == (0.5, 0.25)
    from biounet.cli import main

    folder = tmp_path / "two"
    assert (
        main(
            [
                "-q",
                "init",
                str(folder),
                "--depth",
                "2",
                "--base-channels",
                "4",
                "--in-channels",
                "2",
            ]
        )
        == 0
    )
    two = np.random.default_rng(0).random((60, 70, 2)).astype(np.float32)
    layer = viewer_model.add_image(two, name="two", scale=(0.5, 0.25, 1.0))
    result = predict_layer(snapshot(layer), str(folder), "prob")
    want = biounet.load(folder).predict(two, "prob", channel_axis=-1)
    np.testing.assert_allclose(result.data, want, atol=1e-6)
    assert result.data.shape == (2, 60, 70) and result.options["scale"] == (0.5, 0.25)


def test_sample_data_is_isbi_when_the_data_is_there(monkeypatch):
    monkeypatch.delenv("BIOUNET_DATA", raising=False)
    ((image, meta, kind),) = isbi_sample()
    assert kind == "image" and image.dtype == np.uint8 and "synthetic" in meta["name"]
    if not (SHARED_DATA / "isbi2012" / "test_images").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    monkeypatch.setenv("BIOUNET_DATA", str(SHARED_DATA))
    ((image, meta, _),) = isbi_sample()
    assert image.shape == (384, 384) and meta["name"].startswith("ISBI 2012 00")


# -- a real viewer on a virtual display --------------------------------------------------------

GUI_SCRIPT = r"""
import sys, time
import numpy as np
import napari
import biounet
from biounet.napari.sample import synthetic_em
from biounet.napari.widget import SegmentWidget

viewer = napari.Viewer(show=True)
image = synthetic_em(size=200)
viewer.add_image(image, name="em", scale=(0.5, 0.5))
widget = SegmentWidget(viewer)
viewer.window.add_dock_widget(widget, name="U-Net segmentation")
widget.model.value = "isbi2012"
widget.output.value = "mask"
widget.run_button.clicked.emit()
app = napari.qt.get_qapp()
deadline = time.monotonic() + 240
while "em mask" not in viewer.layers and time.monotonic() < deadline:
    app.processEvents()
    time.sleep(0.05)
assert "em mask" in viewer.layers, widget.status.value
app.processEvents()
want = biounet.load("isbi2012").predict(image, "mask")
np.testing.assert_array_equal(viewer.layers["em mask"].data, want)
assert tuple(viewer.layers["em mask"].scale) == (0.5, 0.5)
assert widget.progress.value == 1000 and widget.status.value.startswith("added")
if len(sys.argv) > 1:
    viewer.screenshot(sys.argv[1], canvas_only=False)
viewer.close()
print("GUI OK")
"""


def _display_unavailable() -> str | None:
    """Why no virtual display with Qt can be had here (`make display` installs one)."""
    import ctypes.util

    if shutil.which("Xvfb") is None:
        return "Xvfb is not installed (Debian package xvfb; `make test` installs it as root)"
    if ctypes.util.find_library("xcb-cursor") is None:
        return "libxcb-cursor0 is missing: Qt >= 6.5's xcb platform needs it (`make display`)"
    return None


def _start_xvfb(log: Path) -> tuple[subprocess.Popen, str]:
    """Xvfb on a display number it picks itself (no clash with another test run), once its
    socket accepts connections (it may name the display a moment before)."""
    import select
    import socket
    import time

    read, write = os.pipe()
    with log.open("w") as err:
        xvfb = subprocess.Popen(
            ["Xvfb", "-displayfd", str(write), "-screen", "0", "1280x900x24", "-nolisten", "tcp"],
            pass_fds=(write,),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    os.close(write)
    text, deadline = b"", time.monotonic() + 30
    # Xvfb writes the number, then the newline: closing our end before the newline arrives
    # kills it ("Cannot write display number to fd").
    while not text.endswith(b"\n") and time.monotonic() < deadline:
        ready, _, _ = select.select([read], [], [], 1)
        chunk = os.read(read, 16) if ready else b""
        if ready and not chunk:  # Xvfb closed it: it is gone
            break
        text += chunk
    os.close(read)
    number = text.decode().strip()
    deadline = time.monotonic() + 30
    while number and time.monotonic() < deadline and xvfb.poll() is None:
        with socket.socket(socket.AF_UNIX) as probe:
            if probe.connect_ex(f"/tmp/.X11-unix/X{number}") == 0:
                return xvfb, f":{number}"
        time.sleep(0.1)
    xvfb.kill()
    xvfb.wait()
    pytest.skip(f"Xvfb did not start (display {number or '?'}): {log.read_text()[-300:]}")


def test_real_viewer_with_docked_widget_segments(tmp_path):
    reason = _display_unavailable()
    if reason:
        pytest.skip(reason)
    xvfb, display = _start_xvfb(tmp_path / "xvfb.log")
    try:
        env = {
            **os.environ,
            "DISPLAY": display,
            "QT_QPA_PLATFORM": "xcb",
            "NAPARI_CONFIG": str(tmp_path / "napari.yaml"),
            "PYTHONWARNINGS": "ignore",
        }
        script = tmp_path / "gui.py"
        script.write_text(GUI_SCRIPT)
        done = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600
        )
        report = done.stdout + done.stderr[-4000:] + (tmp_path / "xvfb.log").read_text()[-1000:]
        assert done.returncode == 0 and "GUI OK" in done.stdout, report
    finally:
        xvfb.terminate()
        xvfb.wait(timeout=30)
