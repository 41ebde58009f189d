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
   makes it fit: a `NormalizedClassifier` with the normalization as first submodule `normalize` and the
   network under `net` (layer paths read `net.layer1`); the first `nn.Conv2d` (in `named_modules()` order)
   rebuilt for C input channels with its other settings; for small inputs (min(H, W) < 64, e.g. 28x28 MNIST or
   32x32 CIFAR) the usual CIFAR stem: that convolution at stride 1 (a 7x7 one becomes 3x3 with padding 1) and
   a max-pool that directly follows it (after normalization and activation only) replaced by `nn.Identity`;
   and every module's `inplace` flag off, because nslab's hooks read activations and the SNS regularizer
   backpropagates through them, which an in-place op would overwrite.

Either way `create_model` checks the result on one dummy batch: it must return (batch, K) logits. A factory
that fits neither contract, a call it refuses, a forward that fails or a wrong output shape is a one-line
ValueError naming the model.

    model = adapt_classifier(torchvision.models.resnet18(num_classes=10), (1, 28, 28), Normalize.for_channels(1))
    layers, reason = propose_layers(model, (1, 28, 28))    # ['net.layer1', ..., 'net.layer4'], and why
"""

from __future__ import annotations

import inspect
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass
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


class NormalizedClassifier(nn.Module):
    """A classifier on [0, 1] inputs: `normalize` (per-channel mean/std) then the adapted network `net`."""

    def __init__(self, normalize: nn.Module, net: nn.Module) -> None:
        super().__init__()
        self.normalize = normalize
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))  # (B, num_classes)


def adapt_classifier(net: nn.Module, input_shape: tuple[int, int, int], normalize: nn.Module) -> NormalizedClassifier:
    """Fit a plain classifier (torchvision's) to nslab: [0, 1] inputs, C channels, the CIFAR stem for small
    inputs, no in-place ops (the module docstring says each step and why). Modifies `net` and wraps it."""
    channels, height, width = input_shape
    leaves = [(path, module) for path, module in net.named_modules() if not any(module.children())]
    first = next(((i, path) for i, (path, module) in enumerate(leaves) if isinstance(module, nn.Conv2d)), None)
    if first is not None:
        index, path = first
        conv = leaves[index][1]
        small = min(height, width) < SMALL_INPUT
        _replace(net, path, _stem_conv(conv, channels, small))
        if small:
            following = next(((p, m) for p, m in leaves[index + 1:] if not isinstance(m, STEM_BETWEEN)), None)
            if following is not None and isinstance(following[1], nn.MaxPool2d):
                _replace(net, following[0], nn.Identity())
    for module in net.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False
    return NormalizedClassifier(normalize, net)


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
