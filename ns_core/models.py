"""Model registry: every model takes [0, 1] images and normalizes them itself (first submodule `normalize`).

    model = create_model("lenet5", input_shape=(1, 28, 28), num_classes=10)
    model.default_layers  # ["relu1", "relu2", "relu3", "relu4"]: named_modules() paths for sensitivity hooks
    model = create_model("mypkg.nets:build_net", input_shape=(1, 28, 28), num_classes=10)   # your own
    model = create_model("torchvision.models:resnet18", input_shape=(3, 32, 32), num_classes=10)
    studied_layers(model)                      # ["layer1", ..., "layer4"], proposed and logged
    studied_layers(model, ["layer3"])          # the config's sns.layers, checked: the model's own names

A model named by import path is a factory called with keyword arguments, `build_net(input_shape=(C, H, W),
num_classes=K) -> nn.Module`, or a classifier factory that takes only `num_classes` (torchvision's), which
nslab adapts; ns_core/adapters.py states the contract in full (and docs/studies.md, "Your own model or data").

The built-in architectures (lenet5, small_cnn, vgg16, resnet18, preact_resnet18, wrn34_10) are
ns_core/architectures.py, registered here when this module is imported.

`studied_layers` answers which layers nslab studies: those given (config `sns.layers`, an analysis' layers),
else the model's `default_layers`, else layers nslab proposes (`adapters.propose_layers`). They name modules
whose forward output IS the activation studied (block outputs, hidden FC activations), never the logits, and
that run once per forward. Every ReLU of the built-ins is its own non-inplace module: forward hooks read these
outputs and the SNS regularizer backpropagates through them, so nothing may overwrite them afterwards.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Sequence

import torch
from torch import nn

from ns_core.adapters import (
    BLOCK_NAME,
    Adaptation,
    adapt_classifier,
    classifier_kwargs,
    factory_contract,
    nslab_adaptation,
    propose_layers,
    trace_forward,
)
from ns_core.registry import Registry
from ns_core.sensitivity import resolve_layers
from ns_core.utils import eval_mode

log = logging.getLogger(__name__)
MODELS = Registry("model", import_paths=True)
INPUT_SHAPE_ATTR = "nslab_input_shape"  # set by create_model: the (C, H, W) a dummy forward may use
_PROPOSED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], list[str]]] = weakref.WeakKeyDictionary()
_CHECKED: weakref.WeakKeyDictionary[nn.Module, set[tuple]] = weakref.WeakKeyDictionary()  # layers found to run once

MNIST_MEAN_STD = ((0.1307,), (0.3081,))
CIFAR10_MEAN_STD = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


class Normalize(nn.Module):
    """(x - mean) / std per channel, with mean/std as buffers so they follow the model's device."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    @classmethod
    def for_channels(cls, channels: int) -> Normalize:
        return cls(*normalization_for(channels))


