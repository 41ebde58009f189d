"""Activation patching and model comparison: exact effects on hand-built models, full-layer patches,
the scaled-activations trap for absolute sensitivity, seeded random baselines."""

import copy

import pytest
import torch
from torch import nn

from ns_core.attacks import Attack
from ns_core.interpret import (
    ActivationPatch,
    attack_batches,
    check_same_architecture,
    compare_models,
    patch_selections,
    stabilize_curve,
)
from ns_core.models import create_model
from ns_core.sensitivity import ActivationCapture, measure_sensitivity
from orchestrator.run import build_trainer, load_data


def mlp() -> nn.Sequential:
    """linear(3->4) -> relu -> linear(4->2) with known weights."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -1.0, 0.5], [0.2, 0.3, -0.4], [-1.0, 2.0, 1.0], [0.5, 0.5, 0.5]]))
        model[0].bias.copy_(torch.tensor([0.1, 0.2, -0.1, 0.0]))
        model[2].weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 1.5], [-1.0, 1.0, 2.0, -0.5]]))
        model[2].bias.copy_(torch.tensor([0.3, -0.3]))
    return model


def test_patch_replaces_exactly_the_chosen_neurons_of_a_linear_layer():
    model = mlp()
    x = torch.tensor([[0.2, 0.9, 0.4], [1.0, 0.1, 0.7], [0.5, 0.5, 0.5]])
    values = torch.tensor([[9.0, 8.0, 7.0, 6.0], [5.0, 4.0, 3.0, 2.0], [1.0, 1.5, 2.5, 3.5]])
    hidden = torch.relu(x @ model[0].weight.T + model[0].bias)
    patched = hidden.clone()
    patched[:, [0, 2]] = values[:, [0, 2]]
    expected = patched @ model[2].weight.T + model[2].bias
    with torch.no_grad():
        before = model(x)
        with ActivationPatch(model, {"1": torch.tensor([0, 2])}, {"1": values}):
            out = model(x)
        after = model(x)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, before)
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # hooks gone


def test_patch_replaces_whole_channel_maps_and_nothing_else():
    conv = nn.Sequential(nn.Conv2d(1, 3, 2), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 2, 2))
    x, x_other = torch.rand(4, 1, 3, 3), torch.rand(4, 1, 3, 3)
    with torch.no_grad(), ActivationCapture(conv, ["0", "1"]) as capture:
        conv(x_other)
        other = capture.pop()
        conv(x)
        plain = capture.pop()
        with ActivationPatch(conv, {"1": torch.tensor([1])}, {"1": other["1"]}):
            conv(x)
            seen = capture.pop()  # capture's hook runs before the patch: it sees layer 1's own output
            out = conv(x)
    torch.testing.assert_close(seen["0"], plain["0"], rtol=0, atol=0)  # upstream layer untouched
    patched = plain["1"].clone()
    patched[:, 1] = other["1"][:, 1]
    torch.testing.assert_close(out, conv[3](patched.flatten(1)))


def test_patch_rejects_values_of_the_wrong_shape_and_unknown_layers():
    model = mlp()
    with pytest.raises(ValueError, match="shape"), ActivationPatch(model, {"1": torch.tensor([0])},
                                                                   {"1": torch.zeros(2, 4)}):
        model(torch.rand(3, 3))
    with pytest.raises(ValueError, match="unknown layer 'nope'"):
        ActivationPatch(model, {"nope": torch.tensor([0])}, {})


@pytest.fixture(scope="module")
def patched_setup(make_experiment_module):
    """A standard LeNet-5 after one epoch on the 3,500 digits (~90% clean), 256 test digits and their PGD twins."""
    experiment = make_experiment_module("standard", epochs=1, train_limit=None, **{"train.lr": 3e-3})
    data = load_data(experiment)
    trainer = build_trainer(experiment, data)
    trainer.fit()
    model = trainer.model.eval().to(memory_format=torch.contiguous_format)
    x, y = data.test.take(256)
    x_adv = attack_batches(model, x, y, Attack("pgd", 0.3, steps=5), seed=0)
    probe_x, probe_y = data.train.take(256)
    probe_adv = attack_batches(model, probe_x, probe_y, Attack("pgd", 0.3, steps=5), seed=1)
    smap = measure_sensitivity(model, [(probe_x, probe_adv)], model.default_layers)
    return model, x, x_adv, y, smap


def test_patching_every_neuron_of_a_layer_gives_the_benign_forward(patched_setup):
    model, x, x_adv, y, smap = patched_setup
    for layer in model.default_layers:
        with torch.no_grad(), ActivationCapture(model, [layer]) as capture:
            benign_logits = model(x)
            benign = capture.pop()
            width = benign[layer].shape[1]
            with ActivationPatch(model, {layer: torch.arange(width)}, benign):
                patched_logits = model(x_adv)
        torch.testing.assert_close(patched_logits, benign_logits, rtol=0, atol=0)
    rows = stabilize_curve(model, x, x_adv, y, "relu2", [1.0], smap, random_draws=2,
                           generator=torch.Generator().manual_seed(0))
    assert rows[0]["adversarial_accuracy"] < rows[0]["clean_accuracy"] - 0.2  # the attack bites
    assert all(r["accuracy"] == r["clean_accuracy"] and r["recovered"] == 1.0 for r in rows)


def test_stabilize_draws_are_seeded_and_sensitive_is_the_top_k(patched_setup):
    model, x, x_adv, y, smap = patched_setup
    run = lambda seed: stabilize_curve(model, x, x_adv, y, "relu3", [0.1, 0.5], smap, random_draws=3,  # noqa: E731
                                       generator=torch.Generator().manual_seed(seed))
    first, again, other = run(0), run(0), run(1)
    assert first == again
    assert [r for r in first if r["selection"] == "sensitive"] == [r for r in other if r["selection"] == "sensitive"]
    assert first != other
    patches = patch_selections(smap, "relu3", [0.1], 4, torch.Generator().manual_seed(0))
    top = torch.argsort(smap.absolute["relu3"], descending=True)[:12]
    sensitive = [index for selection, *_, index in patches if selection == "sensitive"]
    assert set(sensitive[0].tolist()) == set(top.tolist())
    alive = smap.benign_activation["relu3"] > 0
    for selection, _, k, _, index in patches:
        assert len(index) == k == 12 and len(set(index.tolist())) == 12
        if selection == "random_alive":
            assert bool(alive[index].all())


def test_compare_ranks_a_model_with_halved_activations_lower_in_absolute_terms_only(patched_setup):
    model, x, _, y, _ = patched_setup
    scaled = copy.deepcopy(model)
    with torch.no_grad():  # relu2 outputs halve (ReLU and max pooling are positively homogeneous) ...
        scaled.conv2.weight.mul_(0.5)
        scaled.conv2.bias.mul_(0.5)
        scaled.fc1.weight.mul_(2.0)  # ... and fc1 undoes it: the logits do not change
    torch.testing.assert_close(scaled(x), model(x))
    comparison = compare_models({"unscaled": model, "scaled": scaled}, x[:128], y[:128], Attack("pgd", 0.3, steps=3),
                                shared_source=model)
    verdict = {(r["source"], r["layer"], r["model"]): r for r in comparison.verdict_table().to_pylist()}
    for source in ("own", "shared"):
        row = verdict[source, "relu2", "scaled"]
        assert row["absolute_ratio"] == pytest.approx(0.5, rel=1e-6)
        assert row["relative_ratio"] == pytest.approx(1.0, rel=1e-6)
        assert row["absolute_rank"] == 0 and row["verdict"] == "lower_absolute_only"
        assert verdict[source, "relu2", "unscaled"]["verdict"] == "reference"
        for layer in ("relu1", "relu3", "relu4"):
            assert verdict[source, layer, "scaled"]["absolute_ratio"] == pytest.approx(1.0, rel=1e-6)
    stats = comparison.stats_table().to_pylist()
    assert {r["layer"] for r in stats} == {"relu1", "relu2", "relu3", "relu4", "(all)"}
    assert comparison.accuracy["scaled"] == pytest.approx(comparison.accuracy["unscaled"])
    assert comparison.neurons_table().num_rows == 2 * 2 * (6 + 16 + 120 + 84)


def test_compare_refuses_models_of_different_architectures():
    lenet = create_model("lenet5", (1, 28, 28), 10)
    cnn = create_model("small_cnn", (1, 28, 28), 10)
    with pytest.raises(ValueError, match="one architecture"):
        check_same_architecture({"a": lenet, "b": cnn})
