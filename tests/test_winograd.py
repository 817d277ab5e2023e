"""The nnpack engine: the U-Net's forward with NNPACK's Winograd convolutions against the
network itself, on every architecture option, and its refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import biounet
from biounet import winograd
from biounet.architecture import UNetConfig
from biounet.configs import Tiling
from biounet.errors import BiounetError
from biounet.export import TOLERANCE
from biounet.inference import Engine
from biounet.model import UNet
from biounet.modeldir import ModelInfo, save_model

from .conftest import concurrent_matches_alone

CPU = torch.device("cpu")
needs_nnpack = pytest.mark.skipif(
    not winograd.available(), reason="this PyTorch build has no NNPACK for this CPU"
)


def _net(seed: int = 0, **fields) -> UNet:
    torch.manual_seed(seed)
    net = UNet(UNetConfig(**{"depth": 2, "base_channels": 8, **fields}))
    for m in net.modules():  # batch norm statistics far from the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.3, 3)
            m.weight.data.uniform_(0.5, 2)
            m.bias.data.uniform_(-1, 1)
    return net.eval()


def _close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= TOLERANCE * max(1.0, np.abs(want).max())
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.999


@needs_nnpack
@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"depth": 3},
        {"padding": "same", "depth": 3},
        {"batch_norm": True, "in_channels": 2, "num_classes": 3},
        {"dropout": 0.5, "base_channels": 12},
    ],
)
@pytest.mark.parametrize("shape", [(1, 140, 140), (2, 157, 203)])
def test_equals_the_network(fields, shape):
    """Logits within the export tolerance of the network's (odd, non-square sizes, batches)."""
    net = _net(1, **fields)
    if net.config.padding == "valid" and shape[1] == 140 and net.config.depth == 3:
        shape = (shape[0], 188, 188)  # the depth-3 valid network's smallest sizes are larger
    x = np.random.default_rng(0).random((shape[0], net.config.in_channels, *shape[1:]))
    x = x.astype(np.float32)
    with torch.inference_mode():
        want = net(torch.from_numpy(x)).numpy()
    _close(winograd.winograd_forward(net)(x), want)


@needs_nnpack
@pytest.mark.parametrize("batch_norm", [False, True])
def test_runs_on_the_engines_network_without_a_copy(monkeypatch, batch_norm):
    """Like the torch engine, nnpack runs the network it is given (a copy of the paper's
    network would take 124 MB from the tile's budget): put in eval mode, its values
    unchanged, its weights used where they are unless batch norm is folded, also when a
    torch engine left it in channels-last."""
    net = _net(2, batch_norm=batch_norm).train().to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    made = []
    real = winograd.WinogradUNet
    monkeypatch.setattr(winograd, "WinogradUNet", lambda n: made.append(real(n)) or made[-1])
    forward = winograd.winograd_forward(net)
    assert not net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    fast = made[0]
    shared = fast.inc[0].weight.data_ptr() == net.inc[0].weight.data_ptr()
    assert shared != batch_norm  # channels-last weights came back to the default layout
    assert fast.ups[0][0].matrix.data_ptr() == net.ups[0].upconv.weight.data_ptr()
    assert fast.head.data_ptr() == net.head.weight.data_ptr()
    x = np.random.default_rng(2).random((1, 1, 92, 92), dtype=np.float32)
    with torch.inference_mode():
        _close(forward(x), net(torch.from_numpy(x)).numpy())


@needs_nnpack
def test_an_nnpack_that_computes_something_else_is_refused(monkeypatch):
    real = torch._nnpack_spatial_convolution
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", lambda *a: real(*a) * 1.01)
    with pytest.raises(BiounetError, match="engine nnpack: .* differ from the network's"):
        winograd.winograd_forward(_net(3))


def test_without_nnpack_one_line(monkeypatch):
    monkeypatch.setattr(winograd, "available", lambda: False)
    with pytest.raises(BiounetError, match="engine nnpack needs a PyTorch build with NNPACK") as e:
        winograd.winograd_forward(_net(4))
    assert "\n" not in str(e.value) and str(e.value).endswith("use engine auto or torch")


