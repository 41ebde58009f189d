"""Adversarial attacks in pixel space, and `Attack`: the one description of an attack from YAML to tensor.

    attack = Attack("pgd", eps=0.3, steps=20)          # validated once: name, norm, eps, steps, ...
    x_adv = attack(model, x, y, generator=make_generator(0, x.device))
    Attack.parse("pgd:8/255:10")                        # the command-line form NAME:EPS[:STEPS[:NORM[:RESTARTS]]]

The same `Attack` is the training attack of PGD-AT / TRADES / SNS, an entry of an evaluation suite and
an analysis' attack; pydantic validates it straight from YAML (`{name: pgd, eps: 0.2, steps: 20}`).

Every attack is one function `attack(model, x, y, *, eps, ...) -> x_adv` on [0, 1] inputs (the model
owns its normalization). Contract: x_adv is detached, inside the eps-ball around x and inside [0, 1];
the model runs in eval mode and gets its modes back; no gradient reaches its parameters (inputs only,
via `torch.autograd.grad`); a `generator` makes random starts repeatable; eps=0 returns x exactly. Per
step: one forward, one input gradient, no host-device sync. Ours: fgsm, fgsm_rs (FGSM from a random
start, the attack of "fast" adversarial training), pgd (linf / l2, restarts, ce / cw loss), mim,
cw_linf, and the adaptive attacks on SNS and CAS, feature_pgd and cas_pgd (ns_core/adaptive_attacks.py).
AutoAttack's stages come from its reference code (ns_core/autoattack.py).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ns_core import autoattack
from ns_core.registry import Registry
from ns_core.utils import eval_mode, frozen_parameters

ATTACKS = Registry("attack")
NORMS = ("linf", "l2")
LossFn = Callable[[Tensor, Tensor], Tensor]  # (logits, y) -> per-example loss (N,)


@dataclass(frozen=True)
class Attack:
    """One attack with its threat model. `steps=None` means the attack's own default; `layers` (feature_pgd
    only) names the watched layers (None: the model's default layers)."""

    name: str
    eps: float
    norm: str = "linf"
    steps: int | None = None
    alpha: float | None = None
    restarts: int = 1
    layers: tuple[str, ...] | None = None

    # pydantic validates it from YAML: unknown keys and non-finite numbers are errors
    __pydantic_config__ = {"extra": "forbid", "allow_inf_nan": False}

    def __post_init__(self) -> None:
        takes = attack_parameters(self.name)  # ValueError naming the attacks for an unknown name
        where = f"attack {self.name!r}"
        check_threat_model(self.norm, self.eps, where)
        if self.norm != "linf" and "norm" not in takes:
            raise ValueError(f"{where}: norm {self.norm!r} is not supported; it attacks in linf only")
        if self.steps is not None and (self.steps < 1 or ("steps" not in takes and self.steps != 1)):
            raise ValueError(f"{where}: steps must be >= 1 (or left out for the default)"
                             f"{'' if 'steps' in takes else '; it is a single-step attack'}; got {self.steps}")
        if self.alpha is not None and ("alpha" not in takes or not self.alpha > 0):
            raise ValueError(f"{where}: {'alpha must be > 0' if 'alpha' in takes else 'takes no alpha'}; "
                             f"got {self.alpha}")
        if self.restarts < 1 or (self.restarts > 1 and "restarts" not in takes):
            raise ValueError(f"{where}: restarts must be 1 (or > 1 for attacks with restarts), got {self.restarts}")
        if self.layers is not None and "layers" not in takes:
            raise ValueError(f"{where}: takes no layers (only feature_pgd watches layers)")

    @property
    def steps_used(self) -> int:
        """The steps it runs: the given ones, else the attack's default (1 for single-step attacks)."""
        default = attack_parameters(self.name).get("steps", 1)
        return self.steps if self.steps is not None else int(default)

    @property
    def label(self) -> str:
        """e.g. 'pgd-linf-eps0.3-s20-r1'."""
        return f"{self.name}-{self.norm}-eps{self.eps:g}-s{self.steps_used}-r{self.restarts}"

    @property
    def threat_model(self) -> tuple[str, float]:
        return self.norm, self.eps

    def params(self) -> dict[str, Any]:
        """Keyword arguments of the attack function (without the generator)."""
        takes = attack_parameters(self.name)
        params: dict[str, Any] = {"eps": self.eps}
        for key in ("norm", "steps", "alpha", "restarts", "layers"):
            value = getattr(self, key)
            if key in takes and value is not None:
                params[key] = list(value) if key == "layers" else value
        return params

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (layers as a list): for trial configs and checkpoint metadata."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**data, "layers": list(self.layers) if self.layers is not None else None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Attack:
        layers = data.get("layers")
        return cls(**{**data, "layers": tuple(layers) if layers is not None else None})

    def replace(self, **changes: Any) -> Attack:
        """A copy with some fields changed (validated again)."""
        return Attack(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return ATTACKS.get(self.name)(model, x, y, generator=generator, **self.params())

    @classmethod
    def parse(cls, text: str) -> Attack:
        """'pgd:8/255:10[:NORM[:RESTARTS]]' -> Attack; a bad field is a ValueError saying the format."""
        parts = text.split(":")
        if not 2 <= len(parts) <= 5 or not parts[0]:
            raise ValueError(f"attack {text!r}: write NAME:EPS[:STEPS[:NORM[:RESTARTS]]], e.g. pgd:0.3:20")
        try:
            steps = int(parts[2]) if len(parts) > 2 and parts[2] not in ("", "0") else None
            restarts = int(parts[4]) if len(parts) > 4 else 1
        except ValueError:
            raise ValueError(f"attack {text!r}: STEPS and RESTARTS must be whole numbers") from None
        norm = parts[3].lower() if len(parts) > 3 else "linf"
        return cls(parts[0], parse_eps(parts[1], text), norm=norm, steps=steps, restarts=restarts)


def parse_eps(value: str, where: str = "eps") -> float:
    """'0.3' or a fraction such as '8/255' -> float; anything else is a one-line ValueError."""
    num, slash, den = str(value).partition("/")
    try:
        eps = float(num) / float(den) if slash else float(num)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{where}: EPS must be a number or a fraction like 8/255, got {value!r}") from None
    if not math.isfinite(eps):
        raise ValueError(f"{where}: EPS must be finite, got {value!r}")
    return eps


def check_threat_model(norm: str, eps: float, where: str = "attack", input_shape: Sequence[int] | None = None) -> None:
    """Inputs live in [0, 1]: a Linf eps above 1 is a scale mistake, an L2 eps above sqrt(dim) covers the
    whole input box. A ValueError naming the likely fix otherwise."""
    if norm not in NORMS:
        raise ValueError(f"{where}: unknown norm {norm!r}; choose one of: {', '.join(NORMS)}")
    if not (isinstance(eps, int | float) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{where}: eps must be a finite number >= 0, got {eps!r}")
    if norm == "linf" and eps > 1:
        raise ValueError(f"{where}: Linf eps {eps:g} is above 1, but inputs are in [0, 1]; did you mean "
                         f"{eps:g}/255 = {eps / 255:.4g}?")
    if norm == "l2" and input_shape is not None:
        diameter = math.sqrt(math.prod(input_shape))
        if eps > diameter:
            raise ValueError(f"{where}: L2 eps {eps:g} exceeds the diameter of the [0, 1] input box "
                             f"({diameter:.3g} for inputs {tuple(input_shape)}); L2 eps is usually 0.5-2")


# ---- losses and the projected-ascent loop every iterative attack shares ------------------------------


def cw_margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example Carlini-Wagner margin `max_{j != y} z_j - z_y` (N,); positive iff misclassified."""
    true = logits.gather(1, y[:, None]).squeeze(1)  # (N,)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)  # (N,) best wrong class
    return other - true


def ce_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example cross-entropy (N,)."""
    return F.cross_entropy(logits, y, reduction="none")


LOSSES: dict[str, LossFn] = {"ce": ce_loss, "cw": cw_margin_loss}


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


def _per_example(v: Tensor, x: Tensor) -> Tensor:
    return v.view(-1, *([1] * (x.dim() - 1)))  # (N,) -> (N, 1, 1, ...) to broadcast over x


def _l2(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1)  # (N,)


def _noise(kind: str, x: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else x.device
    draw = torch.rand if kind == "uniform" else torch.randn
    return draw(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def start_point(x: Tensor, eps: float, norm: str, generator: torch.Generator | None) -> Tensor:
    """A uniform point of the Linf eps-ball, or (L2) a Gaussian direction with a radius uniform in [0, eps]
    (as torchattacks PGDL2); clipped to [0, 1]."""
    if norm == "linf":
        delta = _noise("uniform", x, generator).mul_(2 * eps).sub_(eps)
    else:
        direction = _noise("normal", x, generator)
        device = generator.device if generator is not None else x.device
        radius = torch.rand(x.shape[0], generator=generator, device=device, dtype=x.dtype).to(x.device)
        delta = direction.mul_(_per_example(eps * radius / _l2(direction).clamp_min(1e-12), x))
    return (x + delta).clamp_(0, 1)


def _project_l2_(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """In place: pull x_adv back into the L2 ball of radius eps around x, then into [0, 1]."""
    delta = x_adv - x
    factor = (eps / _l2(delta).clamp_min(1e-12)).clamp_max(1.0)  # (N,); 0 when eps == 0
    # Clipping to [0, 1] after scaling only shrinks |delta| per pixel, so the norm stays <= eps.
    return torch.addcmul(x, delta, _per_example(factor, x), out=x_adv).clamp_(0, 1)


def projected_ascent(model: nn.Module, x: Tensor, y: Tensor, x_start: Tensor, *, eps: float, alpha: float,
                     steps: int, norm: str, loss_fn: LossFn) -> Tensor:
    """The loop of PGD, TRADES' inner maximization and feature_pgd: `steps` signed (Linf) or normalized (L2)
    gradient steps of size alpha on loss_fn from x_start, each projected to the eps-ball and [0, 1].
    The caller holds eval_mode and frozen_parameters."""
    x_adv = x_start.clone()
    lo, hi = (x - eps).clamp_(min=0), (x + eps).clamp_(max=1)  # Linf ball ∩ [0, 1]
    for _ in range(steps):
        grad = _grad(model, x_adv, y, loss_fn)
        if norm == "linf":
            x_adv.add_(grad.sign(), alpha=alpha).clamp_(lo, hi)
        else:
            x_adv.addcdiv_(grad, _per_example(_l2(grad).clamp_min(1e-12), x), value=alpha)
            _project_l2_(x_adv, x, eps)
    return x_adv


def _best_of(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn, runs: Sequence[Callable[[], Tensor]]) -> Tensor:
    """Per example, the best of several runs: one that fools the model, else the one with the highest loss
    (one extra no-grad forward per run to score it)."""
    best = runs[0]()
    if len(runs) == 1:
        return best
    best_fooled, best_loss = _score(model, best, y, loss_fn)
    for run in runs[1:]:
        cand = run()
        fooled, cand_loss = _score(model, cand, y, loss_fn)
        better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (cand_loss > best_loss))  # (N,)
        best = torch.where(_per_example(better, x), cand, best)
        best_fooled, best_loss = best_fooled | fooled, torch.where(better, cand_loss, best_loss)
    return best


@torch.no_grad()
def _score(model: nn.Module, x_adv: Tensor, y: Tensor, loss_fn: LossFn) -> tuple[Tensor, Tensor]:
    logits = model(x_adv)
    return logits.argmax(dim=1) != y, loss_fn(logits, y)  # (N,) bool, (N,) float


def adaptive_pgd(model: nn.Module, x: Tensor, y: Tensor, adaptive_loss: LossFn, *, eps: float, alpha: float,
                 steps: int, norm: str, restarts: int, generator: torch.Generator | None) -> Tensor:
    """PGD on a defence's own loss, never weaker than `pgd`: from each random start (the starts `pgd` draws, in
    its order) it runs the adaptive loss and plain cross-entropy, and keeps per example whichever run fools the
    model, else the higher cross-entropy (2 x steps passes per restart). The caller's context (eval mode, frozen
    parameters, hooks the loss reads) is the one every forward runs in."""
    runs = []
    for _ in range(restarts):
        start = start_point(x, eps, norm, generator)
        for loss_fn in (adaptive_loss, ce_loss):
            runs.append(lambda start=start, loss_fn=loss_fn: projected_ascent(
                model, x, y, start, eps=eps, alpha=alpha, steps=steps, norm=norm, loss_fn=loss_fn))
    return _best_of(model, x, y, ce_loss, runs)


# ---- the attacks ---------------------------------------------------------------------------------


@ATTACKS.register("fgsm")
def fgsm(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, generator: torch.Generator | None = None) -> Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): one Linf step of size eps.
    `generator` is accepted for a uniform signature; FGSM draws nothing."""
    x = x.detach()
    with eval_mode(model), frozen_parameters(model):
        grad = _grad(model, x.clone(), y, ce_loss)
    return (x + eps * grad.sign()).clamp_(0, 1)


@ATTACKS.register("fgsm_rs")
def fgsm_rs(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, alpha: float | None = None,
            generator: torch.Generator | None = None) -> Tensor:
    """FGSM from a uniform random start with step alpha (default 1.25 eps), projected back to the eps-ball:
    the attack of "fast" adversarial training (Wong, Rice and Kolter 2020). Two passes per example."""
    return pgd(model, x, y, eps=eps, alpha=1.25 * eps if alpha is None else alpha, steps=1, generator=generator)


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
    2.5 * eps / steps. With restarts > 1 each example keeps the restart that fools the model."""
    loss_fn = _loss_fn(loss)
    alpha = 2.5 * eps / steps if alpha is None else alpha
    x = x.detach()

    def run() -> Tensor:
        start = start_point(x, eps, norm, generator) if random_start else x.clone()
        return projected_ascent(model, x, y, start, eps=eps, alpha=alpha, steps=steps, norm=norm, loss_fn=loss_fn)

    with eval_mode(model), frozen_parameters(model):
        return _best_of(model, x, y, loss_fn, [run] * restarts)


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
    restarts: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Linf PGD on the Carlini-Wagner margin loss (the CW-inf of Madry et al. and TRADES)."""
    return pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, norm="linf", restarts=restarts, loss="cw",
               generator=generator)


for _name in autoattack.STAGES:  # AutoAttack's reference code, behind ns_core/autoattack.py
    ATTACKS.register(_name)(getattr(autoattack, _name))
from ns_core import adaptive_attacks  # noqa: E402,F401  registers feature_pgd and cas_pgd (they use the above)


def attack_parameters(name: str) -> dict[str, Any]:
    """The keyword parameters `name` takes, with their defaults (inspect.Parameter.empty if required)."""
    params = inspect.signature(ATTACKS.get(name)).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
