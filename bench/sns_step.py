"""Benchmark, SNS step overhead: one SNS training step against one PGD-AT step (same model, batch and
PGD-10 adversary), with TRADES for reference, and the one-step base method fast_at (FGSM from a random
start: 2 passes per step instead of PGD-10's 11).

    python -m bench --only sns_step --quick

A step is what the Trainer does per batch: craft + loss + zero_grad + backward + optimizer.step, in
train mode. Target: sns/pgd_at <= 1.12. The `floor` variant is PGD-AT plus the one extra
benign forward and backward that SNS cannot avoid (its loss adds 0.1 x clean cross-entropy), so
sns/floor isolates what the hooks and the regularizer cost on top of that.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from bench.harness import Context, interleave, make_case, result
from ns_core.attacks import Attack
from ns_core.models import create_model
from ns_core.objectives import Objective, create_objective

NAME = "sns_step"
EPS, STEPS = 8 / 255, 10


class FloorObjective(Objective):
    """PGD-AT plus an extra benign forward and backward: the least any SNS step can cost."""

    name = "floor"

    def __init__(self, pgd_at: Objective) -> None:
        self.pgd_at = pgd_at

    def craft(self, model, x, y, generator=None):
        return self.pgd_at.craft(model, x, y, generator)

    def loss(self, model, x, y, x_adv):
        ce_adv = F.cross_entropy(model(x_adv), y)
        return ce_adv + 0.1 * F.cross_entropy(model(x), y), {}


def cases(ctx: Context) -> list[tuple[str, tuple[int, int, int], int]]:
    if ctx.cuda:
        return [("lenet5", (1, 28, 28), 256), ("resnet18", (3, 32, 32), ctx.pick(16, 128, 256))]
    return [("lenet5", (1, 28, 28), ctx.pick(32, 128, 128)), ("resnet18", (3, 32, 32), ctx.pick(2, 4, 8))]


def make_step(model: torch.nn.Module, objective: Objective, x, y, generator):
    """A closure running one training step of `objective` on its own copy of the model and optimizer."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()

    def step() -> None:
        x_adv = objective.craft(model, x, y, generator)
        loss, _parts = objective.loss(model, x, y, x_adv)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def run(ctx: Context) -> dict:
    start = time.perf_counter()
    out = []
    for model_name, shape, batch in cases(ctx):
        torch.manual_seed(0)
        base = create_model(model_name, shape, 10).to(ctx.device)
        x = torch.rand(batch, *shape, device=ctx.device)
        y = torch.randint(0, 10, (batch,), device=ctx.device)
        probe = (torch.rand(2 * batch, *shape, device=ctx.device),
                 torch.randint(0, 10, (2 * batch,), device=ctx.device))
        generator = torch.Generator(device=ctx.device).manual_seed(0)
        params = {"attack": Attack("pgd", EPS, steps=STEPS)}
        sns = create_objective("sns", **params, lam=0.1, fraction=0.1, warmup_epochs=0)
        sns_model = copy.deepcopy(base)
        sns.on_epoch_start(sns_model, 0, probe, generator)  # select the sensitive neurons once
        objectives = {"pgd_at": (create_objective("pgd_at", **params), copy.deepcopy(base)),
                      "sns": (sns, sns_model),
                      "floor": (FloorObjective(create_objective("pgd_at", **params)), copy.deepcopy(base)),
                      "trades": (create_objective("trades", **params), copy.deepcopy(base)),
                      "fast_at": (create_objective("fast_at", **params), copy.deepcopy(base))}
        variants = {name: make_step(model, obj, x, y, generator) for name, (obj, model) in objectives.items()}
        times = interleave(variants, ctx.reps, ctx.warmup, ctx.device)
        out.append(make_case(
            f"{model_name} b{batch}", times,
            ratios={"sns/pgd_at": ("sns", "pgd_at", 1.12), "floor/pgd_at": ("floor", "pgd_at", None),
                    "sns/floor": ("sns", "floor", None), "trades/pgd_at": ("trades", "pgd_at", None),
                    "fast_at/pgd_at": ("fast_at", "pgd_at", None)},
            params={"model": model_name, "input_shape": list(shape), "batch": batch, "eps": EPS, "steps": STEPS,
                    "sns": {"lam": 0.1, "fraction": 0.1, "distance": "l1", "layers": list(sns.selected),
                            "selected_neurons": {k: int(v.numel()) for k, v in sns.selected.items()}},
                    "optimizer": "sgd(lr=1e-3, momentum=0.9)"}))
    return result(ctx, NAME, "one training step: SNS vs PGD-AT (PGD-10), TRADES for reference", out,
                  ["floor = PGD-AT + one extra benign forward/backward, the cost SNS cannot avoid"],
                  time.perf_counter() - start)
