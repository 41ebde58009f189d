"""Taking in classifiers nslab did not write: the model factory contract, the adapter for classifiers that only
know their number of classes (torchvision's), and the layers nslab proposes when a model names none.

The contract. A model is named in a config by a registered name or an import path `package.module:function`.
`ns_core.models.create_model` calls that factory in one of two ways:

1. nslab's contract, when the factory names an `input_shape` parameter: `factory(input_shape=(C, H, W),
   num_classes=K)`, always with keyword arguments. It returns an `nn.Module` that takes images in [0, 1]
   (normalization inside the model, e.g. `Normalize.for_channels(C)` as its first submodule `normalize`) and
   returns (batch, K) logits. It MAY carry `default_layers`: the `named_modules()` paths whose outputs are the
   activations nslab studies (block outputs, hidden activations, never the logits). Without them nslab uses the
   config's `sns.layers` (or the analysis' `--layers`), else proposes layers itself (`propose_layers`).
2. A plain classifier, when the factory does not name `input_shape` but takes `num_classes` (by name, or
   through **kwargs as torchvision's and timm's builders do): `factory(num_classes=K, weights=None)`
   (`weights=None` only where the factory names it: nslab never downloads weights), then `adapt_classifier`
   makes it fit, in place, so every layer name and state_dict key stays the model's own (`layer1`, no
   wrapper's prefix): the normalization goes in front as a forward pre-hook with non-persistent buffers
   (`nslab_mean`, `nslab_std`: not in the state_dict); the first `nn.Conv2d` (in `named_modules()` order)
   is rebuilt for C input channels with its other settings; for small inputs (min(H, W) < 64, e.g. 28x28
   MNIST or 32x32 CIFAR) the usual CIFAR stem: that convolution at stride 1 (a 7x7 one becomes 3x3 with
   padding 1) and a max-pool that directly follows it (after normalization and activation only) replaced by
   `nn.Identity`; and every module's `inplace` flag off, because nslab's hooks read activations and the SNS
   regularizer backpropagates through them, which an in-place op would overwrite (the logits do not change).

These decisions are an `Adaptation`: training makes nslab's (`nslab_adaptation`), every checkpoint nslab
writes records them (metadata `adaptation`) and loading one replays them, so a checkpoint is analysed with
exactly the model that was trained. A plain state_dict trained outside nslab is analysed with the model as
its factory builds it (`bare_adaptation`: the first convolution refitted only where the data's channel count
differs, since the model could not read the data otherwise; in-place flags off), unless the analysis asks for
more (`analyze sensitivity --adapt`, `--normalize`, `--cifar-stem`).

Either way `create_model` checks the result on one dummy batch: it must return (batch, K) logits. A factory
that fits neither contract, a call it refuses, a forward that fails or a wrong output shape is a one-line
ValueError naming the model.

    adaptation = nslab_adaptation((1, 28, 28), mean=(0.1307,), std=(0.3081,))
    model = adapt_classifier(torchvision.models.resnet18(num_classes=10), adaptation)   # the same module, fitted
    layers, reason = propose_layers(model, (1, 28, 28))    # ['layer1', ..., 'layer4'], and why
"""

from __future__ import annotations

import inspect
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ns_core.utils import eval_mode

SMALL_INPUT = 64  # min(H, W) below this gets the CIFAR stem (no stride, no max-pool after the first conv)
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
               nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Threshold)
BLOCK_NAME = re.compile(r"(Block|Bottleneck)$")  # torchvision/timm residual blocks: BasicBlock, Bottleneck, ...
STEM_BETWEEN = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, *ACTIVATIONS)


