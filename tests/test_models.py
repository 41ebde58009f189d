"""Model registry contract: shapes, normalization inside, default layers that hooks can read and train through."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from ns_core.models import Normalize, create_model, model_names

NUM_CLASSES = 7  # not 10, so a hard-coded classifier width fails
MNIST_LIKE = {"lenet5", "small_cnn"}


def natural_shape(name: str) -> tuple[int, int, int]:
    return (1, 28, 28) if name in MNIST_LIKE else (3, 32, 32)


def other_shape(name: str) -> tuple[int, int, int]:
    return (3, 32, 32) if name in MNIST_LIKE else (1, 28, 28)


def small_shape(name: str) -> tuple[int, int, int]:
    """The natural channels at a smaller size, to keep the backward pass of the big models quick."""
    return natural_shape(name) if name in MNIST_LIKE else (3, 16, 16)


@functools.cache
def built(name: str, shape: tuple[int, int, int]) -> nn.Module:
    """One seeded instance per (model, shape), shared by the read-only tests (wrn34_10 is big)."""
    torch.manual_seed(0)
    return create_model(name, shape, NUM_CLASSES)


def inputs(shape: tuple[int, int, int]) -> torch.Tensor:
    return torch.rand(2, *shape, generator=torch.Generator().manual_seed(1))


def logits_layer(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


@pytest.mark.parametrize("name", model_names())
def test_output_shape_on_both_channel_counts(name: str) -> None:
    for shape in (natural_shape(name), other_shape(name)):
        model = built(name, shape)
        with torch.no_grad():
            out = model.eval()(inputs(shape))
        assert out.shape == (2, NUM_CLASSES) and torch.isfinite(out).all()
        assert logits_layer(model).out_features == NUM_CLASSES


@pytest.mark.parametrize("name", model_names())
def test_default_layers_exist_and_exclude_the_logits(name: str) -> None:
    model = built(name, natural_shape(name))
    modules = dict(model.named_modules())
    assert model.default_layers and len(set(model.default_layers)) == len(model.default_layers)
    for layer in model.default_layers:
        assert layer in modules, f"{layer!r} not in named_modules()"
        assert modules[layer] is not logits_layer(model) and not isinstance(modules[layer], nn.Linear)


@pytest.mark.parametrize("name", model_names())
def test_normalization_is_the_first_submodule_and_matters(name: str) -> None:
    shape = natural_shape(name)
    model = copy.deepcopy(built(name, shape)).eval()
    first_name, first = next(iter(model.named_children()))
    assert first_name == "normalize" and isinstance(first, Normalize)
    x = inputs(shape)
    assert not torch.allclose(model.normalize(x), x)
    with torch.no_grad():
        normalized = model(x)
        model.normalize = nn.Identity()
        raw = model(x)
    assert not torch.allclose(normalized, raw)


def test_normalize_statistics_follow_channels() -> None:
    one, three = Normalize.for_channels(1), Normalize.for_channels(3)
    assert one.mean.shape == (1, 1, 1, 1) and three.std.shape == (1, 3, 1, 1)
    torch.testing.assert_close(one(torch.full((1, 1, 2, 2), 0.1307)), torch.zeros(1, 1, 2, 2))
    assert "mean" in dict(three.named_buffers())  # moves with .to(device) and is saved in state_dict


@pytest.mark.parametrize("name", model_names())
def test_hooks_on_default_layers_see_unmodified_activations(name: str) -> None:
    shape = small_shape(name)
    model = built(name, shape).train()
    assert all(not m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    seen: dict[str, torch.Tensor] = {}
    copies: dict[str, torch.Tensor] = {}

    def hook(layer: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            seen[layer], copies[layer] = output, output.detach().clone()
        return record

    modules = dict(model.named_modules())
    handles = [modules[layer].register_forward_hook(hook(layer)) for layer in model.default_layers]
    try:
        logits = model(inputs(shape))
    finally:
        for handle in handles:
            handle.remove()
    assert list(seen) == model.default_layers  # every layer fires, in forward order
    for layer, activation in seen.items():
        assert activation.shape[0] == 2 and activation.requires_grad
        assert activation.shape != logits.shape, f"{layer} looks like the logits"
        assert torch.equal(activation, copies[layer]), f"{layer} was modified in place after its hook"
    # the SNS regularizer backpropagates through these activations; an in-place op would make this raise
    loss = logits.sum() + sum(a.abs().mean() for a in seen.values())
    loss.backward()
    assert model.normalize.mean.grad is None and next(model.parameters()).grad is not None
    model.zero_grad(set_to_none=True)


def test_lenet5_handles_8x8_digits() -> None:
    model = create_model("lenet5", (1, 8, 8), 10)
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_unknown_model_and_bad_shape_raise() -> None:
    with pytest.raises(ValueError, match="lenet5"):
        create_model("lenet", (1, 28, 28), 10)
    with pytest.raises(ValueError, match="input_shape"):
        create_model("lenet5", (28, 28), 10)
