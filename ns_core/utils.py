"""Small shared helpers: device choice, seeding, model-mode and BatchNorm-statistics scoping."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


def pick_device(requested: str = "auto") -> torch.device:
    """`auto` -> CUDA when one is visible, else CPU; any other string is passed to torch.device."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} was asked for but no CUDA GPU is visible; use 'auto' or 'cpu'")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch for a run. Entry points call this, never library functions."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A torch.Generator on `device` seeded with `seed`, or None (use the global RNG) when seed is None."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return generator


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put `model` in eval mode for the block and restore each module's own mode afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Turn off requires_grad on all parameters for the block, so that input-gradient work
    (attacks) neither allocates nor leaks parameter gradients; restores the flags afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def bn_stats_frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Run forwards that must not move BatchNorm's running statistics: in train mode they still normalize with
    the batch's own statistics, but read and write no running buffer (track_running_stats is off for the
    block, which hands BatchNorm no buffers at all; restoring them in place afterwards would break the
    backward pass of the forwards that saved them)."""
    modules = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for module in modules:
        module.track_running_stats = False
    try:
        yield model
    finally:
        for module in modules:
            module.track_running_stats = True


def cache_dir() -> Path:
    """Where nslab keeps what it can recompute: $NSLAB_CACHE, default ~/.cache/nslab."""
    return Path(os.environ.get("NSLAB_CACHE") or Path.home() / ".cache" / "nslab")


def save_npz_quietly(path: Path, **arrays: np.ndarray) -> None:
    """Write a cache file atomically; a cache that cannot be written is only slower, never an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as tmp:
            np.savez(tmp, **arrays)
        os.replace(tmp.name, path)
    except OSError as err:
        log.debug("not caching %s: %s", path, err)
