import math
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from biounet.architecture import UNetConfig
from biounet.errors import BiounetError
from biounet.model import BatchDropout2d, UNet


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
    assert isinstance(net.dropout, BatchDropout2d)
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


def _counted_flops(cfg: UNetConfig, h: int, w: int) -> int:
    """Brute force: 2 * multiply-adds of every (up-)convolution, read off a meta forward."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        kh, kw = module.kernel_size
        per_output = module.in_channels * kh * kw
        if isinstance(module, torch.nn.ConvTranspose2d):
            per_output = module.in_channels  # stride 2, kernel 2: one input pixel per output
        total += 2 * per_output * output.numel()

    with torch.device("meta"):
        net = UNet(cfg)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
            m.register_forward_hook(hook)
    net(torch.empty(1, cfg.in_channels, h, w, device="meta"))
    return total


@pytest.mark.parametrize(
    "cfg,h,w",
    [
        (UNetConfig(), 572, 572),
        (UNetConfig(depth=2, base_channels=3, in_channels=2, num_classes=4), 60, 76),
        (UNetConfig(depth=3, base_channels=5, padding="same"), 64, 40),
        (UNetConfig(depth=0, base_channels=4), 9, 12),
    ],
)
def test_forward_flops_match_a_count_over_the_layers(cfg, h, w):
    assert cfg.forward_flops(h, w) == _counted_flops(cfg, h, w)


def test_paper_network_costs_about_301_gflop_per_tile():
    assert UNetConfig().forward_flops(572, 572) == pytest.approx(301e9, rel=0.002)


class _LiveStorage(TorchDispatchMode):
    """Bytes of tensor storage alive at once, at the peak, for what runs under this mode."""

    def __init__(self) -> None:
        super().__init__()
        self.owners: dict[int, set[int]] = {}
        self.nbytes: dict[int, int] = {}
        self.current = self.peak = 0

    def _release(self, key: int, owner: int) -> None:
        self.owners[key].discard(owner)
        if not self.owners[key]:
            del self.owners[key]
            self.current -= self.nbytes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage().data_ptr()  # views share their base's storage
                if key not in self.owners:
                    self.owners[key] = set()
                    self.nbytes[key] = t.untyped_storage().nbytes()
                    self.current += self.nbytes[key]
                    self.peak = max(self.peak, self.current)
                if id(t) not in self.owners[key]:
                    self.owners[key].add(id(t))
                    weakref.finalize(t, self._release, key, id(t))
        return out


@pytest.mark.parametrize(
    "cfg,h,w",
    [
        (UNetConfig(base_channels=8, depth=2), 124, 140),
        (UNetConfig(base_channels=4, depth=4), 380, 364),
        (UNetConfig(base_channels=8, depth=3, padding="same", in_channels=2), 96, 64),
        # smallest tiles: the peak moves into the contracting path
        (UNetConfig(base_channels=4, depth=4), 188, 188),
        (UNetConfig(base_channels=4, depth=4), 284, 188),
    ],
)
def test_peak_activations_equal_the_live_storage_of_a_forward_pass(cfg, h, w):
    net = UNet(cfg).eval()
    x = torch.randn(1, cfg.in_channels, h, w)
    with torch.inference_mode(), _LiveStorage() as live:
        net(x)
    assert live.current == 0  # everything the pass made was freed: the count is complete
    assert cfg.peak_activations(h, w) * 4 == live.peak + x.nbytes


def test_peak_activations_grow_faster_than_the_tile_area():
    cfg = UNetConfig()
    per_pixel = [cfg.peak_activations(n, n) / n**2 for n in (572, 1084, 2060)]
    assert per_pixel == sorted(per_pixel)  # the output share of the tile grows
    with pytest.raises(BiounetError, match="not valid"):
        cfg.peak_activations(573, 572)


def test_dropout_rows_of_a_global_batch():
    """A process holding rows 2:4 of a batch of 4 drops what one process with all 4 drops."""
    drop = BatchDropout2d(0.5).train()
    x = torch.rand(4, 6, 5, 5) + 1
    torch.manual_seed(7)
    whole = drop(x)
    kept = whole != 0
    assert torch.equal(kept, kept[:, :, :1, :1].expand_as(kept))  # whole channels dropped
    assert torch.allclose(whole[kept], 2 * x[kept])  # survivors scaled by 1 / (1 - p)
    drop.rows = (2, 4)
    torch.manual_seed(7)
    assert torch.equal(drop(x[2:4]), whole[2:4])
    assert torch.equal(drop.eval()(x), x)
