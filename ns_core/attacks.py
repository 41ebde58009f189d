"""Adversarial attacks in pixel space: fgsm, pgd (linf / l2, restarts, ce / cw loss), mim, cw_linf.

Every attack is one function `attack(model, x, y, *, eps, ...) -> x_adv` on [0, 1] inputs (the
model owns its normalization). Contract: x_adv is detached, inside the eps-ball around x and inside
[0, 1]; the model runs in eval mode and gets its modes back; no gradient reaches its parameters
(inputs only, via `torch.autograd.grad`); a `generator` makes random starts repeatable; eps=0
returns x exactly. Per step: one forward, one input gradient, no host-device sync.

    x_adv = pgd(model, x, y, eps=0.3, steps=20, generator=make_generator(0, x.device))
    x_adv = run_attack("cw_linf", model, x, y, eps=0.3)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ns_core.registry import Registry
from ns_core.utils import eval_mode, frozen_parameters

ATTACKS = Registry("attack")
NORMS = ("linf", "l2")
LossFn = Callable[[Tensor, Tensor], Tensor]


def cw_margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example Carlini-Wagner margin `max_{j != y} z_j - z_y` (N,); positive iff misclassified."""
    true = logits.gather(1, y[:, None]).squeeze(1)  # (N,)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)  # (N,) best wrong class
    return other - true


def ce_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example cross-entropy (N,)."""
    return F.cross_entropy(logits, y, reduction="none")


LOSSES: dict[str, LossFn] = {"ce": ce_loss, "cw": cw_margin_loss}


def input_gradient(model: nn.Module, x: Tensor, y: Tensor, loss: str = "ce") -> Tensor:
    """Gradient of the summed per-example loss w.r.t. the input (same shape as x), model in eval mode."""
    with eval_mode(model), frozen_parameters(model):
        return _grad(model, x.detach().clone(), y, _loss_fn(loss))


def _grad(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
    # Sum, not mean: a per-example step must not depend on the batch size.
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(model(x), y).sum(), x)
    x.requires_grad_(False)
    return grad


def _loss_fn(loss: str) -> LossFn:
    if loss not in LOSSES:
        raise ValueError(f"unknown attack loss {loss!r}; choose one of: {', '.join(LOSSES)}")
    return LOSSES[loss]


def _check(eps: float, steps: int = 1, restarts: int = 1, norm: str = "linf") -> None:
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if steps < 1 or restarts < 1:
        raise ValueError(f"steps and restarts must be >= 1, got steps={steps}, restarts={restarts}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of: {', '.join(NORMS)}")


def _per_example(v: Tensor, x: Tensor) -> Tensor:
    return v.view(-1, *([1] * (x.dim() - 1)))  # (N,) -> (N, 1, 1, ...) to broadcast over x


def _l2(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1)  # (N,)


def _start(x: Tensor, eps: float, norm: str, random_start: bool, generator: torch.Generator | None) -> Tensor:
    """A fresh x_adv: x itself, or a uniform point of the eps-ball (clipped to [0, 1])."""
    if not random_start:
        return x.clone()
    device = generator.device if generator is not None else x.device
    if norm == "linf":
        noise = torch.rand(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
        delta = noise.mul_(2 * eps).sub_(eps)
    else:  # Gaussian direction, radius uniform in [0, eps] (as torchattacks PGDL2)
        direction = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
        radius = torch.rand(x.shape[0], generator=generator, device=device, dtype=x.dtype).to(x.device)
        delta = direction.mul_(_per_example(eps * radius / _l2(direction).clamp_min(1e-12), x))
    return (x + delta).clamp_(0, 1)


def _project_l2_(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """In place: pull x_adv back into the L2 ball of radius eps around x, then into [0, 1]."""
    delta = x_adv - x
    factor = (eps / _l2(delta).clamp_min(1e-12)).clamp_max(1.0)  # (N,); 0 when eps == 0
    # Clipping to [0, 1] after scaling only shrinks |delta| per pixel, so the norm stays <= eps.
    return torch.addcmul(x, delta, _per_example(factor, x), out=x_adv).clamp_(0, 1)


def _pgd_run(model, x, y, eps, alpha, steps, norm, random_start, loss_fn, generator) -> Tensor:
    x_adv = _start(x, eps, norm, random_start, generator)
    lo, hi = (x - eps).clamp_(min=0), (x + eps).clamp_(max=1)  # Linf ball ∩ [0, 1]
    for _ in range(steps):
        grad = _grad(model, x_adv, y, loss_fn)
        if norm == "linf":
            x_adv.add_(grad.sign(), alpha=alpha).clamp_(lo, hi)
        else:
            x_adv.addcdiv_(grad, _per_example(_l2(grad).clamp_min(1e-12), x), value=alpha)
            _project_l2_(x_adv, x, eps)
    return x_adv


@ATTACKS.register("fgsm")
def fgsm(
    model: nn.Module, x: Tensor, y: Tensor, *, eps: float, generator: torch.Generator | None = None
) -> Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): one Linf step of size eps.
    `generator` is accepted for a uniform signature; FGSM draws nothing."""
    _check(eps)
    x = x.detach()
    with eval_mode(model), frozen_parameters(model):
        grad = _grad(model, x.clone(), y, ce_loss)
    return (x + eps * grad.sign()).clamp_(0, 1)


