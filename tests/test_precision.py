import pytest
import torch

from biounet import precision
from biounet.errors import BiounetError
from biounet.precision import parse_device, resolve_precision


@pytest.mark.parametrize("has_gpu, expected", [(True, "cuda"), (False, "cpu")])
def test_parse_device_auto_follows_what_torch_sees(monkeypatch, has_gpu, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_gpu)
    assert parse_device("auto") == torch.device(expected)
    assert parse_device("cpu") == torch.device("cpu")


def test_parse_device_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert parse_device("cuda") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BiounetError, match="--device cuda: torch sees no CUDA device"):
        parse_device("cuda")


def test_parse_device_rejects_unknown_names():
    with pytest.raises(BiounetError, match="device must be one of"):
        parse_device("tpu")


@pytest.mark.parametrize("fast_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_resolve_precision_auto_on_cpu(monkeypatch, fast_bf16, expected):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast_bf16)
    assert resolve_precision("auto", torch.device("cpu")) == expected


def test_resolve_precision_explicit_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(BiounetError, match="fp16 is for CUDA"):
        resolve_precision("fp16", cpu)


def test_slow_bf16_is_warned_about_once(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    precision._warn_slow_bf16.cache_clear()
    for _ in range(2):
        assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    said = [r.getMessage() for r in caplog.records if "emulated" in r.getMessage()]
    assert said == [
        "bf16 on this CPU (no AVX512-BF16 or AMX) is emulated and runs several times slower "
        "than fp32: use precision auto or fp32"
    ]
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    precision._warn_slow_bf16.cache_clear()
    caplog.clear()
    resolve_precision("bf16", torch.device("cpu"))
    assert not caplog.records


@pytest.mark.parametrize("capability", ["AVX2", "AVX512", "DEFAULT"])
def test_validation_keeps_the_training_layout_prediction_takes_the_fast_one(
    monkeypatch, capability
):
    """fp32 predicts channels-last on AVX2 CPUs (faster there) but trains in the default
    layout, and validating a network in training leaves its layout alone."""
    import numpy as np

    from biounet.architecture import UNetConfig
    from biounet.inference import Engine
    from biounet.model import UNet

    monkeypatch.setattr(precision, "cpu_capability", lambda: capability)
    cpu = torch.device("cpu")
    predicted = torch.channels_last if capability == "AVX2" else torch.contiguous_format
    assert precision.inference_format("fp32", cpu) == predicted
    assert precision.inference_format("bf16", cpu) == torch.channels_last
    assert precision.memory_format("fp32") == torch.contiguous_format

    def layout(net):
        w = net.inc[2].weight  # (8, 8, 3, 3): with one channel both layouts coincide
        return torch.channels_last if w.is_contiguous(memory_format=torch.channels_last) and \
            not w.is_contiguous() else torch.contiguous_format  # fmt: skip

    torch.manual_seed(0)
    net = UNet(UNetConfig(depth=2, base_channels=8))
    image = np.random.default_rng(0).random((1, 100, 100), dtype=np.float32)
    validated = Engine(net, cpu, "fp32", training=True).logits(image)
    assert layout(net) == torch.contiguous_format
    predicted_logits = Engine(net, cpu, "fp32").logits(image)
    assert layout(net) == predicted
    assert np.abs(predicted_logits - validated).max() <= 1e-4 * np.abs(validated).max()
