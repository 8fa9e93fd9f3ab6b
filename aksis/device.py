"""Where models run: the one place a device is chosen, for the CLI, the app, loading and the trainer.

"auto" (or nothing) means CUDA, else Apple's MPS, else the CPU. A device asked for by name must exist here: asking
for a GPU that PyTorch cannot see is an error that says what to choose instead, never a silent fall back to the CPU.
"""

from __future__ import annotations

import torch

from aksis.config import DEVICES


class DeviceError(ValueError):
    """The device asked for is not available here; the message says what to use instead."""


def pick_device(name: str | torch.device | None = "auto") -> torch.device:
    """The device named (a torch.device, "cpu", "cuda", "cuda:1", "mps"), or the best there is for "auto" or None."""
    if name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise DeviceError(f"unknown device {name!r}: choose one of {', '.join(DEVICES)}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"{name} was asked for, but no CUDA GPU is visible to PyTorch here; use cpu (or auto)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"{name} was asked for, but Apple's MPS backend is not available here; use cpu (or auto)")
    return device


def supports_bf16(device: torch.device) -> bool:
    """Whether `device` runs bfloat16 at full speed: a CUDA GPU that supports it (CPUs emulate much of it)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()
