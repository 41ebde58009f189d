"""nslab checkpoints: state_dicts plus JSON-able metadata, written atomically, read with clear one-line errors.

    save_checkpoint(trainer.state_dict(), "runs/quick/checkpoint.pt")   # keeps the previous one as .prev.pt
    state = load_checkpoint("runs/quick/checkpoint.pt")                 # CheckpointError names the fix
    model, metadata = load_model("runs/quick/checkpoint.pt")            # the network, rebuilt from the file alone

Files are read with `torch.load(weights_only=True)`: a checkpoint never runs code. A file that is not a
checkpoint, is cut short, is corrupt, comes from a newer nslab, or holds a model that does not fit its own
metadata is a `CheckpointError` (a ValueError) in one line that says what to do; never a traceback, and
never advice to load unsafely. A write goes to a temporary file first and replaces the target in one
rename, and the file it replaces is kept as `<name>.prev.pt`, so a crash mid-write loses nothing and a
file damaged later still has a good predecessor (`load_checkpoint(..., fallback=True)`).
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ns_core.adapters import Adaptation, first_conv
from ns_core.cas import install_cas
from ns_core.models import create_model
from ns_core.utils import pick_device

log = logging.getLogger(__name__)
FORMAT = "nslab-checkpoint"
VERSION = 3  # bump when the layout changes; a newer file is refused with an upgrade hint
# 3: an adapted classifier is the user's own module (no `net.` wrapper) and its Adaptation is in the metadata


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; str() is one line that names the file and the fix."""


def previous_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write `state` (tagged with the format and version) to `path` atomically, keeping the old file as .prev."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"format": FORMAT, "version": VERSION, **state}, tmp)
    if path.exists():
        os.replace(path, previous_path(path))
    os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half of one
    return path


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu", fallback: bool = False) -> dict[str, Any]:
    """The state saved at `path`, tensors on `device`. With `fallback`, a damaged file gives way to the
    previous good one (<name>.prev.pt) with a warning; otherwise any problem is a one-line CheckpointError."""
    try:
        return _load(Path(path), device)
    except CheckpointError as err:
        previous = previous_path(path)
        if not fallback or not previous.is_file():
            raise
        log.warning("%s; using the previous checkpoint %s", err, previous)
        return _load(previous, device)


def _load(path: Path, device: torch.device | str) -> dict[str, Any]:
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; pass the .pt file inside it "
                              "(e.g. runs/<name>/checkpoint.pt)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the .pt file a training run saved "
                              "(runs/<name>/checkpoint.pt, or a study trial's)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (a write that never finished); re-run the training")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile, IndexError, KeyError,
            ValueError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint {path} cannot be read: {_reason(path, err)}; re-run the training "
                              "or point at another checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a PyTorch file but not an nslab checkpoint (no nslab header); pass a "
                              "file that pipelines.train, a study trial or analyze methods saved")
    version = state.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointError(f"checkpoint {path} was written by a newer nslab (format version {version}, this "
                              f"one reads up to {VERSION}); upgrade nslab to read it")
    for key in ("model", "metadata"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} has no {key!r} entry; it is damaged, re-run the training")
    return state


def _reason(path: Path, err: BaseException) -> str:
    """Why torch could not read the file, in words (torch's own messages run to pages)."""
    with path.open("rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":
        return "it is not a PyTorch checkpoint (not a zip archive)"
    if not zipfile.is_zipfile(path):  # a zip without its closing directory: the end of the file is missing
        return "the file is truncated (a write cut short?)"
    return f"the file is corrupt ({type(err).__name__})"


def checkpoint_summary(state: dict[str, Any]) -> str:
    """One line describing a loaded checkpoint (for --dry-run)."""
    meta = state["metadata"]
    return (f"nslab checkpoint v{state['version']}: {meta.get('model')} ({meta.get('method')}) on "
            f"{meta.get('dataset')}, input {tuple(meta.get('input_shape', ()))}, {meta.get('num_classes')} classes, "
            f"{state.get('epoch', '?')} epoch(s)")


def load_model(path: str | Path, device: str = "auto", fallback: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved in a checkpoint; returns (model in eval mode on `device`, metadata). A plain
    classifier is fitted exactly as it was for training: its recorded Adaptation is replayed (a file from before
    the record, format 2, gets nslab's decisions, which were the only ones then)."""
    target = pick_device(device)
    state = load_checkpoint(path, target, fallback=fallback)
    meta = state["metadata"]
    try:
        recorded = meta.get("adaptation")
        model = create_model(meta["model"], input_shape=tuple(meta["input_shape"]), num_classes=meta["num_classes"],
                             adaptation=Adaptation.from_dict(recorded) if recorded else None)
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path}: its metadata lacks {err}; it is damaged, re-run the "
                              "training") from None
    _reinstall_cas(model, meta)
    state["model"] = _own_keys(state["model"], model)
    missing, unexpected = _state_mismatch(model, state["model"])
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path}: its weights do not fit a {meta['model']} for input "
                              f"{tuple(meta['input_shape'])} (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                              "was it saved by another version of the model code?")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise CheckpointError(f"checkpoint {path}: its weights do not fit a {meta['model']} ({first})") from None
    return model.to(target).eval(), meta