def test_x86_without_avx2_is_not_probed(monkeypatch):
    """NNPACK prints "unsupported hardware" when probed there: biounet does not probe."""
    probed = []
    monkeypatch.setattr(torch, "_nnpack_available", lambda: probed.append(1) or True)
    monkeypatch.setattr(winograd.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(winograd, "cpu_capability", lambda: "DEFAULT")
    assert not winograd.available() and not probed
    monkeypatch.setattr(winograd, "cpu_capability", lambda: "AVX2")
    assert winograd.available() and probed


@needs_nnpack
def test_nnpack_failures_are_one_line(monkeypatch):
    def fail(*args):
        raise RuntimeError("NNPACK SpatialConvolution_updateOutput failed\nmore")

    forward = winograd.winograd_forward(_net(6))
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", fail)
    with pytest.raises(BiounetError) as e:
        forward(np.zeros((1, 1, 92, 92), np.float32))
    assert str(e.value) == (
        "engine nnpack failed (NNPACK SpatialConvolution_updateOutput failed): use engine torch"
    )


def test_the_budget_leaves_room_for_nnpack(monkeypatch):
    """nnpack's automatic tile is the one whose feature maps fit the budget less what NNPACK
    holds (the widest layer's transformed kernels, and folded weights); an explicit tile
    stays."""
    from dataclasses import replace

    from biounet.tiling import plan_for

    paper = UNetConfig()  # 31 million weights; the widest layer 1024 -> 1024 channels
    held = winograd.overhead_bytes(paper)
    assert held == 4 * 64 * 1024 * 1024  # the weights are the network's own
    folded = UNetConfig(batch_norm=True)  # folding batch norm makes new weights
    assert winograd.overhead_bytes(folded) == held + 4 * folded.parameter_count()
    engine = Engine(_net(7), CPU, "fp32", net=paper)
    tiling = Tiling(memory_mb=1280)
    torch_plan = engine.plan((3072, 3072), tiling)
    engine.runtime = "nnpack"  # the plan is arithmetic: no need to run NNPACK here
    nnpack_plan = engine.plan((3072, 3072), tiling)
    want = plan_for(paper, (3072, 3072), replace(tiling, memory_mb=1280 - held / 2**20), "fp32")
    assert nnpack_plan == want and nnpack_plan.y.tile_in < torch_plan.y.tile_in
    default = Tiling()  # 1024 MB: the 256 MB held fits beside the torch engine's 700 px tile
    engine.runtime = "torch"
    torch_700 = engine.plan((3072, 3072), default)
    engine.runtime = "nnpack"
    assert engine.plan((3072, 3072), default) == torch_700 and torch_700.y.tile_in == 700
    fixed = replace(tiling, tile=388)
    assert engine.plan((3072, 3072), fixed) == plan_for(paper, (3072, 3072), fixed, "fp32")


@needs_nnpack
@pytest.mark.runtimes  # sees the engines installed
def test_tiles_concurrent_calls_and_the_file_say_nnpack(tmp_path):
    """Tiled prediction equals the whole image within the tolerance; concurrent predictions
    equal each one alone, bit for bit; the model says what runs it."""
    net = _net(5)
    image = np.random.default_rng(1).random((1, 301, 277), dtype=np.float32)
    engine = Engine(net, CPU, "fp32", engine="nnpack")
    whole = engine.logits(image)
    _close(engine.logits(image, Tiling(tile=60))[None], whole[None])
    save_model(tmp_path / "m", net, ModelInfo(net.config, ("background", "cell")))
    model = biounet.load(tmp_path / "m", engine="nnpack")
    assert (model.engine, model.precision) == ("nnpack", "fp32")
    assert concurrent_matches_alone(model)


def test_a_forked_process_gets_a_worker_of_its_own(monkeypatch):
    """A child forked after the parent's worker thread started has no such thread: it must
    not queue its forward passes on the parent's executor (they would never run)."""
    parent = winograd._worker()
    assert winograd._worker() is parent and parent.submit(lambda: 7).result() == 7
    monkeypatch.setattr(winograd.os, "getpid", lambda: -1)
    child = winograd._worker()
    assert child is not parent and child.submit(lambda: 8).result() == 8
    child.shutdown()
    monkeypatch.undo()
    winograd._WORKER.pop(-1)
    assert winograd._worker() is parent
