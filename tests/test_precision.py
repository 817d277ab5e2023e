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
