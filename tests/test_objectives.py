"""Objectives: the registry, the SNS regularizer's distances, its gradient path, warm-up and forward budget."""

import pytest
import torch
import torch.nn.functional as F

from ns_core.models import create_model
from ns_core.objectives import (
    OBJECTIVES,
    SNS,
    TRADES,
    TrainingCollapsed,
    create_objective,
    neuron_distance,
    trades_adversary,
)
from ns_core.sensitivity import ActivationCapture


@pytest.fixture
def lenet_batch():
    torch.manual_seed(0)
    model = create_model("lenet5", (1, 28, 28), 10)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    return model, x, y


def test_registry_names_and_errors():
    assert OBJECTIVES.names() == ["pgd_at", "sns", "standard", "trades"]
    with pytest.raises(ValueError, match="unknown method 'sn'.*Did you mean 'sns'"):
        create_objective("sn")
    with pytest.raises(ValueError, match="bad parameters for method 'sns'.*lam"):
        create_objective("sns", lamda=0.1)
    with pytest.raises(ValueError, match="distance"):
        create_objective("sns", distance="l3")


def test_distances_on_known_values():
    benign = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])  # (B=1, k=2, dim=2)
    adv = torch.tensor([[[1.0, 0.0], [3.0, 4.0]]])
    assert float(neuron_distance(benign, adv, "l1")) == pytest.approx((0 + 2 + 3 + 4) / 4)
    assert float(neuron_distance(benign, adv, "l2")) == pytest.approx(((2**2 / 2) ** 0.5 + (25 / 2) ** 0.5) / 2)
    assert float(neuron_distance(benign, benign, "cosine")) == pytest.approx(0.0, abs=1e-6)
    assert float(neuron_distance(benign, adv, "relative")) == pytest.approx((2 / 3 + 7 / (0.1 * 1.5)) / 2, rel=1e-4)
    scalar_b, scalar_a = torch.tensor([[1.0, -1.0]]), torch.tensor([[0.0, 1.0]])  # linear neurons (B, k)
    assert float(neuron_distance(scalar_b, scalar_a, "l1")) == pytest.approx(1.5)
    assert float(neuron_distance(scalar_b, scalar_a, "relative")) == pytest.approx((1 / 1 + 2 / 1) / 2, rel=1e-4)


@pytest.mark.parametrize("distance", ["relative", "cosine"])
def test_scale_invariant_distances_ignore_a_rescaled_layer(distance):
    g = torch.Generator().manual_seed(0)
    benign, adv = torch.rand(4, 3, 5, 5, generator=g), torch.rand(4, 3, 5, 5, generator=g)
    assert float(neuron_distance(0.1 * benign, 0.1 * adv, distance)) == pytest.approx(
        float(neuron_distance(benign, adv, distance)), rel=1e-4)
    assert float(neuron_distance(0.1 * benign, 0.1 * adv, "l1")) == pytest.approx(
        0.1 * float(neuron_distance(benign, adv, "l1")), rel=1e-4)


def test_sns_regularizer_gradient_reaches_selected_neurons_only(lenet_batch):
    model, x, y = lenet_batch
    x_adv = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    with ActivationCapture(model, ["relu2", "relu3"]) as capture, torch.no_grad():
        model(x)
        acts = capture.pop()
    # two conv channels and one linear unit that fire on x (a silent ReLU passes no gradient anyway)
    selected = {"relu2": acts["relu2"].mean((0, 2, 3)).argsort(descending=True)[:2],
                "relu3": acts["relu3"].mean(0).argsort(descending=True)[:1]}
    full = {}

    def keep(name):
        def hook(_m, _i, out):
            full.setdefault(name, []).append(out)  # the whole layer output, in the graph
        return hook

    handles = [dict(model.named_modules())[n].register_forward_hook(keep(n)) for n in selected]
    with ActivationCapture(model, selected, channels=selected) as capture:
        model(x_adv)
        acts_adv = capture.pop()
        model(x)
        acts_clean = capture.pop()
    for h in handles:
        h.remove()
    for name, index in selected.items():
        # layer l's term, differentiated w.r.t. layer l's whole output (adv pass, then benign pass)
        term = neuron_distance(acts_clean[name], acts_adv[name], "l1")
        for grad in torch.autograd.grad(term, full[name], retain_graph=True):
            per_neuron = grad.abs().flatten(2).sum(2).sum(0) if grad.dim() > 2 else grad.abs().sum(0)
            others = torch.ones_like(per_neuron, dtype=torch.bool)
            others[index] = False
            assert float(per_neuron[others].max()) == 0.0, name
            assert float(per_neuron[index].min()) > 0.0, name


