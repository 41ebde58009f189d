"""Objectives: the registry, the SNS regularizer's distances, its gradient path, warm-up and forward budget,
what each objective answers for itself, BatchNorm under SNS, and the collapse guards."""

import pytest
import torch
import torch.nn.functional as F

from ns_core.attacks import Attack
from ns_core.models import create_model
from ns_core.objectives import OBJECTIVES, TRADES, CatastrophicOverfitting, FastAT, TrainingCollapsed, create_objective
from ns_core.sensitivity import ActivationCapture
from ns_core.sns import SNS, neuron_distance

ATTACK = Attack("pgd", 0.2, steps=2)


@pytest.fixture
def lenet_batch():
    torch.manual_seed(0)
    model = create_model("lenet5", (1, 28, 28), 10)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    return model, x, y


def test_registry_names_and_errors():
    assert OBJECTIVES.names() == ["cas", "fast_at", "mart", "pgd_at", "sns", "standard", "trades"]
    with pytest.raises(ValueError, match="unknown method 'sn'.*Did you mean 'sns'"):
        create_objective("sn")
    with pytest.raises(ValueError, match="method 'sns' takes no parameter.*lamda; it takes: attack, base"):
        create_objective("sns", attack=ATTACK, lamda=0.1)
    with pytest.raises(ValueError, match="distance"):
        create_objective("sns", attack=ATTACK, distance="l3")
    with pytest.raises(ValueError, match="unknown sns base 'standard'"):
        create_objective("sns", attack=ATTACK, base="standard")


def test_objectives_answer_for_themselves(lenet_batch):
    model, x, y = lenet_batch
    sns = create_objective("sns", attack=ATTACK, layers=["relu3"], warmup_epochs=0, lam=1.0, fraction=0.5)
    plain = create_objective("pgd_at", attack=ATTACK)
    assert plain.watched_layers(model) == model.default_layers and sns.watched_layers(model) == ["relu3"]
    assert plain.selected_neurons() is None and sns.selected_neurons() is None and not sns.regularizer_active
    sns.on_epoch_start(model, 0, (x, y), torch.Generator().manual_seed(0))
    assert sns.regularizer_active and sns.selected_neurons()["relu3"].numel() == 60
    params = sns.params(model)
    assert params["sns.layers"] == ["relu3"] and params["sns.base"] == "pgd_at" and "trades.beta" not in params
    assert create_objective("trades", attack=ATTACK).params(model)["trades.beta"] == 6.0
    fast = create_objective("fast_at", attack=Attack("pgd", 0.3, steps=10))
    assert isinstance(fast, FastAT) and fast.attack == Attack("fgsm_rs", 0.3)
    assert fast.params(model)["attack.steps"] == 1


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
    sns = create_objective("sns", attack=ATTACK, base=base, lam=1.0, warmup_epochs=0, fraction=0.25)
    sns.on_epoch_start(model, 0, (x, y), torch.Generator().manual_seed(0))
    x_adv = sns.craft(model, x, y, torch.Generator().manual_seed(0))
    plain = create_objective(base, attack=ATTACK)
    n_plain = count_forwards(model, lambda: plain.loss(model, x, y, x_adv))
    n_sns = count_forwards(model, lambda: sns.loss(model, x, y, x_adv))
    assert n_sns == (2 if base == "pgd_at" else n_plain) and n_plain == (1 if base == "pgd_at" else 2)


def test_sns_warmup_uses_base_loss_then_adds_the_regularizer(lenet_batch):
    model, x, y = lenet_batch
    sns = create_objective("sns", attack=ATTACK, lam=0.5, warmup_epochs=1)
    assert sns.on_epoch_start(model, 0, (x, y)) == {"train/attack_eps": ATTACK.eps} and not sns.active
    x_adv = sns.craft(model, x, y, torch.Generator().manual_seed(0))
    loss, parts = sns.loss(model, x, y, x_adv)
    assert "sns_reg" not in parts
    assert loss.item() == pytest.approx(float(F.cross_entropy(model(x_adv), y).detach()), rel=1e-5)
    info = sns.on_epoch_start(model, 1, (x, y), torch.Generator().manual_seed(0))
    assert sns.active and set(sns.selected) == set(model.default_layers)
    assert info["probe/sensitivity_selected"] >= info["probe/sensitivity_all"]
    loss, parts = sns.loss(model, x, y, x_adv)
    assert loss.item() == pytest.approx(float(parts["ce_adv"] + 0.5 * parts["sns_reg"]), rel=1e-5)
    assert float(parts["sns_reg"]) > 0


def test_sns_reselects_only_when_due(lenet_batch):
    model, x, y = lenet_batch
    sns = create_objective("sns", attack=ATTACK, warmup_epochs=0, reselect_every=2)
    assert sns.on_epoch_start(model, 0, (x, y))  # selects
    assert sns.on_epoch_start(model, 1, (x, y)) == {"train/attack_eps": ATTACK.eps}  # keeps the selection
    assert sns.on_epoch_start(model, 2, (x, y))  # re-selects


