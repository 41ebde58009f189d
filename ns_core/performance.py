"""Per-device speed choices, made by a fixed rule so that they never change results: the memory format a model
trains in.

    fmt = memory_format(model, (1, 28, 28), torch.device("cpu"))   # torch.channels_last or torch.contiguous_format
    model = model.to(device, memory_format=fmt)

oneDNN's NCHW input gradient of a convolution is slow for thin layers: LeNet-5 on CPU runs an attack 2.2x faster
in channels_last (bench/), and channels_last cost at most a few percent on the other CPU models measured (a CIFAR
ResNet-18: 0.92-1.02x). The two formats compute the same function but round differently, so the choice must not
depend on timing: a probe that timed both formats picked one per process, a busy machine could flip it, and the
same trial then gave another validation accuracy in the third digit. The rule: channels_last for a convolutional
model on image inputs on the CPU, NCHW (PyTorch's default) elsewhere. NSLAB_MEMORY_FORMAT=contiguous|channels_last
overrides it (recorded with the run's environment by whoever sets it).
"""

from __future__ import annotations

import os

import torch
from torch import nn

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def memory_format(model: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> torch.memory_format:
    """The memory format for training `model` on `device`: a function of the model's layers, the input's rank and
    the device type only (never of timing, so every process and every rerun picks the same one)."""
    forced = os.environ.get("NSLAB_MEMORY_FORMAT")
    if forced:
        if forced not in FORMATS:
            raise ValueError(f"NSLAB_MEMORY_FORMAT={forced!r}; choose one of: {', '.join(FORMATS)}")
        return FORMATS[forced]
    convolutional = any(isinstance(m, nn.Conv2d) for m in model.modules())
    if device.type == "cpu" and len(input_shape) == 3 and convolutional:
        return torch.channels_last
    return torch.contiguous_format
