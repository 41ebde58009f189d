"""Neuron sensitivity: exact values on hand-built layers, streaming invariance, selection, Arrow schema."""

import pyarrow as pa
import pytest
import torch
from torch import nn

from ns_core.sensitivity import SENSITIVITY_SCHEMA, ActivationCapture, SensitivityMap, measure_sensitivity


class Tiny(nn.Module):
    """conv(1->2, 2x2) -> relu -> flatten -> linear(8->3) -> relu -> linear(3->2): known weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, kernel_size=2, bias=False)
        self.act = nn.ReLU()
        self.fc = nn.Linear(2 * 2 * 2, 3)
        self.fc_act = nn.ReLU()
        self.head = nn.Linear(3, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]], [[[0.5, -1.0], [2.0, 0.0]]]]))
            self.fc.weight.copy_(torch.arange(24, dtype=torch.float32).reshape(3, 8) / 24 - 0.4)
            self.fc.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        self.default_layers = ["act", "fc_act"]

    def forward(self, x):
        return self.head(self.fc_act(self.fc(self.act(self.conv(x)).flatten(1))))


def random_pairs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 3, 3, generator=g)
    x_adv = (x + 0.3 * torch.randn(n, 1, 3, 3, generator=g)).clamp(0, 1)
    return x, x_adv


def hand_sensitivity(model: Tiny, x: torch.Tensor, x_adv: torch.Tensor):
    """The docs/design.md formula with explicit loops over examples and neurons."""
    with torch.no_grad():
        conv = lambda t: torch.relu(model.conv(t))  # noqa: E731
        fc = lambda t: torch.relu(model.fc(conv(t).flatten(1)))  # noqa: E731
        a_b, a_a, f_b, f_a = conv(x), conv(x_adv), fc(x), fc(x_adv)
    n = x.shape[0]
    conv_sigma, conv_benign = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    for i in range(n):
        for m in range(2):
            dim = a_b[i, m].numel()
            conv_sigma[m] += (a_b[i, m] - a_a[i, m]).abs().sum().double() / dim / n
            conv_benign[m] += a_b[i, m].abs().sum().double() / dim / n
    conv_rel = conv_sigma / conv_benign
    fc_sigma = torch.zeros(3, dtype=torch.float64)
    for i in range(n):
        for m in range(3):
            fc_sigma[m] += (f_b[i, m] - f_a[i, m]).abs().double() / n
    return conv_sigma, conv_rel, fc_sigma


def test_matches_hand_computed_values_on_conv_and_linear_layers():
    model = Tiny()
    x, x_adv = random_pairs(7)
    smap = measure_sensitivity(model, [(x, x_adv)], ["act", "fc_act"])
    conv_sigma, conv_rel, fc_sigma = hand_sensitivity(model, x, x_adv)
    torch.testing.assert_close(smap.absolute["act"], conv_sigma, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(smap.relative["act"], conv_rel, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(smap.absolute["fc_act"], fc_sigma, rtol=1e-6, atol=1e-9)
    assert smap.num_pairs == 7
    assert smap.absolute["act"].sum() > 0  # the fixture perturbs enough to move activations


def test_one_batch_equals_many_batches():
    model = Tiny()
    x, x_adv = random_pairs(20, seed=1)
    whole = measure_sensitivity(model, [(x, x_adv)], model.default_layers)
    chunks = [(x[i:i + 3], x_adv[i:i + 3]) for i in range(0, 20, 3)]
    streamed = measure_sensitivity(model, iter(chunks), model.default_layers)  # a generator: streaming
    for layer in model.default_layers:
        torch.testing.assert_close(whole.absolute[layer], streamed.absolute[layer], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(whole.relative[layer], streamed.relative[layer], rtol=1e-6, atol=1e-9)
    assert streamed.num_pairs == 20


def test_identical_inputs_have_zero_sensitivity_and_silent_neurons_keep_relative_finite():
    model = Tiny()
    x, _ = random_pairs(4)
    smap = measure_sensitivity(model, [(x, x.clone())], model.default_layers)
    assert all(float(s.abs().max()) == 0.0 for s in smap.absolute.values())
    with torch.no_grad():
        model.conv.weight[0].zero_()  # conv neuron 0 never fires: its relative sensitivity stays finite
    smap = measure_sensitivity(model, [random_pairs(4)], ["act"])
    assert torch.isfinite(smap.relative["act"]).all()
    assert smap.alive()["act"].tolist() == [False, True]


def test_model_mode_restored_and_hooks_removed():
    model = Tiny().train()
    measure_sensitivity(model, [random_pairs(3)], ["act"])
    assert model.training
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_unknown_layer_names_the_valid_layers():
    with pytest.raises(ValueError, match="unknown layer 'nope'.*fc_act"):
        measure_sensitivity(Tiny(), [random_pairs(2)], ["nope"])


def test_top_fraction_picks_most_sensitive_at_least_one():
    smap = SensitivityMap(
        absolute={"a": torch.tensor([0.1, 0.9, 0.5, 0.3], dtype=torch.float64),
                  "b": torch.tensor([2.0, 1.0], dtype=torch.float64)},
        relative={"a": torch.zeros(4, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)},
        benign_activation={"a": torch.ones(4, dtype=torch.float64), "b": torch.ones(2, dtype=torch.float64)},
        num_pairs=1,
    )
    top = smap.top(0.5)
    assert top["a"].tolist() == [1, 2]
    assert top["b"].tolist() == [0]
    assert smap.top(0.01)["a"].tolist() == [1]  # at least one per layer
    assert smap.mean(selected=top) == pytest.approx((0.9 + 0.5 + 2.0) / 3)
    with pytest.raises(ValueError, match="fraction"):
        smap.top(0.0)


def test_arrow_table_schema_ranks_and_round_trip():
    model = Tiny()
    smap = measure_sensitivity(model, [random_pairs(5)], model.default_layers, metadata={"attack": "pgd"})
    table = smap.to_arrow(selected=smap.top(0.34))
    assert table.schema.remove_metadata().equals(SENSITIVITY_SCHEMA)
    assert table.num_rows == 2 + 3
    rows = table.to_pylist()
    for layer in model.default_layers:
        layer_rows = sorted((r for r in rows if r["layer"] == layer), key=lambda r: r["rank"])
        assert [r["rank"] for r in layer_rows] == list(range(len(layer_rows)))
        assert layer_rows[0]["sensitivity"] == max(r["sensitivity"] for r in layer_rows)
        assert layer_rows[0]["selected"]
    assert table.schema.metadata[b"attack"] == b"pgd" and table.schema.metadata[b"num_pairs"] == b"5"
    back = SensitivityMap.from_arrow(pa.Table.from_pylist(rows, schema=table.schema))
    torch.testing.assert_close(back.absolute["fc_act"], smap.absolute["fc_act"])
    assert back.num_pairs == 5


def test_capture_keeps_only_chosen_channels_with_gradient():
    model = Tiny()
    x, _ = random_pairs(2)
    with ActivationCapture(model, ["act"], channels={"act": torch.tensor([1])}) as capture:
        model(x)
        out = capture.pop()["act"]
    assert out.shape == (2, 1, 2, 2) and out.requires_grad
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
