"""Per-device speed choices that do not change results: the memory format a model trains fastest in.

    fmt = memory_format(model, (1, 28, 28), torch.device("cpu"))   # torch.channels_last or torch.contiguous_format
    model = model.to(device, memory_format=fmt)

oneDNN's NCHW input gradient of a convolution is slow for thin layers (LeNet-5 on CPU runs an attack
2.2x faster in channels_last, bench/); on other models and devices NCHW wins. So the choice is measured,
not guessed: once per process and (model class, input shape, device), a few forward + input-gradient +
backward passes in each format on a throwaway copy of the model, and channels_last only when it is
clearly faster. The two formats compute the same function (float rounding aside). NSLAB_MEMORY_FORMAT=
contiguous|channels_last skips the probe.
"""

from __future__ import annotations

import copy
import logging
import os
import time

import torch
from torch import nn

log = logging.getLogger(__name__)
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
_chosen: dict[tuple, torch.memory_format] = {}


def memory_format(model: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> torch.memory_format:
    """The faster memory format for training `model` on `device` (probed once per process and key)."""
    forced = os.environ.get("NSLAB_MEMORY_FORMAT")
    if forced:
        if forced not in FORMATS:
            raise ValueError(f"NSLAB_MEMORY_FORMAT={forced!r}; choose one of: {', '.join(FORMATS)}")
        return FORMATS[forced]
    if len(input_shape) != 3 or not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return torch.contiguous_format
    key = (type(model).__module__, type(model).__qualname__, tuple(input_shape), device.type)
    if key not in _chosen:
        _chosen[key] = _probe(model, input_shape, device)
        log.info("memory format for %s on %s: %s", key[1], device.type, _chosen[key])
    return _chosen[key]


def _probe(model: nn.Module, input_shape: tuple[int, ...], device: torch.device, batch: int = 64,
           repeats: int = 5) -> torch.memory_format:
    generator = torch.Generator().manual_seed(0)  # never the global RNG: probing must not change results
    x = torch.rand(batch, *input_shape, generator=generator).to(device)
    seconds = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        probe = copy.deepcopy(model).to(device, memory_format=fmt).train()
        xf = x.contiguous(memory_format=fmt)
        times = []
        for _ in range(repeats + 1):  # the first pass warms up
            start = time.perf_counter()
            inputs = xf.clone().requires_grad_(True)
            out = probe(inputs)
            torch.autograd.grad(out.sum(), inputs, retain_graph=True)  # an attack step's pass
            out.sum().backward()  # a training step's pass
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        seconds[fmt] = sorted(times[1:])[len(times[1:]) // 2]  # the median: one lucky pass decides nothing
    faster = seconds[torch.channels_last] < 0.9 * seconds[torch.contiguous_format]
    return torch.channels_last if faster else torch.contiguous_format
