"""`biounet export`: ONNX and TorchScript equal the network; bioimage.io packages pass
`bioimageio test` offline (the shipped models with all three weight formats) and reproduce
`Model.predict`; bad requests are refused in one line with nothing written."""

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import biounet
from biounet.architecture import UNetConfig
from biounet.cli import main
from biounet.model import UNet

pytest.importorskip("onnxruntime", reason="the export extra is not installed")
pytest.importorskip("bioimageio.core", reason="the export extra is not installed")

from biounet.export import (  # noqa: E402
    check_exported,
    onnx_runner,
    to_onnx,
    to_torchscript,
    torchscript_runner,  # noqa: E402
)

from .conftest import SHARED_DATA  # noqa: E402

MODELS = Path(__file__).resolve().parents[1] / "models"
PAPER_SIZES = [188, 284, 572]  # valid inputs of the depth-4 network (outputs 4, 100, 388)


def _paper_net(**fields) -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(depth=4, base_channels=8, **fields)).eval()


@pytest.fixture(scope="module")
def paper_net():
    return _paper_net()


def test_torchscript_equals_network_at_three_sizes(paper_net, tmp_path):
    path = to_torchscript(paper_net, tmp_path / "net.pt")
    worst = check_exported(paper_net, torchscript_runner(path), "TorchScript", PAPER_SIZES)
    assert worst <= 1e-4
    # a 188 x 572 input: height and width vary independently
    x = torch.rand(1, 1, 188, 572)
    got = torchscript_runner(path)(x.numpy())
    assert got.shape == (1, 2, 4, 388)


def test_onnx_has_dynamic_height_and_width_and_equals_network(paper_net, tmp_path):
    import onnx

    path = tmp_path / "net.onnx"
    opset = to_onnx(paper_net, path)
    assert opset >= 17
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param != "" for d in dims] == [True, False, True, True]  # N, C fixed, H, W
    run = onnx_runner(path)
    assert check_exported(paper_net, run, "ONNX", PAPER_SIZES) <= 1e-4
    with torch.inference_mode():
        want = paper_net(torch.ones(1, 1, 572, 572)).numpy()
    got = run(np.ones((1, 1, 572, 572), np.float32))
    assert got.shape == (1, 2, 388, 388) and np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize(
    "fields", [{"dropout": 0.5}, {"batch_norm": True, "in_channels": 3, "num_classes": 3}]
)
def test_dropout_and_batch_norm_networks_export(fields, tmp_path):
    torch.manual_seed(1)
    net = UNet(UNetConfig(depth=2, base_channels=4, **fields)).eval()
    for write, runner in ((to_torchscript, torchscript_runner), (to_onnx, onnx_runner)):
        path = tmp_path / f"net.{write.__name__}"
        write(net, path)
        assert check_exported(net, runner(path), write.__name__, [44, 60]) <= 1e-4


def test_check_exported_catches_a_different_network(paper_net):
    other = _paper_net()
    with torch.no_grad():
        other.head.bias += 0.01  # a tiny change in every output pixel
    with pytest.raises(biounet.BiounetError, match="differs from the network"):
        check_exported(paper_net, lambda x: other(torch.from_numpy(x)).detach().numpy(), "X")