def normalization_for(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std): MNIST statistics for 1 channel, CIFAR-10 statistics for 3, mean 0.5 / std 0.5 otherwise."""
    return {1: MNIST_MEAN_STD, 3: CIFAR10_MEAN_STD}.get(channels, ((0.5,) * channels, (0.5,) * channels))


def model_names() -> list[str]:
    return MODELS.names()


def create_model(name: str, input_shape: tuple[int, int, int], num_classes: int,
                 adaptation: Adaptation | None = None) -> nn.Module:
    """Build the named model for (C, H, W) inputs in [0, 1] and `num_classes` logits.

    The factory is called with keyword arguments under nslab's contract, or built with `num_classes` and
    adapted when it is a plain classifier (ns_core/adapters.py): as `adaptation` says (a checkpoint's record, an
    analysis' choice), else with nslab's decisions for training. The model is then checked on one dummy batch
    and remembers its input shape (attribute `nslab_input_shape`) for `studied_layers`."""
    if len(input_shape) != 3 or min(input_shape) < 1 or num_classes < 2:
        raise ValueError(f"need input_shape (C, H, W) and num_classes >= 2, got {input_shape}, {num_classes}")
    shape = tuple(int(size) for size in input_shape)
    factory = MODELS.get(name)
    contract = factory_contract(factory)
    if contract is None:
        raise ValueError(f"model {name!r}: the factory must take (input_shape, num_classes) as keyword arguments "
                         "(nslab's contract) or num_classes alone (a classifier such as torchvision's, which nslab "
                         f"adapts); it takes {_parameters(factory)}")
    if contract == "nslab" and adaptation is not None:
        raise ValueError(f"model {name!r} takes input_shape (nslab's contract) and is used as it is built; "
                         "adapting it (--adapt, --normalize, --cifar-stem) applies only to a factory that takes "
                         "num_classes alone")
    kwargs = ({"input_shape": shape, "num_classes": num_classes} if contract == "nslab"
              else classifier_kwargs(factory, num_classes))
    try:
        model = factory(**kwargs)
    except TypeError as err:  # e.g. a class that refuses a keyword its signature seemed to take via **kwargs
        called = ", ".join(f"{key}={value!r}" for key, value in kwargs.items())
        raise ValueError(f"model {name!r}: calling the factory with ({called}) failed: {err}") from err
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {name!r}: the factory must return a torch.nn.Module, got {type(model).__name__}")
    if contract == "classifier":
        model = adapt_classifier(model, adaptation or nslab_adaptation(shape, *normalization_for(shape[0])))
    _check_logits(model, name, shape, num_classes)
    setattr(model, INPUT_SHAPE_ATTR, shape)
    return model


def _parameters(factory: object) -> str:
    try:
        return f"({', '.join(inspect.signature(factory).parameters)})"
    except (TypeError, ValueError):
        return "an unreadable signature"


@torch.no_grad()
def _check_logits(model: nn.Module, name: str, shape: tuple[int, int, int], num_classes: int) -> None:
    """One dummy batch of 2 in eval mode (modes restored): the model must return (2, num_classes) logits."""
    reference = next(model.parameters(), None)
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))  # (2, C, H, W)
    if reference is not None:
        x = x.to(reference.device, reference.dtype if reference.is_floating_point() else torch.float32)
    try:
        with eval_mode(model):
            out = model(x)
    except Exception as err:  # any failure of a user's forward becomes one line naming the model
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"model {name!r} fails on a dummy batch of 2 inputs {shape}: {type(err).__name__}: "
                         f"{first}") from err
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != (2, num_classes):
        raise ValueError(f"model {name!r} returned {got} for a batch of 2 inputs {shape}; a classifier must return "
                         f"(batch, num_classes) = (2, {num_classes}) logits")


def studied_layers(model: nn.Module, layers: Sequence[str] | None = None, *,
                   input_shape: tuple[int, int, int] | None = None) -> list[str]:
    """The layers nslab studies in `model`: `layers` when given (the config's sns.layers, an analysis'
    layers), else the model's `default_layers`, else layers nslab proposes (`adapters.propose_layers`, logged
    once per model as a warning, since they decide what is measured and trained).

    Given and default layers are checked: each must be a named_modules() path (a one-line ValueError with the
    closest name otherwise) and, when the input shape is known (`input_shape`, or the model came from
    `create_model`), must run exactly once per forward: a module used at several places (a shared ReLU) would
    mix several activations in one hook."""
    shape = input_shape or getattr(model, INPUT_SHAPE_ATTR, None)
    layers = [layers] if isinstance(layers, str) else layers
    names = list(dict.fromkeys(layers or getattr(model, "default_layers", None) or []))
    if names:
        resolve_layers(model, names)
        checked = _CHECKED.setdefault(model, set())
        if shape is not None and (tuple(shape), tuple(names)) not in checked:  # once per model and layers: a forward
            _check_run_once(model, names, tuple(shape))
            checked.add((tuple(shape), tuple(names)))
        return names
    if shape is None:
        raise ValueError(f"{type(model).__name__} has no default_layers and no layers were given; name them in "
                         "sns.layers (or the analysis' --layers), or build the model with create_model so nslab "
                         "can propose them")
    cached = _PROPOSED.get(model)
    if cached is None or cached[0] != tuple(shape):
        proposed, reason = propose_layers(model, tuple(shape))
        log.info("%s has no default_layers and no layers were given; %s", type(model).__name__, reason)
        cached = _PROPOSED[model] = (tuple(shape), proposed)
    return list(cached[1])


def _check_run_once(model: nn.Module, names: list[str], shape: tuple[int, ...]) -> None:
    trace = trace_forward(model, shape)
    for name in names:
        runs = trace.calls[name]
        if runs == 0:
            raise ValueError(f"layer {name!r} does not run in the forward pass, so its hook would see nothing; "
                             "choose a module the forward calls")
        if runs > 1:
            parent = name.rpartition(".")[0]
            while parent and trace.calls.get(parent) != 1:
                parent = parent.rpartition(".")[0]
            block = parent and BLOCK_NAME.search(type(model.get_submodule(parent)).__name__)
            hint = f", e.g. the block around it, {parent!r}" if block else " (or give each use its own module)"
            raise ValueError(f"layer {name!r} runs {runs} times per forward (one module used at several places), so "
                             f"its hook would mix several activations; choose a module that runs once{hint}")
        if not trace.readable[name]:
            raise ValueError(f"layer {name!r} does not output a (batch, neurons, ...) tensor; choose another")


from ns_core import architectures  # noqa: E402, F401  (registers the built-in architectures in MODELS)
