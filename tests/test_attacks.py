"""Contract suite run over every registered attack (both norms for pgd and AutoAttack's APGD-CE), the `Attack`
description and its threat-model guards, and PGD and APGD-CE against torchattacks.

The contract model is a small MLP (with BatchNorm and Dropout, so a wrong mode shows) trained for a
second on scikit-learn's 8x8 digits; an identity attack fails `test_stronger_than_same_norm_noise`.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from ns_core.attacks import (
    ATTACKS,
    Attack,
    attack_parameters,
    check_threat_model,
    cw_margin_loss,
    parse_eps,
    pgd,
)
from ns_core.utils import make_generator

FAST = {"feature_pgd": {"layers": ["3"]},  # the ReLU of the contract MLP; budgets kept small for AutoAttack's
        "apgd_t": {"steps": 20}, "fab_t": {"steps": 10}, "square": {"steps": 2000}}  # stages (test time)
CASES = [(name, FAST.get(name, {})) for name in ATTACKS.names()]
CASES += [("pgd", {"norm": "l2"}), ("apgd_ce", {"norm": "l2"})]
IDS = [name + "-" + params.get("norm", "linf") for name, params in CASES]


def run_attack(name, model, x, y, **params):
    if name == "autoattack":  # the whole standard version: on 48 examples it still runs every stage
        x, y = x[:48], y[:48]
    return ATTACKS.get(name)(model, x, y, **params)
EPS = {"linf": 0.1, "l2": 1.0}  # on 8x8 digits in [0, 1]


def _eps(params: dict) -> float:
    return EPS[params.get("norm", "linf")]


def _within(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> bool:
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
    return bool((size <= eps + (1e-6 if norm == "linf" else 1e-5)).all() and x_adv.min() >= 0 and x_adv.max() <= 1)


@pytest.fixture(scope="module")
def digits():
    """(model in eval mode, x_test (397, 1, 8, 8), y_test): ~92% clean accuracy."""
    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(data.target, dtype=torch.int64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.1),
                              nn.Linear(64, 10))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(100):
            optimizer.zero_grad()
            F.cross_entropy(model(x[:1400]), y[:1400]).backward()
            optimizer.step()
    model.eval().zero_grad(set_to_none=True)
    return model, x[1400:], y[1400:]


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_within_eps_ball_and_box(digits, name, params):
    model, x, y = digits
    x_adv = run_attack(name, model, x, y, eps=_eps(params), generator=make_generator(0), **params)
    x = x[:len(x_adv)]
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert _within(x_adv, x, _eps(params), params.get("norm", "linf"))
    assert not torch.equal(x_adv, x)


@pytest.mark.parametrize("start", ["train", "eval-with-one-train-child"])
@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_model_left_as_found(digits, name, params, start):
    model, x, y = digits
    model = copy.deepcopy(model)
    if start == "train":
        model.train()
    else:
        model[4].train()  # dropout left in train mode inside an eval model
    modes = [m.training for m in model.modules()]
    model[1].weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    running_mean = model[2].running_mean.clone()
    run_attack(name, model, x, y, eps=_eps(params), **params)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model[2].running_mean, running_mean)  # crafted in eval mode: BN stats untouched


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_seeded_generator_repeats(digits, name, params):
    model, x, y = digits
    state = torch.random.get_rng_state()
    first, again, other = (run_attack(name, model, x, y, eps=_eps(params), generator=make_generator(s), **params)
                           for s in (7, 7, 8))
    assert torch.equal(first, again)
    if attack_parameters(name).get("random_start") is True:
        assert not torch.equal(first, other)
    assert torch.equal(torch.random.get_rng_state(), state)  # randomness comes from the generator, never the global RNG


def test_autoattack_stages_leave_the_global_rng_alone(digits):
    model, x, y = digits
    state = torch.random.get_rng_state()
    ATTACKS.get("apgd_ce")(model, x[:16], y[:16], eps=0.1, steps=5, generator=make_generator(0))
    assert torch.equal(torch.random.get_rng_state(), state)  # pyautoattack reseeds it; we put it back


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_eps_zero_returns_x(digits, name, params):
    model, x, y = digits
    x_adv = run_attack(name, model, x, y, eps=0.0, generator=make_generator(0), **params)
    assert torch.equal(x_adv, x[:len(x_adv)])


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_stronger_than_same_norm_noise(digits, name, params):
    model, x, y = digits
    eps, norm = _eps(params), params.get("norm", "linf")
    generator = make_generator(0)
    if norm == "linf":  # a corner of the ball: the largest Linf noise
        noise = eps * torch.randint(0, 2, x.shape, generator=generator).mul(2).sub(1)
    else:
        noise = torch.randn(x.shape, generator=generator)
        noise *= eps / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    noise_accuracy = _accuracy(model, (x + noise).clamp(0, 1), y)
    x_adv = run_attack(name, model, x, y, eps=eps, **params)
    attack_accuracy = _accuracy(model, x_adv, y[:len(x_adv)])
    assert noise_accuracy > 0.85
    assert attack_accuracy < noise_accuracy - 0.4, (attack_accuracy, noise_accuracy)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_restarts_keep_every_fooled_example(digits, norm):
    model, x, y = digits
    eps = EPS[norm] / 2
    single, multi = (pgd(model, x, y, eps=eps, steps=3, norm=norm, restarts=r, generator=make_generator(5))
                     for r in (1, 4))  # the first restart draws the same start in both
    with torch.no_grad():
        fooled_single, fooled_multi = model(single).argmax(1) != y, model(multi).argmax(1) != y
    assert _within(multi, x, eps, norm)
    assert not (fooled_single & ~fooled_multi).any()
    assert fooled_multi.sum() > fooled_single.sum()


def test_pgd_examples_are_independent_of_the_batch(digits):
    model, x, y = digits
    whole = pgd(model, x[:64], y[:64], eps=1.0, norm="l2", random_start=False)
    halves = torch.cat([pgd(model, x[i:i + 32], y[i:i + 32], eps=1.0, norm="l2", random_start=False)
                        for i in (0, 32)])
    torch.testing.assert_close(whole, halves, atol=1e-5, rtol=0)


def test_cw_margin_loss():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    torch.testing.assert_close(cw_margin_loss(logits, torch.tensor([0, 0])), torch.tensor([-1.0, 3.0]))


@pytest.mark.parametrize(
    ("make", "match"),
    [(lambda: Attack("pgdd", 0.1), "choose one of: apgd_ce, apgd_t, autoattack, cas_pgd, cw_linf"),
     (lambda: Attack("fgsm", 0.1, steps=3), "single-step attack"),
     (lambda: Attack("pgd", 0.1, norm="l1"), "choose one of: linf, l2"),
     (lambda: Attack("mim", 0.1, norm="l2"), "linf only"),
     (lambda: Attack("pgd", -0.1), "eps must be a finite number >= 0"),
     (lambda: Attack("pgd", 8), r"did you mean 8/255 = 0.03137\?"),
     (lambda: Attack("fgsm", 0.1, restarts=3), "restarts must be 1"),
     (lambda: Attack("pgd", 0.1, layers=("relu1",)), "only feature_pgd"),
     (lambda: Attack.parse("pgd:8/0"), "EPS must be a number or a fraction like 8/255, got '8/0'"),
     (lambda: Attack.parse("pgd:0.1:many"), "STEPS and RESTARTS must be whole numbers"),
     (lambda: Attack.parse("pgd"), "write NAME:EPS"),
     (lambda: check_threat_model("l2", 40.0, "attack", (1, 28, 28)), "exceeds the diameter"),
     (lambda: ATTACKS.get("pgd")(None, None, None, eps=0.1, loss="hinge"), "choose one of: ce, cw")],
)
def test_bad_attacks_are_one_line_errors_that_name_the_fix(make, match):
    with pytest.raises(ValueError, match=match) as info:
        make()
    assert "\n" not in str(info.value)


def test_attack_description_parses_labels_and_round_trips():
    attack = Attack.parse("pgd:8/255:10:linf:2")
    assert attack == Attack("pgd", 8 / 255, steps=10, restarts=2)
    assert attack.label == "pgd-linf-eps0.0313725-s10-r2" and attack.threat_model == ("linf", 8 / 255)
    assert Attack.parse("autoattack:0.3") == Attack("autoattack", 0.3) and parse_eps("0.25") == 0.25
    assert Attack("cw_linf", 0.1).steps_used == 30 and Attack("fgsm", 0.1).steps_used == 1
    assert Attack.from_dict(Attack("feature_pgd", 0.1, layers=("a", "b")).to_dict()).layers == ("a", "b")
    assert Attack("pgd", 0.1).params() == {"eps": 0.1, "norm": "linf", "restarts": 1}


@pytest.mark.slow
def test_pgd_agrees_with_torchattacks():
    import torchattacks  # dev dependency, installed with --no-deps (docs/design.md, field notes)

    from ns_core.data import load_dataset
    from ns_core.models import create_model

    splits = load_dataset("mnist5k")
    x_train, y_train = splits.train.take()
    x, y = splits.test.take()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model("lenet5", splits.input_shape, splits.num_classes)
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        for i in range(0, len(x_train), 64):  # one epoch: ~88% clean
            optimizer.zero_grad()
            F.cross_entropy(model(x_train[i:i + 64]), y_train[i:i + 64]).backward()
            optimizer.step()
        model.eval()
        eps, alpha, steps = 0.1, 0.025, 10
        ours = _accuracy(model, pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, generator=make_generator(0)), y)
        reference = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
        theirs = _accuracy(model, reference(x, y), y)
    assert 0.05 < theirs < 0.95, theirs  # an attack that neither always nor never wins: the comparison means something
    assert abs(ours - theirs) <= 0.02, (ours, theirs)


@pytest.mark.slow
def test_apgd_ce_agrees_with_torchattacks_apgd(digits):
    """Our APGD-CE stage is AutoAttack's reference code; torchattacks' APGD is an independent port."""
    import torchattacks

    model, x, y = digits
    for norm, eps in (("linf", 0.05), ("l2", 0.5)):
        ours = _accuracy(model, ATTACKS.get("apgd_ce")(model, x, y, eps=eps, norm=norm, generator=make_generator(0)), y)
        reference = torchattacks.APGD(model, norm="Linf" if norm == "linf" else "L2", eps=eps, steps=100, seed=0,
                                      loss="ce")
        theirs = _accuracy(model, reference(x, y), y)
        assert 0.05 < theirs < 0.95, (norm, theirs)
        assert abs(ours - theirs) <= 0.03, (norm, ours, theirs)
