import pytest
import torch

from biounet.errors import BiounetError
from biounet.precision import parse_device, resolve_precision


def test_parse_device_names():
    assert parse_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert parse_device("auto").type == expected
    with pytest.raises(BiounetError, match="device must be one of"):
        parse_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch sees no GPU")
def test_parse_device_cuda_without_a_gpu_is_a_clean_error():
    with pytest.raises(BiounetError, match="--device cuda: torch sees no CUDA device"):
        parse_device("cuda")


def test_resolve_precision_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("auto", cpu) in ("bf16", "fp32")
    with pytest.raises(BiounetError, match="fp16 is for CUDA"):
        resolve_precision("fp16", cpu)