def factory_contract(factory: Callable[..., Any]) -> str | None:
    """'nslab' (names input_shape, takes num_classes), 'classifier' (does not name input_shape but takes
    num_classes, by name or through **kwargs as torchvision's and timm's builders do: adapted by
    `adapt_classifier`) or None (neither). A factory whose signature cannot be read is called with nslab's."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: let the call itself decide
        return "nslab"

    def binds(**params: Any) -> bool:
        try:
            signature.bind(**params)
        except TypeError:
            return False
        return True

    if "input_shape" in signature.parameters:
        return "nslab" if binds(input_shape=(1, 1, 1), num_classes=2) else None
    return "classifier" if binds(num_classes=2) else None


def classifier_kwargs(factory: Callable[..., Any], num_classes: int) -> dict[str, Any]:
    """The keyword arguments a plain classifier factory is built with: num_classes, and `weights=None` where the
    factory names `weights` (torchvision's builders): nslab never downloads weights."""
    try:
        takes_weights = "weights" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes_weights = False
    return {"num_classes": num_classes, "weights": None} if takes_weights else {"num_classes": num_classes}


ADAPTATION_ATTR = "nslab_adaptation"  # the Adaptation a model was fitted with (set by adapt_classifier)


@dataclass(frozen=True)
class Adaptation:
    """What nslab changes in a plain classifier so it fits (module docstring): recorded with every checkpoint
    nslab writes and replayed when one is loaded, so an analysis sees exactly the model that was trained."""

    mean: tuple[float, ...] | None = None  # per-channel normalization in front of the network; None: none
    std: tuple[float, ...] | None = None
    channels: int | None = None  # the first convolution rebuilt for this many input channels; None: as built
    small_stem: bool = False  # the first convolution at stride 1 (7x7 -> 3x3), the max-pool right after it gone
    inplace_off: bool = True  # every module's `inplace` flag off (hooks read activations; the logits do not change)

    def __post_init__(self) -> None:
        if (self.mean is None) != (self.std is None) or (self.mean is not None and len(self.mean) != len(self.std)):
            raise ValueError(f"an Adaptation's normalization needs a mean and a std per channel, got mean "
                             f"{self.mean} and std {self.std}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, for checkpoint metadata."""
        return {"mean": list(self.mean) if self.mean is not None else None,
                "std": list(self.std) if self.std is not None else None,
                "channels": self.channels, "small_stem": self.small_stem, "inplace_off": self.inplace_off}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Adaptation:
        mean, std = data.get("mean"), data.get("std")
        return cls(tuple(mean) if mean is not None else None, tuple(std) if std is not None else None,
                   data.get("channels"), bool(data.get("small_stem", False)), bool(data.get("inplace_off", True)))

    def describe(self) -> str:
        """'with the normalization in front and the small-input stem' / 'as its factory builds it'."""
        parts = (["the normalization in front"] if self.mean is not None else []) + (
            ["the small-input stem"] if self.small_stem else [])
        return f"with {' and '.join(parts)}" if parts else "as its factory builds it"


def nslab_adaptation(input_shape: tuple[int, int, int], mean: tuple[float, ...], std: tuple[float, ...]) -> Adaptation:
    """nslab's decisions for training a plain classifier on (C, H, W) inputs: the given normalization, the first
    convolution for C channels, the small-input stem under SMALL_INPUT pixels, no in-place ops."""
    channels, height, width = input_shape
    return Adaptation(tuple(mean), tuple(std), channels, min(height, width) < SMALL_INPUT, True)


def bare_adaptation(input_shape: tuple[int, int, int], *, mean: tuple[float, ...] | None = None,
                    std: tuple[float, ...] | None = None, small_stem: bool = False) -> Adaptation:
    """The model as its factory builds it, for a state_dict trained outside nslab: no normalization and no stem
    unless asked for; the first convolution refitted only where the data's channel count differs from the
    model's (`adapt_classifier` leaves a matching one as it is); no in-place ops (the logits do not change)."""
    return Adaptation(mean, std, input_shape[0], small_stem, True)


def adaptation_of(model: nn.Module) -> Adaptation | None:
    """The Adaptation `model` was fitted with; None for a model nslab did not adapt (nslab's own contract)."""
    found = getattr(model, ADAPTATION_ATTR, None)
    return found if isinstance(found, Adaptation) else None


def adapt_classifier(net: nn.Module, adaptation: Adaptation) -> nn.Module:
    """Fit a plain classifier (torchvision's) to nslab in place, as `adaptation` says (module docstring: each
    step and why), and return it: the same module, with its own layer names and state_dict keys."""
    leaves = [(path, module) for path, module in net.named_modules() if not any(module.children())]
    first = next(((i, path) for i, (path, module) in enumerate(leaves) if isinstance(module, nn.Conv2d)), None)
    if first is not None and (adaptation.channels is not None or adaptation.small_stem):
        index, path = first
        conv = leaves[index][1]
        _replace(net, path, _stem_conv(conv, adaptation.channels or conv.in_channels, adaptation.small_stem))
        if adaptation.small_stem:
            following = next(((p, m) for p, m in leaves[index + 1:] if not isinstance(m, STEM_BETWEEN)), None)
            if following is not None and isinstance(following[1], nn.MaxPool2d):
                _replace(net, following[0], nn.Identity())
    if adaptation.inplace_off:
        for module in net.modules():
            if isinstance(getattr(module, "inplace", None), bool):
                module.inplace = False
    if adaptation.mean is not None:
        for name in ("nslab_mean", "nslab_std"):
            if hasattr(net, name):
                raise ValueError(f"{type(net).__name__} already has an attribute {name!r}; nslab cannot put its "
                                 "normalization there")
        net.register_buffer("nslab_mean", torch.tensor(adaptation.mean).view(1, -1, 1, 1), persistent=False)
        net.register_buffer("nslab_std", torch.tensor(adaptation.std).view(1, -1, 1, 1), persistent=False)
        net.register_forward_pre_hook(_normalize_input, prepend=True)
    if first is None:  # what was done is what a checkpoint records: no convolution, nothing fitted
        adaptation = replace(adaptation, channels=None, small_stem=False)
    setattr(net, ADAPTATION_ATTR, adaptation)
    return net


def _normalize_input(module: nn.Module, args: tuple) -> tuple:
    """The forward pre-hook of an adapted classifier: its [0, 1] input, normalized per channel."""
    x, *rest = args
    return ((x - module.nslab_mean) / module.nslab_std, *rest)  # (B, C, H, W)


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The first nn.Conv2d in named_modules() order (the one the adapter fits) and its path."""
    return next(((p, m) for p, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def _stem_conv(conv: nn.Conv2d, channels: int, small: bool) -> nn.Conv2d:
    """The first convolution for `channels` inputs (same other settings); stride 1 and 3x3 for small inputs."""
    if conv.groups != 1 and channels != conv.in_channels:
        raise ValueError(f"cannot adapt a grouped first convolution ({conv}) to {channels} input channels")
    kernel, stride, padding = conv.kernel_size, conv.stride, conv.padding
    if small:
        stride = (1, 1)
        if kernel == (7, 7):
            kernel, padding = (3, 3), (1, 1)
    if (channels, kernel, stride, padding) == (conv.in_channels, conv.kernel_size, conv.stride, conv.padding):
        return conv
    return nn.Conv2d(channels, conv.out_channels, kernel, stride=stride, padding=padding, dilation=conv.dilation,
                     groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode)


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


@dataclass
class ForwardTrace:
    """What one dummy forward saw, per named_modules() path: calls (0 if never run), the order in which each
    module first finished, and whether its output is a (batch, neurons, ...) tensor a hook can read."""

    calls: dict[str, int]
    finished: dict[str, int]
    readable: dict[str, bool]

    def once(self, path: str) -> bool:
        return self.calls.get(path) == 1 and self.readable.get(path, False)


@torch.no_grad()
def trace_forward(model: nn.Module, input_shape: tuple[int, int, int]) -> ForwardTrace:
    """Run one seeded batch of 2 inputs in eval mode, without gradients, with a counting hook on every module;
    the model's modes are restored and the hooks removed afterwards."""
    reference = next(itertools.chain(model.parameters(), model.buffers()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    x = torch.rand(2, *input_shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    paths = dict(model.named_modules())
    calls = dict.fromkeys(paths, 0)
    finished: dict[str, int] = {}
    readable: dict[str, bool] = {}

    def counter(path: str):
        def hook(_module: nn.Module, _inputs: tuple, output: Any) -> None:
            calls[path] += 1
            finished.setdefault(path, len(finished))
            readable[path] = isinstance(output, torch.Tensor) and output.dim() >= 2 and output.shape[0] == 2
        return hook

    handles = [module.register_forward_hook(counter(path)) for path, module in paths.items()]
    try:
        with eval_mode(model):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return ForwardTrace(calls, finished, readable)


def propose_layers(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[list[str], str]:
    """The layers nslab studies in a model that names none, and a one-line reason, from one dummy forward:

    (a) residual networks (modules whose class name ends in Block or Bottleneck, as torchvision's and timm's):
        the outputs of their stages (nn.Sequential containers of such blocks, e.g. ResNet's layer1..layer4)
        when there are at least two, else of the outermost blocks;
    (b) otherwise the activation modules (ReLU, GELU, SiLU, Tanh, ... `ACTIVATIONS`);
    (c) otherwise a one-line ValueError asking for the layers, with example paths.

    Only modules that run exactly once per forward and output a (batch, neurons, ...) tensor before the
    classifier (the last nn.Linear called, else the last module with parameters) are proposed: a module that
    runs twice (a shared ReLU) would mix two activations in one hook. The order is the forward order."""
    trace = trace_forward(model, input_shape)
    modules = dict(model.named_modules())
    head = _head(modules, trace)

    def eligible(path: str) -> bool:
        return path != "" and trace.once(path) and trace.finished[path] < head

    def by_order(paths: list[str]) -> list[str]:
        return sorted(paths, key=trace.finished.__getitem__)

    blocks = [p for p, m in modules.items() if BLOCK_NAME.search(type(m).__name__) and eligible(p)]
    outermost = [p for p in blocks if not any(p.startswith(f"{q}.") for q in blocks)]
    stages = [p for p, m in modules.items() if isinstance(m, nn.Sequential) and eligible(p) and len(m) > 0
              and all(f"{p}.{name}" in outermost for name, _ in m.named_children())]
    if len(stages) >= 2:
        layers = by_order(stages)
        return layers, f"proposed layers {layers}: the stage outputs of a residual network (override with sns.layers)"
    if outermost:
        layers = by_order(outermost)
        return layers, f"proposed layers {layers}: the residual block outputs (override with sns.layers)"
    activations = by_order([p for p, m in modules.items() if isinstance(m, ACTIVATIONS) and eligible(p)])
    if activations:
        return activations, (f"proposed layers {activations}: the activation modules that run once per forward "
                             "before the classifier (override with sns.layers)")
    shared = [p for p, m in modules.items() if isinstance(m, ACTIVATIONS) and trace.calls.get(p, 0) > 1]
    why = f" ({', '.join(shared[:3])} run more than once per forward)" if shared else ""
    examples = ", ".join(repr(p) for p in _examples(modules, trace, head))
    raise ValueError(f"nslab cannot propose layers to study in {type(model).__name__}: no residual blocks and no "
                     f"activation module that runs once before the classifier{why}; name the layers in sns.layers "
                     f"(or the analysis' --layers), e.g. {examples or 'paths from model.named_modules()'}")


def _head(modules: dict[str, nn.Module], trace: ForwardTrace) -> int:
    """The finish index of the classifier: the last nn.Linear that ran, else the last module with parameters."""
    ran = [p for p in modules if trace.calls.get(p, 0) > 0 and not any(modules[p].children())]
    linear = [p for p in ran if isinstance(modules[p], nn.Linear)]
    weighted = linear or [p for p in ran if any(True for _ in modules[p].parameters(recurse=False))]
    return max((trace.finished[p] for p in weighted), default=len(trace.finished))


def _examples(modules: dict[str, nn.Module], trace: ForwardTrace, head: int, k: int = 4) -> list[str]:
    """Up to k readable, once-running modules spread over the network, for an error message."""
    paths = sorted((p for p in modules if p and trace.once(p) and trace.finished[p] < head), key=trace.finished.get)
    step = max(1, len(paths) // k)
    return paths[step - 1::step][:k] if paths else []