def count_forwards(model, fn):
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        fn()
    finally:
        handle.remove()
    return len(calls)


@pytest.mark.parametrize("base", ["pgd_at", "trades"])
def test_sns_spends_no_forward_beyond_the_benign_one(lenet_batch, base):
    model, x, y = lenet_batch
    sns = create_objective("sns", base=base, eps=0.2, steps=2, lam=1.0, warmup_epochs=0, fraction=0.25)
    sns.on_epoch_start(model, 0, (x, y), torch.Generator().manual_seed(0))
    x_adv = sns.craft(model, x, y, torch.Generator().manual_seed(0))
    plain = create_objective(base, eps=0.2, steps=2)
    n_plain = count_forwards(model, lambda: plain.loss(model, x, y, x_adv))
    n_sns = count_forwards(model, lambda: sns.loss(model, x, y, x_adv))
    assert n_sns == (2 if base == "pgd_at" else n_plain) and n_plain == (1 if base == "pgd_at" else 2)


def test_sns_warmup_uses_base_loss_then_adds_the_regularizer(lenet_batch):
    model, x, y = lenet_batch
    sns = create_objective("sns", eps=0.2, steps=2, lam=0.5, warmup_epochs=1)
    assert sns.on_epoch_start(model, 0, (x, y)) == {} and not sns.active
    x_adv = sns.craft(model, x, y, torch.Generator().manual_seed(0))
    loss, parts = sns.loss(model, x, y, x_adv)
    assert "sns_reg" not in parts
    assert loss.item() == pytest.approx(float(F.cross_entropy(model(x_adv), y).detach()), rel=1e-5)
    info = sns.on_epoch_start(model, 1, (x, y), torch.Generator().manual_seed(0))
    assert sns.active and set(sns.selected) == set(model.default_layers)
    assert info["probe_sensitivity_selected"] >= info["probe_sensitivity_all"]
    loss, parts = sns.loss(model, x, y, x_adv)
    assert loss.item() == pytest.approx(float(parts["ce_adv"] + 0.5 * parts["sns_reg"]), rel=1e-5)
    assert float(parts["sns_reg"]) > 0


def test_sns_reselects_only_when_due(lenet_batch):
    model, x, y = lenet_batch
    sns = create_objective("sns", eps=0.2, steps=2, warmup_epochs=0, reselect_every=2)
    assert sns.on_epoch_start(model, 0, (x, y))  # selects
    assert sns.on_epoch_start(model, 1, (x, y)) == {}  # keeps the selection
    assert sns.on_epoch_start(model, 2, (x, y))  # re-selects


def test_dead_layer_on_probe_is_a_collapse(lenet_batch):
    model, x, y = lenet_batch
    with torch.no_grad():
        model.fc1.weight.zero_()
        model.fc1.bias.fill_(-1.0)  # relu3 never fires
    sns = create_objective("sns", eps=0.2, steps=2, warmup_epochs=0)
    with pytest.raises(TrainingCollapsed, match="relu3.*all zeros"):
        sns.on_epoch_start(model, 0, (x, y))


def test_trades_adversary_stays_in_the_ball_and_restores_mode(lenet_batch):
    model, x, y = lenet_batch
    model.train()
    trades = create_objective("trades", eps=0.1, steps=3, beta=6.0)
    assert isinstance(trades, TRADES)
    x_adv = trades_adversary(model, x, trades.adversary, torch.Generator().manual_seed(0))
    assert model.training
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert all(p.grad is None for p in model.parameters())
    loss, parts = trades.loss(model, x, y, x_adv)
    assert loss.item() == pytest.approx(float(parts["ce_clean"] + 6.0 * parts["kl_adv"]), rel=1e-5)
    assert float(parts["kl_adv"]) > 0


def test_sns_state_round_trip():
    sns = create_objective("sns")
    assert isinstance(sns, SNS)
    sns.selected = {"relu1": torch.tensor([2, 0])}
    other = create_objective("sns")
    other.load_state_dict(sns.state_dict())
    assert other.selected["relu1"].tolist() == [2, 0]
