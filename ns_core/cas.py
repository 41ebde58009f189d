"""Channel-wise activation suppressing (CAS; Bai et al., ICLR 2021, "Improving adversarial robustness via
channel-wise activation suppressing"; reference code bymavis/CAS_ICLR2021 `models/resnet_cas.py`), put
onto any model.

For each chosen layer an auxiliary head, nn.Linear(channels -> classes), reads the layer's output averaged
over its spatial positions; the output's channels are then multiplied by the head's weight row of one class:
the TRUE label in train mode, the head's PREDICTED label (argmax of its logits) in eval mode. CAS changes
the test-time forward, so it lives in the model: `install_cas` registers the heads as the submodule
`cas_heads` (state_dict, optimizer and checkpoints carry them) and a forward hook on each layer. Plain
`model(x)` in eval mode IS the CAS test-time forward, so every attack, the evaluation and the masking checks
attack exactly that. A training forward takes its labels from `cas_forward`, a scoped context manager (no
global state), which also hands back the heads' logits for the CAS loss:

    layers = install_cas(model, num_classes=10).layers     # given layers, else the last studied layer
    model.train()
    with cas_forward(model, y) as head_logits:              # train mode: the true label's mask
        logits = model(x_adv)                               # head_logits: {layer: (B, classes)}
    model.eval(); model(x)                                  # test time: the predicted label's mask

A train-mode forward outside `cas_forward` raises: it has no label to suppress with. The CAS loss itself
(PGD-AT + beta x the heads' mean cross-entropy) is the `cas` objective (ns_core/objectives.py); its
adaptive attack, `cas_pgd` (ns_core/attacks.py), ascends the same loss on the test-time forward.

Layers: those given, else the LAST of the layers nslab studies in the model (its `default_layers`, else the
proposed ones: `ns_core.models.studied_layers`), where the paper puts CAS (its ResNet-18: the last stage's
blocks). On every layer it fails: LeNet-5 with CAS on relu1..relu4 sat at chance clean accuracy on validation
after 4 epochs of mnist5k while its training loss fell (each true-label mask hands the label forward, four in
a row learn to read it, and the predicted-label masks of the test-time forward then carry nothing); on relu4
alone it trained (89% clean after 4 epochs).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ns_core.models import INPUT_SHAPE_ATTR, studied_layers
from ns_core.sensitivity import ActivationCapture
from ns_core.utils import eval_mode

CAS_MODULE = "cas_heads"  # the submodule the heads live under: state_dict keys cas_heads.<layer>.weight


def head_key(layer: str) -> str:
    """A ModuleDict key for a named_modules() path (a key cannot hold a dot)."""
    return layer.replace(".", "__")


class CASHeads(nn.ModuleDict):
    """One nn.Linear(channels, num_classes) per CAS layer, and what a forward reads besides its input: the
    labels of a training forward and where the heads' logits go, both set only inside `cas_forward`."""

    def __init__(self, layers: Sequence[str], channels: Sequence[int], num_classes: int) -> None:
        pairs = zip(layers, channels, strict=True)
        super().__init__({head_key(layer): nn.Linear(c, num_classes) for layer, c in pairs})
        self.layers = list(layers)
        self.labels: Tensor | None = None
        self.record: dict[str, Tensor] | None = None