def _reinstall_cas(model: nn.Module, meta: dict[str, Any]) -> None:
    """CAS changes the forward (ns_core/cas.py): its heads and hooks go back on, on the layers the metadata
    names (`Objective.prepare_model` recorded them), before the weights load."""
    if meta.get("cas"):
        install_cas(model, meta["num_classes"], meta["cas"]["layers"])


def load_weights(model: nn.Module, path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Load a plain state_dict file that nslab did not write (`torch.save(model.state_dict(), path)`, read with
    weights_only=True) into `model`; a {"state_dict": ...} / {"model": ...} wrapper and DataParallel's `module.`
    prefixes are taken off. Keys are the model's own (nslab adapts a classifier in place). Anything that does not
    fit is a one-line CheckpointError naming the first mismatch and, for a first convolution of another shape,
    how to build the model as it was trained."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"state_dict {path} {'is a directory' if path.is_dir() else 'does not exist'}; pass "
                              "the file torch.save(model.state_dict(), ...) wrote")
    try:
        weights = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile, IndexError, KeyError,
            ValueError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"state_dict {path} cannot be read: {_reason(path, err)}") from None
    if isinstance(weights, dict) and weights.get("format") == FORMAT:
        weights = weights["model"]  # an nslab checkpoint is fine too
    while isinstance(weights, dict) and len(weights) <= 3 and any(k in weights for k in ("state_dict", "model")):
        weights = weights.get("state_dict", weights.get("model"))
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{path} does not hold a state_dict (a mapping of parameter names to tensors)")
    weights = _own_keys({k.removeprefix("module."): v for k, v in weights.items()}, model)
    missing, unexpected = _state_mismatch(model, weights)
    if missing or unexpected:
        raise CheckpointError(f"state_dict {path} does not fit the model (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}); was it saved from this architecture?")
    stem = _stem_mismatch(model, weights)
    if stem:
        raise CheckpointError(f"state_dict {path} does not fit the model: {stem}")
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        why = lines[0] if lines else str(err).splitlines()[0]
        raise CheckpointError(f"state_dict {path} does not fit the model ({why}); was it saved from this "
                              "architecture?") from None
    return model.to(device).eval()


def _own_keys(weights: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """Weights of an adapted classifier saved while nslab wrapped it (format 2: the network under `net.`, the
    normalization's buffers under `normalize.`), under the model's own keys; any other weights as they are."""
    expected = model.state_dict()
    if any(k.startswith("net.") for k in weights) and not any(k.startswith("net.") for k in expected):
        return {k.removeprefix("net."): v for k, v in weights.items() if not k.startswith("normalize.")}
    return weights


def _stem_mismatch(model: nn.Module, weights: dict[str, Any]) -> str:
    """Why the state_dict's first convolution does not fit the model's, and the flag that builds the model as it
    was trained (`analyze sensitivity`); '' when it fits. The kernel tells the stems apart: a 3x3 first
    convolution is the small-input (CIFAR) stem, a 7x7 one torchvision's ImageNet stem."""
    found = first_conv(model)
    saved = weights.get(f"{found[0]}.weight") if found is not None else None
    if saved is None or saved.dim() != 4 or tuple(saved.shape) == tuple(found[1].weight.shape):
        return ""
    path, conv = found
    kernel, built = "x".join(map(str, saved.shape[2:])), "x".join(map(str, conv.kernel_size))
    if kernel == "3x3" and built != "3x3":
        return (f"its {path} is a 3x3 convolution (the small-input CIFAR stem) and the model's is {built}; pass "
                "--cifar-stem to build the model as it was trained")
    if built == "3x3" and kernel != "3x3":
        return (f"its {path} is a {kernel} convolution (the ImageNet stem) and the model was built with the "
                "small-input stem (3x3); drop --cifar-stem (and use --normalize instead of --adapt) to build the "
                "model as it was trained")
    if saved.shape[1] != conv.in_channels:
        return (f"its {path} takes {saved.shape[1]} input channels and the data has {conv.in_channels}; analyse "
                f"it on data with {saved.shape[1]} channels")
    return (f"its {path} weight is {tuple(saved.shape)} and the model's {tuple(conv.weight.shape)}; was it saved "
            "from this architecture?")


def _state_mismatch(model: nn.Module, weights: dict[str, Any]) -> tuple[list[str], list[str]]:
    expected = set(model.state_dict())
    return sorted(expected - set(weights)), sorted(set(weights) - expected)
