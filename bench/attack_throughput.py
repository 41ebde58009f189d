"""Benchmark 1, attack throughput: ns_core `pgd` (Linf, 10 steps) against torchattacks `PGD` and against
the bare limit, 10 x (forward + input-gradient backward), on the same model, batch and budget.

    python -m bench --only attack_throughput --quick

Targets: ours/theirs <= 0.9, ours/bare <= 1.05. The bare variant is what any PGD must pay:
the model's forward and input-gradient backward per step, parameters frozen, no projection.
`ours_channels_last` runs ours on a channels-last copy of the same model: a layout choice for the
model's owner, not for the attack, reported for reference (no target).
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from bench.harness import Context, interleave, make_case, result
from ns_core.attacks import pgd
from ns_core.models import create_model
from ns_core.utils import frozen_parameters

NAME = "attack_throughput"
EPS, STEPS = 8 / 255, 10
ALPHA = 2.5 * EPS / STEPS


def cases(ctx: Context) -> list[tuple[str, tuple[int, int, int], int]]:
    """(model, input shape, batch) per case: small CIFAR batches on CPU, large ones on a GPU."""
    if ctx.cuda:
        return [("lenet5", (1, 28, 28), 1024), ("resnet18", (3, 32, 32), ctx.pick(32, 256, 512))]
    return [("lenet5", (1, 28, 28), ctx.pick(32, 256, 256)), ("resnet18", (3, 32, 32), ctx.pick(2, 8, 16))]


def bare_pgd_cost(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.Tensor:
    """The limit: `steps` forward + input-gradient passes with nothing else (no start, no projection)."""
    with frozen_parameters(model):
        x = x.clone().requires_grad_(True)
        for _ in range(steps):
            (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return grad


def run_case(ctx: Context, model_name: str, shape: tuple[int, int, int], batch: int) -> dict:
    import torchattacks  # the peer; imported here so the rest of bench runs without it

    torch.manual_seed(0)
    model = create_model(model_name, shape, 10).to(ctx.device).eval()
    x = torch.rand(batch, *shape, device=ctx.device)
    y = torch.randint(0, 10, (batch,), device=ctx.device)
    generator = torch.Generator(device=ctx.device).manual_seed(0)
    theirs = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=True)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)  # same weights, NHWC layout
    variants = {
        "ours": lambda: pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=STEPS, generator=generator),
        "torchattacks": lambda: theirs(x, y),
        "bare": lambda: bare_pgd_cost(model, x, y, STEPS),
        "ours_channels_last": lambda: pgd(model_cl, x, y, eps=EPS, alpha=ALPHA, steps=STEPS, generator=generator),
    }
    times = interleave(variants, ctx.reps, ctx.warmup, ctx.device)
    return make_case(
        f"{model_name} b{batch}", times,
        ratios={"ours/torchattacks": ("ours", "torchattacks", 0.9), "ours/bare": ("ours", "bare", 1.05),
                "torchattacks/bare": ("torchattacks", "bare", None),
                "ours_channels_last/ours": ("ours_channels_last", "ours", None)},
        params={"model": model_name, "input_shape": list(shape), "batch": batch, "eps": EPS,
                "alpha": ALPHA, "steps": STEPS, "norm": "linf", "random_start": True})


def run(ctx: Context) -> dict:
    start = time.perf_counter()
    out = [run_case(ctx, *case) for case in cases(ctx)]
    notes = ["ours/torchattacks <= 0.9 needs ours to beat a peer that already sits near the bare floor: "
             "the best reachable value is (ours/bare) / (torchattacks/bare) with ours/bare >= 1.",
             "ours_channels_last/ours: the same attack on a channels-last copy of the model (layout is the "
             "model owner's choice; it helps both libraries alike)."]
    return result(ctx, NAME, "PGD-10 Linf: ns_core vs torchattacks vs 10 x (forward + input-grad)",
                  out, notes, time.perf_counter() - start)
