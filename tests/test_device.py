"""aksis.device: the one device picker."""

import pytest
import torch

from aksis.device import DeviceError, pick_device, supports_bf16


def test_auto_picks_the_best_there_is() -> None:
    best = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert pick_device().type == pick_device(None).type == pick_device("auto").type == best
    assert pick_device("cpu") == pick_device(torch.device("cpu")) == torch.device("cpu")
    assert not supports_bf16(torch.device("cpu"))  # a CPU emulates much of bf16: not chosen for it


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_a_gpu_that_is_not_there_is_an_error_not_the_cpu() -> None:
    with pytest.raises(DeviceError, match="cuda was asked for, but no CUDA GPU is visible to PyTorch here; use cpu"):
        pick_device("cuda")
    with pytest.raises(DeviceError, match="cuda:1 was asked for"):
        pick_device("cuda:1")


def test_an_unknown_device_names_the_choices() -> None:
    with pytest.raises(DeviceError, match="unknown device 'gpu': choose one of auto, cpu, cuda, mps"):
        pick_device("gpu")
    assert issubclass(DeviceError, ValueError)  # what the app turns into a message
