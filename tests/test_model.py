import math

import pytest
import torch

from biounet.errors import BiounetError
from biounet.model import UNet, UNetConfig


def test_paper_configuration_has_23_convs_31m_parameters_and_maps_572_to_388():
    net = UNet(UNetConfig())
    assert net.num_conv_layers() == 23
    assert net.num_parameters() == 31_030_658  # ~31.0 M, as the paper's Caffe model
    with torch.device("meta"):
        out = UNet(UNetConfig())(torch.empty(1, 1, 572, 572))
    assert tuple(out.shape) == (1, 2, 388, 388)


def test_size_arithmetic_of_the_paper_network():
    cfg = UNetConfig()
    assert cfg.margin == 92
    assert cfg.output_size(572) == 388
    assert cfg.input_size(388) == 572
    assert cfg.min_output_size() == 4
    assert cfg.snap_output(400, up=False) == 388
    assert cfg.snap_output(400, up=True) == 404
    with pytest.raises(BiounetError, match="input size 570 is not valid.*use 556 or 572"):
        cfg.output_size(570)
    with pytest.raises(BiounetError, match="output size 390 is not valid"):
        cfg.input_size(390)
    with pytest.raises(BiounetError, match="input size 100"):
        cfg.output_size(100)  # smaller than the smallest valid input (188)


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_size_arithmetic_matches_a_real_forward_pass(depth, padding):
    cfg = UNetConfig(depth=depth, base_channels=2, in_channels=3, num_classes=4, padding=padding)
    net = UNet(cfg).eval()
    valid_inputs = [n for n in range(1, 120) if cfg._output(n)]
    assert valid_inputs, "some input size must be valid"
    for n in valid_inputs[:3] + valid_inputs[-1:]:
        with torch.no_grad():
            out = net(torch.zeros(1, 3, n, n + cfg.size_step))
        assert out.shape == (1, 4, cfg.output_size(n), cfg.output_size(n + cfg.size_step))
    # Sizes next to a valid one (where they are invalid) must be refused, not mis-computed.
    for n in range(1, 120):
        if cfg._output(n) is None:
            with pytest.raises(BiounetError):
                cfg.output_size(n)


def test_same_padding_keeps_the_size():
    cfg = UNetConfig(depth=3, base_channels=4, padding="same")
    assert cfg.margin == 0
    with torch.no_grad():
        out = UNet(cfg)(torch.zeros(2, 1, 48, 64))
    assert out.shape == (2, 2, 48, 64)
    with pytest.raises(BiounetError, match="use 40 or 48"):
        cfg.output_size(44)


def test_he_initialisation_std():
    torch.manual_seed(0)
    net = UNet(UNetConfig(depth=2, base_channels=32))
    conv = net.downs[1][1][0]  # second level's first 3x3 conv: 64 -> 128 channels
    fan_in = 64 * 9
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.05)
    assert torch.all(conv.bias == 0)


def test_options_batch_norm_and_dropout():
    net = UNet(UNetConfig(depth=2, base_channels=4, batch_norm=True, dropout=0.5))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert isinstance(net.dropout, torch.nn.Dropout2d)
    with torch.no_grad():
        assert net.eval()(torch.zeros(1, 1, 44, 44)).shape == (1, 2, 4, 4)


@pytest.mark.parametrize(
    "bad",
    [
        dict(padding="full"),
        dict(depth=-1),
        dict(num_classes=1),
        dict(base_channels=0),
        dict(dropout=1.0),
    ],
)
def test_bad_configurations_are_refused(bad):
    with pytest.raises(BiounetError):
        UNetConfig(**bad)