@ATTACKS.register("pgd")
def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    alpha: float | None = None,
    steps: int = 10,
    norm: str = "linf",
    random_start: bool = True,
    restarts: int = 1,
    loss: str = "ce",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Projected gradient descent (Madry et al. 2018) under the Linf or L2 norm; alpha defaults to
    2.5 * eps / steps. With restarts > 1 each example keeps the restart that fools the model, else
    the one with the highest loss (one extra no-grad forward per restart to score it)."""
    _check(eps, steps, restarts, norm)
    loss_fn = _loss_fn(loss)
    alpha = 2.5 * eps / steps if alpha is None else alpha
    x = x.detach()
    with eval_mode(model), frozen_parameters(model):
        best = _pgd_run(model, x, y, eps, alpha, steps, norm, random_start, loss_fn, generator)
        if restarts == 1:
            return best
        best_fooled, best_loss = _score(model, best, y, loss_fn)
        for _ in range(restarts - 1):
            cand = _pgd_run(model, x, y, eps, alpha, steps, norm, random_start, loss_fn, generator)
            fooled, cand_loss = _score(model, cand, y, loss_fn)
            better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (cand_loss > best_loss))  # (N,)
            best = torch.where(_per_example(better, x), cand, best)
            best_fooled, best_loss = best_fooled | fooled, torch.where(better, cand_loss, best_loss)
    return best


@torch.no_grad()
def _score(model: nn.Module, x_adv: Tensor, y: Tensor, loss_fn: LossFn) -> tuple[Tensor, Tensor]:
    logits = model(x_adv)
    return logits.argmax(dim=1) != y, loss_fn(logits, y)  # (N,) bool, (N,) float


@ATTACKS.register("mim")
def mim(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    alpha: float | None = None,
    steps: int = 10,
    decay: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Momentum iterative FGSM (Dong et al. 2018), Linf: g <- decay * g + grad / mean|grad|,
    x <- x + alpha * sign(g). alpha defaults to eps / steps (the paper's choice); no random start,
    so `generator` is accepted for a uniform signature only."""
    _check(eps, steps)
    alpha = eps / steps if alpha is None else alpha
    x = x.detach()
    x_adv, momentum = x.clone(), torch.zeros_like(x)
    lo, hi = (x - eps).clamp_(min=0), (x + eps).clamp_(max=1)
    with eval_mode(model), frozen_parameters(model):
        for _ in range(steps):
            grad = _grad(model, x_adv, y, ce_loss)
            l1 = _per_example(grad.abs().flatten(1).mean(dim=1).clamp_min(1e-12), x)
            momentum.mul_(decay).add_(grad / l1)
            x_adv.add_(momentum.sign(), alpha=alpha).clamp_(lo, hi)
    return x_adv


@ATTACKS.register("cw_linf")
def cw_linf(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    alpha: float | None = None,
    steps: int = 30,
    random_start: bool = True,
    restarts: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Linf PGD on the Carlini-Wagner margin loss (the CW-inf of Madry et al. and TRADES)."""
    return pgd(
        model, x, y, eps=eps, alpha=alpha, steps=steps, norm="linf", random_start=random_start,
        restarts=restarts, loss="cw", generator=generator,
    )


def attack_names() -> list[str]:
    """The registered attack names, sorted."""
    return ATTACKS.names()


def get_attack(name: str) -> Callable[..., Tensor]:
    """The attack function registered under `name` (ValueError listing the names otherwise)."""
    return ATTACKS.get(name)


def attack_parameters(name: str) -> dict[str, Any]:
    """The keyword parameters `name` takes, with their defaults (inspect.Parameter.empty if required)."""
    params = inspect.signature(get_attack(name)).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def run_attack(name: str, model: nn.Module, x: Tensor, y: Tensor, **params: Any) -> Tensor:
    """Run the attack `name` with `params`, checked against what it takes (ValueError otherwise)."""
    valid = attack_parameters(name)
    unknown = sorted(set(params) - set(valid))
    missing = [p for p, d in valid.items() if d is inspect.Parameter.empty and p not in params]
    if unknown or missing:
        problem = f"takes no parameter(s) {', '.join(unknown)}" if unknown else f"needs {', '.join(missing)}"
        raise ValueError(f"attack {name!r} {problem}; valid parameters: {', '.join(valid)}")
    return get_attack(name)(model, x, y, **params)
