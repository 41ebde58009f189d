"""Training objectives: standard, PGD-AT, TRADES and SNS (sensitive neuron stabilizing).

An objective does two things per batch, and the Trainer owns everything else (zero_grad, step,
AMP, schedules):

    x_adv = objective.craft(model, x, y, generator)     # None for standard training
    loss, parts = objective.loss(model, x, y, x_adv)    # parts: detached scalars to log

SNS adds to its base loss (PGD-AT or TRADES) lambda * sum_l mean_{m in S_l} d(F_l^m(x), F_l^m(x'))
over the sensitive set S_l of each chosen layer. The activations come from hooks on the forward
passes the loss makes anyway (PGD-AT needs one extra benign forward, TRADES none); S_l is re-selected
every `reselect_every` epochs on a fixed probe subset (`on_epoch_start`). SNS starts after
`warmup_epochs` of the plain base loss: from epoch 1, the regularizer's trivial minimum (features that
ignore the input) swallows the network (DESIGN.md, "Collapse").
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ns_core.attacks import pgd
from ns_core.registry import Registry
from ns_core.sensitivity import ActivationCapture, SensitivityMap, measure_sensitivity
from ns_core.utils import eval_mode, frozen_parameters

log = logging.getLogger(__name__)
OBJECTIVES = Registry("method")
DISTANCES = ("l1", "l2", "cosine", "relative")


class TrainingCollapsed(RuntimeError):
    """SNS found its trivial minimum: the chosen layers stopped responding to the input."""


@dataclass
class Adversary:
    """The training attack: PGD on cross-entropy within an eps-ball."""

    eps: float = 0.3
    steps: int = 10
    alpha: float | None = None
    norm: str = "linf"

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator=None) -> torch.Tensor:
        return pgd(model, x, y, eps=self.eps, alpha=self.alpha, steps=self.steps, norm=self.norm,
                   random_start=True, generator=generator)


def trades_adversary(model: nn.Module, x: torch.Tensor, adversary: Adversary, generator=None) -> torch.Tensor:
    """TRADES' inner maximization: PGD (Linf) on KL(f(x) || f(x')) from a small Gaussian start."""
    alpha = adversary.alpha or 2.5 * adversary.eps / max(adversary.steps, 1)
    with eval_mode(model), frozen_parameters(model):
        p_clean = F.softmax(model(x), dim=1).detach()
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        x_adv = (x + 0.001 * noise).clamp(0, 1)
        for _ in range(adversary.steps):
            x_adv.requires_grad_(True)
            kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_clean, reduction="sum")
            (grad,) = torch.autograd.grad(kl, x_adv)
            x_adv = x_adv.detach() + alpha * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - adversary.eps), x + adversary.eps).clamp(0, 1)
    return x_adv.detach()


def trades_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float):
    """CE on clean logits + beta * KL(f(x) || f(x')) (Zhang et al. 2019)."""
    natural = F.cross_entropy(logits_clean, y)
    robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean")
    return natural + beta * robust, {"ce_clean": natural.detach(), "kl_adv": robust.detach()}


def neuron_distance(benign: torch.Tensor, adv: torch.Tensor, distance: str) -> torch.Tensor:
    """Mean distance between benign and adversarial activations of the given neurons.

    benign, adv: (B, k, ...) activations of k neurons. `l1`: per-dim mean |difference| (the
    sensitivity formula); `l2`: per-neuron root-mean-square difference; `cosine`: 1 - cos between
    each example's benign and adversarial activation vectors of the k neurons; `relative`: per neuron,
    sum |difference| / sum |benign| over the batch (the relative sensitivity; the denominator is
    floored at 0.1 x the layer's mean so that nearly silent neurons cannot dominate). `l1` can be lowered by
    shrinking a layer's activations and growing the next layer's weights; `relative` and `cosine`
    are invariant to that rescaling.
    """
    if distance == "cosine":
        return (1 - F.cosine_similarity(benign.flatten(1), adv.flatten(1), dim=1, eps=1e-8)).mean()
    diff = (benign - adv).flatten(2) if benign.dim() > 2 else (benign - adv).unsqueeze(2)  # (B, k, dim)
    if distance == "l1":
        return diff.abs().mean()
    if distance == "l2":
        return (diff.pow(2).mean(dim=2) + 1e-12).sqrt().mean()
    if distance == "relative":
        magnitude = benign.flatten(2).abs().sum(dim=(0, 2)) if benign.dim() > 2 else benign.abs().sum(dim=0)
        floor = 0.1 * magnitude.mean().detach() + 1e-6  # a neuron silent on the batch cannot dominate
        return (diff.abs().sum(dim=(0, 2)) / magnitude.clamp_min(floor)).mean()
    raise ValueError(f"unknown distance {distance!r}; choose one of: {', '.join(DISTANCES)}")


class Objective:
    """Base behaviour shared by every objective: nothing to do between epochs, no state."""

    name = "objective"

    def craft(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator=None) -> torch.Tensor | None:
        return None

    def loss(self, model, x, y, x_adv) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def on_epoch_start(self, model: nn.Module, epoch: int, probe, generator=None) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Standard(Objective):
    name = "standard"

    def loss(self, model, x, y, x_adv):
        ce = F.cross_entropy(model(x), y)
        return ce, {"ce_clean": ce.detach()}


@dataclass
class PGDAT(Objective):
    """Madry et al. 2018: cross-entropy on PGD adversarial examples."""

    adversary: Adversary = field(default_factory=Adversary)
    name = "pgd_at"

    def craft(self, model, x, y, generator=None):
        return self.adversary(model, x, y, generator)

    def loss(self, model, x, y, x_adv):
        ce = F.cross_entropy(model(x_adv), y)
        return ce, {"ce_adv": ce.detach()}


@dataclass
class TRADES(Objective):
    adversary: Adversary = field(default_factory=Adversary)
    beta: float = 6.0
    name = "trades"

    def craft(self, model, x, y, generator=None):
        return trades_adversary(model, x, self.adversary, generator)

    def loss(self, model, x, y, x_adv):
        return trades_loss(model(x), model(x_adv), y, self.beta)


@dataclass
class SNS(Objective):
    """Sensitive neuron stabilizing on top of a PGD-AT or TRADES base loss."""

    base: PGDAT | TRADES = field(default_factory=PGDAT)
    lam: float = 0.1
    distance: str = "l1"
    layers: list[str] | None = None  # None: the model's default_layers
    fraction: float = 0.1
    reselect_every: int = 1
    warmup_epochs: int = 1
    selected: dict[str, torch.Tensor] = field(default_factory=dict)
    active: bool = False
    last_map: SensitivityMap | None = None
    name = "sns"

    def __post_init__(self) -> None:
        if self.distance not in DISTANCES:
            raise ValueError(f"unknown distance {self.distance!r}; choose one of: {', '.join(DISTANCES)}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"sns fraction must be in (0, 1], got {self.fraction}")
        if self.reselect_every < 1 or self.warmup_epochs < 0 or self.lam < 0:
            raise ValueError("sns needs reselect_every >= 1, warmup_epochs >= 0 and lambda >= 0")

    def craft(self, model, x, y, generator=None):
        return self.base.craft(model, x, y, generator)

    def chosen_layers(self, model: nn.Module) -> list[str]:
        return list(self.layers) if self.layers else list(model.default_layers)

    def on_epoch_start(self, model, epoch, probe, generator=None):
        """Switch the regularizer on after warm-up; re-select S_l on the probe when due."""
        self.active = epoch >= self.warmup_epochs and self.lam > 0
        due = (epoch - self.warmup_epochs) % self.reselect_every == 0 or not self.selected
        if not (self.active and due):
            return {}
        x, y = probe
        x_adv = self.base.adversary(model, x, y, generator)  # the same CE-PGD for both bases
        smap = measure_sensitivity(model, [(x, x_adv)], self.chosen_layers(model))
        dead = [layer for layer, act in smap.benign_activation.items() if float(act.max()) == 0.0]
        if dead:
            raise TrainingCollapsed(f"layer(s) {', '.join(dead)} output all zeros on the probe set at epoch "
                                    f"{epoch + 1}; lower sns.lambda or raise sns.warmup_epochs")
        self.selected = {layer: idx.to(x.device) for layer, idx in smap.top(self.fraction).items()}
        self.last_map = smap
        log.debug("epoch %d: re-selected %s", epoch + 1, {k: v.numel() for k, v in self.selected.items()})
        return {"probe_sensitivity_selected": smap.mean(selected=self.selected), "probe_sensitivity_all": smap.mean()}

    def loss(self, model, x, y, x_adv):
        if not self.active:
            return self.base.loss(model, x, y, x_adv)
        with ActivationCapture(model, self.selected, channels=self.selected) as capture:
            logits_adv = model(x_adv)
            acts_adv = capture.pop()
            logits_clean = model(x)  # PGD-AT's one extra forward; TRADES needs it anyway
            acts_clean = capture.pop()
        if isinstance(self.base, TRADES):
            base, parts = trades_loss(logits_clean, logits_adv, y, self.base.beta)
        else:
            base = F.cross_entropy(logits_adv, y)
            parts = {"ce_adv": base.detach()}
        reg = sum(neuron_distance(acts_clean[layer], acts_adv[layer], self.distance) for layer in self.selected)
        return base + self.lam * reg, {**parts, "sns_reg": reg.detach()}

    def state_dict(self) -> dict:
        return {"selected": {k: v.cpu() for k, v in self.selected.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.selected = dict(state.get("selected", {}))


@OBJECTIVES.register("standard")
def _standard() -> Standard:
    return Standard()


@OBJECTIVES.register("pgd_at")
def _pgd_at(eps: float = 0.3, steps: int = 10, alpha: float | None = None, norm: str = "linf") -> PGDAT:
    return PGDAT(Adversary(eps, steps, alpha, norm))


@OBJECTIVES.register("trades")
def _trades(eps: float = 0.3, steps: int = 10, alpha: float | None = None, beta: float = 6.0) -> TRADES:
    return TRADES(Adversary(eps, steps, alpha, "linf"), beta)


@OBJECTIVES.register("sns")
def _sns(eps: float = 0.3, steps: int = 10, alpha: float | None = None, norm: str = "linf",
         base: str = "pgd_at", beta: float = 6.0, lam: float = 0.1, distance: str = "l1",
         layers: list[str] | None = None, fraction: float = 0.1, reselect_every: int = 1,
         warmup_epochs: int = 1) -> SNS:
    adversary = Adversary(eps, steps, alpha, norm)
    if base == "pgd_at":
        base_objective: PGDAT | TRADES = PGDAT(adversary)
    elif base == "trades":
        base_objective = TRADES(adversary, beta)
    else:
        raise ValueError(f"unknown sns base {base!r}; choose one of: pgd_at, trades")
    return SNS(base_objective, lam, distance, layers, fraction, reselect_every, warmup_epochs)


def create_objective(name: str, **params) -> Objective:
    """Build an objective by method name; parameters it does not take give a one-line error."""
    factory = OBJECTIVES.get(name)
    try:
        return factory(**params)
    except TypeError as err:
        valid = ", ".join(inspect.signature(factory).parameters)
        raise ValueError(f"bad parameters for method {name!r} ({err}); it takes: {valid}") from None