def test_dead_layer_on_probe_is_a_collapse(lenet_batch):
    model, x, y = lenet_batch
    with torch.no_grad():
        model.fc1.weight.zero_()
        model.fc1.bias.fill_(-1.0)  # relu3 never fires
    sns = create_objective("sns", attack=ATTACK, warmup_epochs=0)
    with pytest.raises(TrainingCollapsed, match="relu3.*all zeros"):
        sns.on_epoch_start(model, 0, (x, y))


def test_trades_adversary_stays_in_the_ball_and_restores_mode(lenet_batch):
    model, x, y = lenet_batch
    model.train()
    trades = create_objective("trades", attack=Attack("pgd", 0.1, steps=3), beta=6.0)
    assert isinstance(trades, TRADES)
    x_adv = trades.craft(model, x, y, torch.Generator().manual_seed(0))
    assert model.training
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert all(p.grad is None for p in model.parameters())
    loss, parts = trades.loss(model, x, y, x_adv)
    assert loss.item() == pytest.approx(float(parts["ce_clean"] + 6.0 * parts["kl_adv"]), rel=1e-5)
    assert float(parts["kl_adv"]) > 0


def test_sns_state_round_trip():
    sns = create_objective("sns", attack=ATTACK)
    assert isinstance(sns, SNS)
    sns.selected = {"relu1": torch.tensor([2, 0])}
    other = create_objective("sns", attack=ATTACK)
    other.load_state_dict(sns.state_dict())
    assert other.selected["relu1"].tolist() == [2, 0]


def test_sns_and_its_base_differ_only_by_the_regularizer_on_batchnorm_models():
    """On a BatchNorm model, the benign forward SNS adds leaves the running statistics as PGD-AT leaves them, and
    with lam = 0 the gradients are PGD-AT's exactly."""
    torch.manual_seed(0)
    model = create_model("resnet18", (3, 16, 16), 10)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(6, 3, 16, 16, generator=g), torch.randint(0, 10, (6,), generator=g)
    x_adv = (x + 0.03 * torch.rand(x.shape, generator=g)).clamp(0, 1)
    sns = create_objective("sns", attack=ATTACK, lam=1.0, warmup_epochs=0, fraction=0.5, layers=["layer4"])
    sns.on_epoch_start(model, 0, (x, y), torch.Generator().manual_seed(0))
    sns.lam = 0.0  # the regularizer stays on, weighted zero
    results = {}
    for name, objective in (("pgd_at", create_objective("pgd_at", attack=ATTACK)), ("sns", sns)):
        copy = create_model("resnet18", (3, 16, 16), 10)
        copy.load_state_dict(model.state_dict())
        copy.train()
        loss, _ = objective.loss(copy, x, y, x_adv)
        grads = torch.autograd.grad(loss, list(copy.parameters()))
        results[name] = (grads, {k: v.clone() for k, v in copy.state_dict().items() if "running" in k})
    for a, b in zip(results["pgd_at"][0], results["sns"][0], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for key, value in results["pgd_at"][1].items():
        assert torch.equal(value, results["sns"][1][key]), key


def _history(clean, robust, warmup=0):
    return [{"epoch": i + 1, "val/clean_acc": c, "val/robust_acc": r, "val/sensitivity_all": 0.0}
            for i, (c, r) in enumerate(zip(clean, robust, strict=True))]


def test_sns_collapse_guard_counts_epochs_at_chance_after_warmup():
    sns = create_objective("sns", attack=ATTACK, warmup_epochs=2, collapse_patience=2)
    sns.check(_history([0.1, 0.1, 0.5], [0.1, 0.1, 0.3]), 10)  # at chance during warm-up: fine
    sns.check(_history([0.9, 0.9, 0.12], [0.6, 0.6, 0.1]), 10)  # one epoch at chance after warm-up: fine
    with pytest.raises(TrainingCollapsed, match="sat at chance for 2 epochs"):
        sns.check(_history([0.9, 0.9, 0.12, 0.1], [0.6, 0.6, 0.1, 0.1]), 10)


def test_fast_at_detects_catastrophic_overfitting_from_validation_pgd():
    fast = create_objective("fast_at", attack=ATTACK)
    fast.check(_history([0.8, 0.9, 0.92], [0.4, 0.5, 0.45]), 10)  # a wobble is not a collapse
    with pytest.raises(CatastrophicOverfitting, match="fell from 50.0% to 3.0% in epoch 3"):
        fast.check(_history([0.8, 0.9, 0.97], [0.4, 0.5, 0.03]), 10)
    sns = create_objective("sns", attack=ATTACK, base="fast_at", warmup_epochs=5)
    with pytest.raises(CatastrophicOverfitting):  # SNS asks its base too
        sns.check(_history([0.8, 0.9, 0.97], [0.4, 0.5, 0.03]), 10)
