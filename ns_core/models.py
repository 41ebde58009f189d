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
from collections import OrderedDict
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


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998, "Gradient-based learning applied to document recognition") with ReLU and
    max pooling. conv2 is padded for inputs under 16 pixels (e.g. 8x8 digits) so any H, W >= 8 works."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.normalize = Normalize.for_channels(channels)
        self.conv1 = nn.Conv2d(channels, 6, 5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5, padding=0 if min(height, width) >= 16 else 2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        with torch.no_grad():  # flatten size for this input shape, by a dummy forward
            flat = self.features(torch.zeros(1, *input_shape)).shape[1]
        self.fc1 = nn.Linear(flat, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)
        self.default_layers = ["relu1", "relu2", "relu3", "relu4"]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        z = self.pool1(self.relu1(self.conv1(self.normalize(x))))  # (B, 6, H/2, W/2)
        return self.pool2(self.relu2(self.conv2(z))).flatten(1)  # (B, 16*h*w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.relu4(self.fc2(self.relu3(self.fc1(self.features(x))))))  # (B, num_classes)


class SmallCNN(nn.Module):
    """The MNIST CNN of Madry et al. 2018 ("Towards deep learning models resistant to adversarial attacks",
    MadryLab/mnist_challenge model.py): conv32 5x5 -> pool -> conv64 5x5 -> pool -> fc1024 -> fc."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        self.normalize = Normalize.for_channels(input_shape[0])
        self.conv1 = nn.Conv2d(input_shape[0], 32, 5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *input_shape)).shape[1]
        self.fc1 = nn.Linear(flat, 1024)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(1024, num_classes)
        self.default_layers = ["relu1", "relu2", "relu3"]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        z = self.pool1(self.relu1(self.conv1(self.normalize(x))))  # (B, 32, H/2, W/2)
        return self.pool2(self.relu2(self.conv2(z))).flatten(1)  # (B, 64*h*w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu3(self.fc1(self.features(x))))


class VGG16(nn.Module):
    """VGG-16 with batch norm (Simonyan & Zisserman 2015) in its CIFAR form (kuangliu/pytorch-cifar vgg.py):
    13 conv-BN-ReLU in 5 stages, one linear classifier. Pools use ceil_mode so 28x28 inputs also work."""

    STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        self.normalize = Normalize.for_channels(input_shape[0])
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels = input_shape[0]
        for stage, widths in enumerate(self.STAGES, start=1):
            for i, width in enumerate(widths, start=1):
                layers[f"conv{stage}_{i}"] = nn.Conv2d(channels, width, 3, padding=1, bias=False)
                layers[f"bn{stage}_{i}"] = nn.BatchNorm2d(width)
                layers[f"relu{stage}_{i}"] = nn.ReLU()
                channels = width
            layers[f"pool{stage}"] = nn.MaxPool2d(2, ceil_mode=True)
        self.features = nn.Sequential(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(512, num_classes)
        self.default_layers = [f"features.relu{s}_{len(w)}" for s, w in enumerate(self.STAGES, start=1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.pool(self.features(self.normalize(x))).flatten(1)  # (B, 512)
        return self.classifier(z)


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation block (He et al. 2016, "Identity mappings in deep residual networks")."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(a)
        return self.conv2(self.relu2(self.bn2(self.conv1(a)))) + shortcut


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016) for CIFAR (kuangliu/pytorch-cifar resnet.py): 3x3 stem, no max pool.
    With `preact=True`, PreAct ResNet-18 (as in Rice et al. 2020) with a final BN-ReLU."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, preact: bool = False) -> None:
        super().__init__()
        block = PreActBlock if preact else BasicBlock
        self.normalize = Normalize.for_channels(input_shape[0])
        self.conv1 = nn.Conv2d(input_shape[0], 64, 3, padding=1, bias=False)
        # BasicBlock nets normalize the stem; pre-activation nets normalize inside the next block instead
        self.stem = nn.Sequential() if preact else nn.Sequential(nn.BatchNorm2d(64), nn.ReLU())
        in_planes = 64
        for i, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
            self.add_module(f"layer{i}", nn.Sequential(block(in_planes, planes, stride), block(planes, planes, 1)))
            in_planes = planes
        self.final = nn.Sequential(nn.BatchNorm2d(512), nn.ReLU()) if preact else nn.Sequential()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)
        self.default_layers = ["layer1", "layer2", "layer3", "layer4"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stem(self.conv1(self.normalize(x)))  # (B, 64, H, W)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))  # (B, 512, H/8, W/8)
        return self.linear(self.pool(self.final(out)).flatten(1))


class WideResNet(nn.Module):
    """WideResNet (Zagoruyko & Komodakis 2016) for CIFAR as used by TRADES (yaodongyu/TRADES wideresnet.py),
    pre-activation blocks, without TRADES' unused `sub_block1` and with non-inplace ReLUs."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, depth: int = 34,
                 widen: int = 10) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4 (e.g. 28, 34), got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.normalize = Normalize.for_channels(input_shape[0])
        self.conv1 = nn.Conv2d(input_shape[0], widths[0], 3, padding=1, bias=False)
        for i, stride in enumerate((1, 2, 2), start=1):
            blocks = [PreActBlock(widths[i - 1] if j == 0 else widths[i], widths[i], stride if j == 0 else 1)
                      for j in range(n)]
            self.add_module(f"block{i}", nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        self.default_layers = ["block1", "block2", "block3", "relu"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(self.normalize(x)))))  # (B, 64*widen, H/4, W/4)
        return self.fc(self.pool(self.relu(self.bn(out))).flatten(1))


@MODELS.register("lenet5")
def lenet5(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    return LeNet5(input_shape, num_classes)


@MODELS.register("small_cnn")
def small_cnn(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    return SmallCNN(input_shape, num_classes)


@MODELS.register("vgg16")
def vgg16(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    return VGG16(input_shape, num_classes)


@MODELS.register("resnet18")
def resnet18(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    return ResNet18(input_shape, num_classes)


@MODELS.register("preact_resnet18")
def preact_resnet18(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    return ResNet18(input_shape, num_classes, preact=True)


@MODELS.register("wrn34_10")
def wrn34_10(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    return WideResNet(input_shape, num_classes, depth=34, widen=10)