def test_architecture_source_stands_alone_and_state_dict_loads_weights_only(paper_net, tmp_path):
    """The package's architecture file is biounet/model.py: it must import only torch and
    the standard library at module level, and rebuild the net from its config fields."""
    source = Path(biounet.model.__file__)
    tree = ast.parse(source.read_text())
    imported = set()
    for node in tree.body:  # module level; `if TYPE_CHECKING:` blocks are not run
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "math", "types", "typing", "torch"}, imported
    spec = importlib.util.spec_from_file_location("standalone_unet", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.save(paper_net.state_dict(), tmp_path / "weights.pt")
    rebuilt = module.from_fields(**paper_net.config.to_dict())
    rebuilt.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    x = torch.rand(1, 1, 188, 188)
    with torch.inference_mode():
        assert torch.equal(rebuilt.eval()(x), paper_net(x))


# -- bioimage.io packages -------------------------------------------------------------------


def bioimageio_test(package: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """`bioimageio test PACKAGE`, offline: every proxy points at a closed port, the cache is
    empty, so any download would fail the test."""
    dead = "http://127.0.0.1:9"
    env = {
        **os.environ,
        "HTTP_PROXY": dead,
        "HTTPS_PROXY": dead,
        "http_proxy": dead,
        "https_proxy": dead,
        "NO_PROXY": "",
        "no_proxy": "",
        "BIOIMAGEIO_CACHE_PATH": str(tmp_path / "bioimageio-cache"),
    }
    cli = Path(sys.executable).with_name("bioimageio")
    return subprocess.run(
        [str(cli), "test", str(package)], capture_output=True, text=True, env=env, timeout=600
    )


def _passed(
    done: subprocess.CompletedProcess, formats=("onnx", "pytorch_state_dict", "torchscript")
) -> None:
    report = done.stdout + done.stderr
    assert done.returncode == 0, report[-4000:]
    assert "❌" not in report, report[-4000:]
    for fmt in formats:  # each weight format reproduced the test output
        assert re.search(rf"✔️\s+weights\.{fmt}\s+Reproduce test outputs", report), fmt


@pytest.mark.parametrize("name", ["bbbc039", "isbi2012"])
def test_shipped_model_package_passes_bioimageio_test(name, tmp_path):
    if not (MODELS / name / "config.json").is_file():
        pytest.skip(f"models/{name} is not in this checkout")
    if not (SHARED_DATA / name / "images").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (../shared/data beside the checkout)")
    package = tmp_path / f"{name}.zip"
    # The acceptance command as a user types it in the checkout: the sample image (the
    # model's first training image) is found in ../shared/data without being named.
    env = {k: v for k, v in os.environ.items() if k != "BIOUNET_DATA"}
    command = ["export", f"models/{name}", "--format", "bioimageio", "--out", str(package)]
    done = subprocess.run(
        [sys.executable, "-m", "biounet", *command],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=MODELS.parent,
    )
    assert done.returncode == 0, done.stderr
    names = set(zipfile.ZipFile(package).namelist())
    assert {
        "rdf.yaml",
        "weights.pt",
        "weights_torchscript.pt",
        "weights.onnx",
        "unet.py",
        "test_input.npy",
        "test_output.npy",
        "cover.png",
        "README.md",
    } <= names
    _passed(bioimageio_test(package, tmp_path))
    config = json.loads((MODELS / name / "config.json").read_text())
    readme = zipfile.ZipFile(package).read("README.md").decode()
    # what `biounet predict` adds from the stored post-processing is named, not silently lost
    post = config.get("postprocess") or {}
    assert ("## Outside this package" in readme) == any(post.get(k) for k in post)
    assert ("8 flips" in readme) == bool(post.get("tta"))
    first = config["training"]["train_files"][0]
    _package_reproduces_predict(package, MODELS / name, SHARED_DATA / name / "images" / first)


def test_package_documentation_names_what_predict_adds():
    from biounet.bioimageio_package import _with_postprocessing

    plain = SimpleNamespace(postprocess=None)
    assert _with_postprocessing("# m\n", plain) == "# m\n"
    stored = {"tta": True, "membranes": {"seed_threshold": 0.1}}
    docs = _with_postprocessing("# m\n", SimpleNamespace(postprocess=stored))
    assert docs.startswith("# m\n\n## Outside this package\n")
    assert "8 flips" in docs and '`{"seed_threshold": 0.1}`' in docs and "instances" not in docs
    off = _with_postprocessing("# m\n", SimpleNamespace(postprocess={"tta": False}))
    assert off == "# m\n"  # TTA stored as off adds nothing


def _package_reproduces_predict(package: Path, model_dir: Path, sample: Path) -> None:
    """The package's test output is what `Model.predict` gives for its test input, without
    the model's stored TTA (the package holds the network alone).

    A depth-d valid U-Net is shift-equivariant in steps of 2**d only, and `Model.predict`
    anchors its tiles 92 px before the image it is given, the package's network at its test
    input's first pixel: handed the sample from 4 px before the test input (4 + 92 = 96, a
    multiple of 16), `predict` computes each pixel in the package's pooling phase. What is
    left is the 4 extra rows and columns in the normalisation percentiles.
    """
    from biounet.io import read_image

    with zipfile.ZipFile(package) as z:
        test_in = np.load(z.open("test_input.npy"))
        test_out = np.load(z.open("test_output.npy"))
    model = biounet.load(model_dir, device="cpu", precision="fp32")
    image = read_image(sample, model.in_channels)[0]
    side, m = test_in.shape[-1], model.margin
    top, left = ((n - side) // 2 for n in image.shape)
    assert np.array_equal(image[top : top + side, left : left + side], test_in[0, 0])
    image = np.pad(image, 4, mode="reflect")  # room for the 4 px before a crop at the edge
    crop = image[top : top + side + 4, left : left + side + 4]
    probs = model.predict(crop, output="prob", tta=False)
    probs = probs[:, 4 + m : 4 + side - m, 4 + m : 4 + side - m]
    assert test_out.shape == (1, len(model.classes), side - 2 * m, side - 2 * m)
    assert np.abs(probs - test_out[0]).max() < 5e-3
    assert (probs.argmax(0) == test_out[0].argmax(0)).mean() > 0.9999


def _small_model(tmp_path: Path, *flags: str) -> Path:
    folder = tmp_path / "small"
    assert main(["-q", "init", str(folder), "--depth", "2", "--base-channels", "4", *flags]) == 0
    return folder


def test_padded_model_package_with_halo_passes_bioimageio_test(tmp_path):
    """The padded variant: output as large as the input, with a halo; the integer range as
    the normalisation (bioimage.io's scale_linear by 1 / 65535 for a uint16 sample)."""
    folder = _small_model(tmp_path, "--padding", "same", "--normalize", "dtype")
    rng = np.random.default_rng(0)
    package = tmp_path / "padded.zip"
    biounet.load(folder).export(package, sample=rng.integers(0, 4000, (70, 90), np.uint16))
    text = zipfile.ZipFile(package).read("rdf.yaml").decode()
    assert "halo: 22" in text and "min: 48" in text  # depth 2: radius 20 + 2; 48 > 2 * 22
    assert "scale_range" not in text and "gain: 1.5259" in text  # 1 / 65535
    _passed(bioimageio_test(package, tmp_path))


def test_bioimageio_test_fails_a_package_that_does_not_reproduce(tmp_path, monkeypatch):
    """The check can fail: a package whose test output is off by 0.01 in one pixel fails
    exactly its reproduction, with every weight format."""
    import biounet.bioimageio_package as bp

    real = bp.test_tensors

    def off(*args):
        test_in, test_out = real(*args)
        test_out[0, 0, 0, 0] += 0.01
        return test_in, test_out

    monkeypatch.setattr(bp, "test_tensors", off)
    folder = _small_model(tmp_path)
    package = tmp_path / "off.zip"
    sample = np.random.default_rng(1).random((60, 60))
    biounet.load(folder).export(package, sample=sample, name="em")
    assert "name: biounet em" in zipfile.ZipFile(package).read("rdf.yaml").decode()
    done = bioimageio_test(package, tmp_path)
    report = done.stdout + done.stderr
    assert done.returncode != 0
    for fmt in ("onnx", "pytorch_state_dict", "torchscript"):
        assert re.search(rf"❌\s+weights\.{fmt}\s+Reproduce test outputs", report), report


# -- bad requests ---------------------------------------------------------------------------


def _refused(capsys, argv, match: str, *leftovers: Path) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("biounet: error:") and len(err.splitlines()) == 1, err
    assert match in err, err
    for path in leftovers:
        assert not path.exists(), path


def test_bad_export_requests_are_refused_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("BIOUNET_DATA", raising=False)
    folder = _small_model(tmp_path)
    out = tmp_path / "pkg.zip"
    _refused(capsys, ["export", str(folder), "--out", str(tmp_path / "pkg.onnx")], ".zip file")
    _refused(capsys, ["export", str(folder), "--out", str(out)], "--sample IMAGE", out)
    tiny = tmp_path / "tiny.tif"
    import tifffile

    tifffile.imwrite(tiny, np.zeros((20, 20), np.uint8))
    _refused(
        capsys,
        ["export", str(folder), "--out", str(out), "--sample", str(tiny)],
        "smaller than the network's smallest input",
        out,
    )
    (tmp_path / "dir.onnx").mkdir()
    _refused(
        capsys,
        ["export", str(folder), "--format", "onnx", "--out", str(tmp_path / "dir.onnx")],
        "is a folder",
    )
    _refused(
        capsys,
        [
            "export",
            str(tmp_path / "nowhere"),
            "--format",
            "onnx",
            "--out",
            str(tmp_path / "x.onnx"),
        ],
        "nowhere",
        tmp_path / "x.onnx",
    )
    model_file = str(folder / "config.json")
    _refused(
        capsys,
        ["export", str(folder), "--format", "onnx", "--out", model_file],
        "is a file of the model itself",
    )
    _refused(
        capsys,
        ["export", str(folder), "--format", "onnx", "--out", str(tiny / "x.onnx")],
        "is a file, not a folder",
    )
    _refused(
        capsys,
        [
            "export",
            str(folder),
            "--format",
            "onnx",
            "--sample",
            str(tiny),
            "--out",
            str(tmp_path / "x.onnx"),
        ],
        "--sample and --name",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.onnx", "small", "tiny.tif"]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "weights.safetensors"]


@pytest.mark.parametrize(
    ("missing", "fmt"), [("onnxruntime", "onnx"), ("bioimageio", "bioimageio")]
)
def test_missing_export_extra_is_named(missing, fmt, tmp_path, capsys, monkeypatch):
    """As on an install without the extra: the module, or a dotted name's parent, is absent."""
    folder = _small_model(tmp_path)
    real = importlib.util.find_spec

    def find_spec(name, *args):
        if name.split(".")[0] == missing:
            if "." in name:
                raise ModuleNotFoundError(name)
            return None
        return real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    sample = tmp_path / "s.tif"
    import tifffile

    tifffile.imwrite(sample, np.zeros((64, 64), np.uint8))
    extra = ["--sample", str(sample)] if fmt == "bioimageio" else []
    out = tmp_path / "x.zip"
    _refused(
        capsys,
        ["export", str(folder), "--format", fmt, "--out", str(out), *extra],
        "pip install 'biounet[export]'",
        out,
    )
