"""Model registry contract: shapes, normalization inside, default layers that hooks can read and train through;
classifiers nslab did not write (torchvision's, a user's without default_layers) and the layers it proposes."""

from __future__ import annotations

import copy
import functools
import logging

import pytest
import torch
import torchvision
from torch import nn

from ns_core.adapters import adaptation_of, nslab_adaptation
from ns_core.attacks import Attack
from ns_core.models import Normalize, create_model, model_names, normalization_for, studied_layers
from ns_core.objectives import create_objective
from ns_core.sensitivity import measure_sensitivity

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
    assert studied_layers(model) == model.default_layers  # checked (each runs once), not replaced


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
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert relus and all(not m.inplace for m in relus)  # every built-in model has ReLUs; none runs in place
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


# ---- classifiers nslab did not write, and the layers it studies in them --------------------------------------


@pytest.fixture
def no_downloads(monkeypatch):
    """Any attempt of torchvision to fetch weights fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("nslab asked torchvision for pretrained weights")
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", refuse)


def one_line_error(call, match: str) -> str:
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)], ids=["mnist", "cifar"])
def test_torchvision_resnet18_is_adapted_and_trains_through_proposed_layers(shape, no_downloads, caplog):
    torch.manual_seed(0)
    model = create_model("torchvision.models:resnet18", shape, 10)
    # adapted in place: torchvision's own module, its own names and state_dict keys, no wrapper
    assert isinstance(model, torchvision.models.ResNet) and "conv1" in dict(model.named_children())
    assert set(model.state_dict()) == set(torchvision.models.resnet18(num_classes=10).state_dict())
    assert adaptation_of(model) == nslab_adaptation(shape, *normalization_for(shape[0]))
    assert model.nslab_mean.shape == (1, shape[0], 1, 1)
    stem = model.conv1  # the CIFAR stem: C input channels, 3x3 at stride 1, no max-pool
    assert (stem.in_channels, stem.kernel_size, stem.stride, stem.padding) == (shape[0], (3, 3), (1, 1), (1, 1))
    assert isinstance(model.maxpool, nn.Identity)
    assert not [name for name, m in model.named_modules() if getattr(m, "inplace", False)]
    x = inputs(shape).repeat(2, 1, 1, 1)  # (4, C, H, W)
    y = torch.tensor([0, 3, 7, 9])
    assert model(x).shape == (4, 10)

    with caplog.at_level(logging.INFO, logger="ns_core"):
        layers = studied_layers(model)
        assert studied_layers(model) == layers  # the same, and logged once per model
    assert layers == ["layer1", "layer2", "layer3", "layer4"]
    messages = [r.getMessage() for r in caplog.records if "'layer1'" in r.getMessage()]
    assert len(messages) == 1 and "\n" not in messages[0] and "ResNet" in messages[0]
    assert create_objective("pgd_at", attack=None).watched_layers(model) == layers

    # one SNS step on the proposed layers: select on a probe, PGD example, loss through the hooked activations
    sns = create_objective("sns", attack=Attack("pgd", 0.1, steps=2), warmup_epochs=0, lam=1.0, fraction=0.5)
    sns.on_epoch_start(model, 0, (x, y), torch.Generator().manual_seed(0))
    assert sns.regularizer_active and list(sns.selected_neurons()) == layers
    model.train()
    x_adv = sns.craft(model, x, y, torch.Generator().manual_seed(0))
    assert 0 < (x_adv - x).abs().max() <= 0.1 + 1e-6
    loss, parts = sns.loss(model, x, y, x_adv)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.fc.weight.detach().clone()
    optimizer.zero_grad()
    loss.backward()  # through the hooked block outputs into every layer
    optimizer.step()
    assert torch.isfinite(loss) and parts["sns_reg"] > 0 and not torch.equal(before, model.fc.weight)
    smap = measure_sensitivity(model, [(x, x_adv)], layers)
    assert smap.layers == layers and all(torch.isfinite(s).all() and s.numel() > 0 for s in smap.absolute.values())

    # torchvision's BasicBlock applies one ReLU twice: refused, pointing at the block around it
    one_line_error(lambda: studied_layers(model, ["layer1.0.relu"]),
                   "'layer1.0.relu' runs 2 times per forward.*'layer1.0'")


@pytest.mark.parametrize(("name", "shape", "count"), [("mobilenet_v2", (3, 32, 32), 35), ("vgg11_bn", (1, 28, 28), 10)],
                         ids=["mobilenet_v2", "vgg11_bn"])
def test_other_torchvision_classifiers_build_and_propose_their_activations(name, shape, count, no_downloads):
    torch.manual_seed(0)
    model = create_model(f"torchvision.models:{name}", shape, 10)  # vgg11_bn: 28x28 needs the stem pool gone
    assert not [n for n, m in model.named_modules() if getattr(m, "inplace", False)]
    layers = studied_layers(model)  # no residual blocks: every ReLU/ReLU6 module, each used once
    modules = dict(model.named_modules())
    assert len(layers) == count > 0 and all(isinstance(modules[layer], (nn.ReLU, nn.ReLU6)) for layer in layers)
    calls: dict[str, int] = dict.fromkeys(layers, 0)
    handles = [modules[layer].register_forward_hook(lambda m, a, o, k=layer: calls.update({k: calls[k] + 1}))
               for layer in layers]
    with torch.no_grad():
        logits = model.eval()(inputs(shape))
    for handle in handles:
        handle.remove()
    assert logits.shape == (2, 10) and set(calls.values()) == {1}


def test_a_factory_that_takes_only_num_classes_is_adapted():
    model = create_model("user_models:classes_only_cnn", (1, 28, 28), 5)
    assert isinstance(model, nn.Sequential) and adaptation_of(model) is not None
    assert (model[0].in_channels, model[0].kernel_size, model[0].stride) == (1, (3, 3), (1, 1))
    assert isinstance(model[3], nn.Identity) and not model[2].inplace
    assert studied_layers(model) == ["2", "5"]


def test_a_user_model_without_default_layers_gets_proposed_or_given_layers(caplog):
    model = create_model("user_models:tiny_cnn_no_layers", (1, 8, 8), 3)
    assert not hasattr(model, "default_layers")
    with caplog.at_level(logging.INFO, logger="ns_core"):
        assert studied_layers(model) == ["act1", "act2", "act3"]  # not `out`, the sigmoid after the logits
    assert any("act1" in r.getMessage() and "TinyCNN" in r.getMessage() for r in caplog.records)
    assert studied_layers(model, ["act2"]) == ["act2"]
    sns = create_objective("sns", attack=None, layers=["act3"])
    assert sns.watched_layers(model) == ["act3"]
    assert create_objective("sns", attack=None).watched_layers(model) == ["act1", "act2", "act3"]


def test_a_shared_activation_is_never_proposed_and_refused_when_given():
    model = create_model("user_models:shared_relu_cnn", (1, 6, 6), 3)
    assert studied_layers(model) == ["act_fc"]
    one_line_error(lambda: studied_layers(model, ["relu"]), "layer 'relu' runs 2 times per forward.*mix")
    one_line_error(lambda: studied_layers(model, ["act_fc", "relu"]), "'relu' runs 2 times")


def test_unknown_layer_names_are_one_line_with_the_closest_name():
    model = built("lenet5", (1, 28, 28))
    one_line_error(lambda: studied_layers(model, ["relu_3"]), "unknown layer 'relu_3' \\(did you mean 'relu3'\\?\\)")
    tv = create_model("torchvision.models:resnet18", (3, 32, 32), 10)
    one_line_error(lambda: studied_layers(tv, ["layr2"]), "did you mean 'layer2'")


def test_proposal_matches_the_hand_chosen_layers_of_the_builtins():
    for name in ("lenet5", "small_cnn", "resnet18", "preact_resnet18"):
        model = copy.deepcopy(built(name, small_shape(name)))
        expected = list(model.default_layers)
        del model.default_layers
        assert studied_layers(model) == expected, name


def test_a_factory_returning_the_wrong_shape_is_one_line():
    one_line_error(lambda: create_model("user_models:wrong_logits", (1, 4, 4), 3),
                   "'user_models:wrong_logits' returned \\(2, 4\\).*\\(batch, num_classes\\) = \\(2, 3\\)")


def test_a_factory_with_neither_contract_is_one_line():
    message = one_line_error(lambda: create_model("user_models:no_contract", (1, 4, 4), 3),
                             "must take \\(input_shape, num_classes\\).*or num_classes alone")
    assert "(depth, width)" in message