class _Suppress:
    """The forward hook on one CAS layer (a callable object, not a closure, so a deep-copied model's hook
    follows the copied heads)."""

    def __init__(self, heads: CASHeads, layer: str) -> None:
        self.heads, self.layer = heads, layer

    def __call__(self, _module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor:
        head = self.heads[head_key(self.layer)]
        pooled = output.flatten(2).mean(2) if output.dim() > 2 else output  # (B, C)
        logits = head(pooled)  # (B, classes)
        if self.heads.training:
            label = self.heads.labels
            if label is None:
                raise RuntimeError(f"CAS layer {self.layer!r} ran in train mode without labels: a training forward "
                                   "of a CAS model runs inside `with cas_forward(model, y):` (or switch to eval mode)")
            if label.shape[0] != output.shape[0]:
                raise ValueError(f"CAS layer {self.layer!r}: {label.shape[0]} labels for a batch of {output.shape[0]}")
        else:
            label = logits.argmax(1)  # (B,) the head's prediction: the test-time mask
        if self.heads.record is not None:
            self.heads.record[self.layer] = logits
        mask = head.weight[label].to(output.dtype)  # (B, C)
        return output * mask.view(*mask.shape, *([1] * (output.dim() - 2)))  # (B, C, ...)


def cas_heads(model: nn.Module) -> CASHeads | None:
    """The model's CAS heads, or None when CAS is not installed."""
    heads = getattr(model, CAS_MODULE, None)
    return heads if isinstance(heads, CASHeads) else None


def cas_layers(model: nn.Module, layers: Sequence[str] | None = None, *,
               input_shape: tuple[int, int, int] | None = None) -> list[str]:
    """The layers CAS goes on: the installed ones, else `layers` (checked), else the last studied layer."""
    heads = cas_heads(model)
    if heads is not None and layers is None:
        return list(heads.layers)
    if layers:
        return studied_layers(model, layers, input_shape=input_shape)
    return studied_layers(model, input_shape=input_shape)[-1:]


def install_cas(model: nn.Module, num_classes: int, layers: Sequence[str] | None = None, *,
                input_shape: tuple[int, int, int] | None = None) -> CASHeads:
    """Put CAS on `model` (in place) and return its heads. The layers: `layers`, else the last of the studied
    layers (the model's `default_layers`, else proposed ones; module docstring). Their channel counts come from one
    dummy forward of 2 zero inputs (eval mode, no gradient; `input_shape`, else the one `create_model`
    recorded). Installing again with the same layers (or None) returns the heads already there."""
    existing = cas_heads(model)
    if existing is not None:
        if layers is not None and list(layers) != existing.layers:
            raise ValueError(f"CAS is already installed on layers {existing.layers}; cannot install it on "
                             f"{list(layers)} too (build a fresh model)")
        return existing
    if hasattr(model, CAS_MODULE):
        raise ValueError(f"{type(model).__name__} already has an attribute {CAS_MODULE!r}; CAS cannot install there")
    shape = input_shape or getattr(model, INPUT_SHAPE_ATTR, None)
    if shape is None:
        raise ValueError(f"install_cas needs the input shape of {type(model).__name__}: pass input_shape=(C, H, W) "
                         "or build the model with create_model")
    names = cas_layers(model, layers, input_shape=tuple(shape))
    keys = [head_key(name) for name in names]
    if len(set(keys)) != len(keys):
        raise ValueError(f"CAS layers {names} give clashing head names {keys}")
    reference = next(itertools.chain(model.parameters(), model.buffers()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    with eval_mode(model), torch.no_grad(), ActivationCapture(model, names) as capture:
        model(torch.zeros(2, *shape, device=device, dtype=dtype))
        outputs = capture.pop()
    channels = [outputs[name].shape[1] for name in names]
    heads = CASHeads(names, channels, num_classes).to(device)
    model.add_module(CAS_MODULE, heads)
    modules = dict(model.named_modules())
    for name in names:
        modules[name].register_forward_hook(_Suppress(heads, name))
    return heads


def heads_cross_entropy(head_logits: dict[str, Tensor], y: Tensor) -> Tensor:
    """The CAS heads' mean cross-entropy per example (N,): the term CAS adds to its adversary's loss and that
    its adaptive attack (ns_core.adaptive_attacks.cas_pgd) ascends."""
    return sum(F.cross_entropy(h, y, reduction="none") for h in head_logits.values()) / len(head_logits)


@contextlib.contextmanager
def cas_forward(model: nn.Module, labels: Tensor | None = None) -> Iterator[dict[str, Tensor]]:
    """For the block, train-mode forwards of the CAS `model` suppress with `labels` (B,), and every forward
    records its heads' logits {layer: (B, classes)} in the dict this yields (the last forward's win)."""
    heads = cas_heads(model)
    if heads is None:
        raise ValueError(f"{type(model).__name__} has no CAS heads; install them first (ns_core.cas.install_cas)")
    previous = heads.labels, heads.record
    heads.labels, heads.record = labels, {}
    try:
        yield heads.record
    finally:
        heads.labels, heads.record = previous
