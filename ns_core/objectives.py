"""Training objectives: standard, PGD-AT, fast AT, TRADES, MART, CAS and SNS (sensitive neuron stabilizing).

An objective does two things per batch, and the Trainer owns everything else (zero_grad, step, AMP,
schedules); before training it may change the model (CAS adds heads), between epochs it may re-select
neurons and check itself for collapse:

    metadata = objective.prepare_model(model, input_shape, num_classes)   # {} unless it changes the model
    x_adv = objective.craft(model, x, y, generator)     # None for standard training
    loss, parts = objective.loss(model, x, y, x_adv)    # parts: detached scalars to log
    objective.on_epoch_start(model, epoch, probe, generator); objective.check(history, num_classes)

The Trainer asks the objective what it needs to know (`prepare_model`, `watched_layers`, `selected_neurons`,
`regularizer_active`, `params`), never its class.

MART (Wang et al. 2020) reweights TRADES' KL term per example by how wrong the clean prediction is and
replaces its clean cross-entropy with a boosted one on x'. CAS (Bai et al. 2021) lives mostly in the model
(ns_core/cas.py): PGD-AT on the CAS forward plus the mean cross-entropy of its channel heads.

SNS (sensitive neuron stabilizing, the paper's method) adds a regularizer to PGD-AT, fast AT or TRADES: it lives
in ns_core/sns.py and registers here like every other method.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ns_core.attacks import Attack, projected_ascent, start_point
from ns_core.cas import cas_forward, cas_layers, heads_cross_entropy, install_cas
from ns_core.models import studied_layers
from ns_core.registry import Registry
from ns_core.utils import eval_mode, frozen_parameters

log = logging.getLogger(__name__)
OBJECTIVES = Registry("method")


class TrainingCollapsed(RuntimeError):
    """Training fell into a degenerate solution a retry cannot fix (SNS's trivial minimum, ...)."""


class CatastrophicOverfitting(TrainingCollapsed):
    """Single-step adversarial training suddenly lost its robustness to multi-step attacks."""


def _attack_params(attack: Attack, prefix: str = "attack") -> dict[str, Any]:
    alpha = attack.alpha if attack.alpha is not None else f"default ({attack.name})"
    return {f"{prefix}.name": attack.name, f"{prefix}.eps": attack.eps, f"{prefix}.norm": attack.norm,
            f"{prefix}.steps": attack.steps_used, f"{prefix}.alpha": alpha}


class Objective:
    """What every objective answers; the defaults fit an objective with no regularizer and no state."""

    name = "objective"

    def prepare_model(self, model: nn.Module, input_shape: tuple[int, int, int], num_classes: int) -> dict[str, Any]:
        """Change `model` in place before its optimizer is built (CAS installs its heads); returns what a
        checkpoint's metadata needs to rebuild the changed model (ns_core/checkpoint.py), {} when nothing changed."""
        return {}

    def craft(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor | None:
        return None

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def watched_layers(self, model: nn.Module) -> list[str]:
        """The layers whose sensitivity this objective cares about: the model's default layers, or those nslab
        proposes for a model without them (`studied_layers`)."""
        return studied_layers(model)

    def selected_neurons(self) -> dict[str, Tensor] | None:
        """The neurons it stabilizes, per layer, or None when it selects none."""
        return None

    @property
    def regularizer_active(self) -> bool:
        return False

    def on_epoch_start(self, model: nn.Module, epoch: int, probe: tuple[Tensor, Tensor],
                       generator: torch.Generator | None = None) -> dict[str, float]:
        return {}

    def check(self, history: Sequence[dict], num_classes: int) -> None:
        """Raise TrainingCollapsed when the epochs so far show a degenerate run (nothing by default)."""

    def params(self, model: nn.Module) -> dict[str, Any]:
        """The resolved settings that apply to this objective (for the record)."""
        return {"method": self.name}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        pass


class Standard(Objective):
    name = "standard"

    def loss(self, model, x, y, x_adv):
        ce = F.cross_entropy(model(x), y)
        return ce, {"ce_clean": ce.detach()}


class BaseLoss(Objective):
    """An adversarial base loss SNS can stand on: it crafts x' with `attack` and scores logits it is handed.

    With `eps_ramp_epochs` = k > 0 the training attack's eps (and alpha) grows over the first k epochs, epoch e
    using (e + 1) / (k + 1) of it: at a large eps a fresh network can otherwise sit at chance for many epochs
    (LeNet-5 at Linf 0.2 on some seeds), which would compare methods on a seed's luck."""

    attack: Attack
    eps_ramp_epochs: int = 0
    uses_clean_logits = False

    @property
    def epoch_attack(self) -> Attack:
        """The attack of the current epoch (the ramped one during the eps ramp)."""
        return getattr(self, "_epoch_attack", None) or self.attack

    def on_epoch_start(self, model, epoch, probe, generator=None):
        if epoch >= self.eps_ramp_epochs:
            self._epoch_attack = self.attack
        else:
            scale = (epoch + 1) / (self.eps_ramp_epochs + 1)
            alpha = None if self.attack.alpha is None else self.attack.alpha * scale
            self._epoch_attack = self.attack.replace(eps=self.attack.eps * scale, alpha=alpha)
        return {"train/attack_eps": self._epoch_attack.eps}  # every epoch: the last value is the trained eps

    def craft(self, model, x, y, generator=None):
        return self.epoch_attack(model, x, y, generator)

    def loss(self, model, x, y, x_adv):
        logits_adv = model(x_adv)
        logits_clean = model(x) if self.uses_clean_logits else None
        return self.loss_from_logits(logits_adv, logits_clean, y)

    def loss_from_logits(self, logits_adv: Tensor, logits_clean: Tensor | None,
                         y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def params(self, model):
        ramp = {"attack.eps_ramp_epochs": self.eps_ramp_epochs} if self.eps_ramp_epochs else {}
        return {"method": self.name, **_attack_params(self.attack), **ramp}


@dataclass
class PGDAT(BaseLoss):
    """Madry et al. 2018: cross-entropy on PGD adversarial examples."""

    attack: Attack = field(default_factory=lambda: Attack("pgd", 0.3))
    eps_ramp_epochs: int = 0
    name = "pgd_at"

    def loss_from_logits(self, logits_adv, logits_clean, y):
        ce = F.cross_entropy(logits_adv, y)
        return ce, {"ce_adv": ce.detach()}


@dataclass
class FastAT(PGDAT):
    """Wong, Rice and Kolter 2020 ("Fast is better than free"): cross-entropy on FGSM from a random start
    with step 1.25 eps, 2 passes per step instead of PGD-10's 11. It can lose all robustness within an
    epoch ("catastrophic overfitting"): `check` stops the run when validation PGD accuracy collapses."""

    name = "fast_at"
    drop: float = 0.2  # a fall of at least this much below the best validation PGD accuracy ...
    ratio: float = 0.5  # ... to at most this fraction of it is catastrophic overfitting

    def check(self, history, num_classes):
        robust = [h["val/robust_acc"] for h in history]
        if len(robust) < 2:
            return
        best = max(robust[:-1])
        if best - robust[-1] >= self.drop and robust[-1] <= self.ratio * best:
            raise CatastrophicOverfitting(
                f"validation PGD accuracy fell from {best:.1%} to {robust[-1]:.1%} in epoch {len(robust)} "
                f"(clean {history[-1]['val/clean_acc']:.1%}): single-step training overfit catastrophically "
                "(Wong et al. 2020); lower attack.eps or train fewer epochs, or use pgd_at")


@dataclass
class TRADES(BaseLoss):
    """Zhang et al. 2019: CE on clean logits + beta * KL(f(x) || f(x')), x' maximizing that KL."""

    attack: Attack = field(default_factory=lambda: Attack("pgd", 0.3))
    beta: float = 6.0
    eps_ramp_epochs: int = 0
    name = "trades"
    uses_clean_logits = True

    def craft(self, model, x, y, generator=None):
        """TRADES' inner maximization: the PGD loop on KL(f(x) || f(x')) from a small Gaussian start."""
        attack = self.epoch_attack
        steps = attack.steps_used
        alpha = attack.alpha or 2.5 * attack.eps / steps
        with eval_mode(model), frozen_parameters(model):
            with torch.no_grad():
                p_clean = F.softmax(model(x), dim=1)
            device = generator.device if generator is not None else x.device
            noise = torch.randn(x.shape, device=device, dtype=x.dtype, generator=generator).to(x.device)
            start = (x + 0.001 * noise).clamp_(0, 1)

            def kl(logits: Tensor, _y: Tensor) -> Tensor:  # per example (N,)
                return F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="none").sum(1)

            return projected_ascent(model, x, y, start, eps=attack.eps, alpha=alpha, steps=steps, norm=attack.norm,
                                    loss_fn=kl)

    def loss_from_logits(self, logits_adv, logits_clean, y):
        natural = F.cross_entropy(logits_clean, y)
        robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean")
        return natural + self.beta * robust, {"ce_clean": natural.detach(), "kl_adv": robust.detach()}

    def params(self, model):
        return {**super().params(model), "trades.beta": self.beta}


@dataclass
class MART(BaseLoss):
    """Wang et al. 2020 ("Improving adversarial robustness requires revisiting misclassified examples";
    YisenWang/MART mart.py), x' from the training attack (PGD on cross-entropy, as PGD-AT):

        L = BCE(f(x'), y) + beta * mean_i KL(p(x_i) || p(x'_i)) * (1 - p_y(x_i)),
        BCE(f(x'), y) = CE(f(x'), y) - log(1 - max_{k != y} p_k(x'))

    Computed in log space (log(1 - p_k) = logsumexp over the other classes - logsumexp over all; 1 - p_y as
    -expm1(log p_y)), so the reference's guards against log(0) (1.0001, 1e-12, 1.0000001) are not needed and an
    example the model gets fully right (p_y = 1) weighs exactly 0 in the KL term. As in the reference the
    weight 1 - p_y(x) is not detached."""

    attack: Attack = field(default_factory=lambda: Attack("pgd", 0.3))
    beta: float = 6.0
    eps_ramp_epochs: int = 0
    name = "mart"
    uses_clean_logits = True

    def loss_from_logits(self, logits_adv, logits_clean, y):
        log_adv = F.log_softmax(logits_adv, dim=1)  # (B, K)
        true = F.one_hot(y, log_adv.shape[1]).bool()  # (B, K)
        runner_up = log_adv.masked_fill(true, float("-inf")).argmax(1, keepdim=True)  # (B, 1) best wrong class of x'
        others = log_adv.masked_fill(F.one_hot(runner_up.squeeze(1), log_adv.shape[1]).bool(), float("-inf"))
        boost = -torch.logsumexp(others, dim=1)  # (B,) -log(1 - p_runner_up(x'))
        ce_adv = F.nll_loss(log_adv, y)
        bce = ce_adv + boost.mean()
        log_clean = F.log_softmax(logits_clean, dim=1)  # (B, K)
        kl = (log_clean.exp() * (log_clean - log_adv)).sum(1)  # (B,) KL(p(x) || p(x'))
        weight = -torch.expm1(log_clean.gather(1, y[:, None]).squeeze(1))  # (B,) 1 - p_y(x)
        robust = (kl * weight).mean()
        return bce + self.beta * robust, {"ce_adv": ce_adv.detach(), "bce_adv": bce.detach(),
                                          "kl_weighted": robust.detach()}

    def params(self, model):
        return {**super().params(model), "mart.beta": self.beta}


@dataclass
class CAS(Objective):
    """Channel-wise activation suppressing (Bai et al. 2021; bymavis/CAS_ICLR2021 train.py) on PGD-AT:

        L = CE(f(x'), y) + beta * mean_l CE(h_l(x'), y)

    over the CAS layers l, where h_l is layer l's head and f's forward suppresses each CAS layer's channels with
    the head's weight row of the true label (ns_core/cas.py). One forward: the heads' logits come from the same
    training forward of x'. x' ascends that same loss on the test-time (eval, predicted-label) forward, as the
    reference's attack does (FGSM_REG.perturb): PGD with the training attack's eps, norm, steps and alpha (default
    2.5 eps / steps) from its random start; beta = 0 is PGD-AT's adversary exactly. Ascending the cross-entropy
    alone (PGD-AT's adversary) trained masks that hide the gradient: LeNet-5 on mnist5k at Linf 0.2, 3 epochs,
    82% under PGD-20 but 11% under PGD-50 on this loss; with it, 72% and 41% (PGD-AT: 40% under PGD-20).
    The layers: `layers`, else the last of the model's studied layers (ns_core/cas.py says why)."""

    base: PGDAT = field(default_factory=PGDAT)
    beta: float = 2.0
    layers: list[str] | None = None
    name = "cas"

    def __post_init__(self) -> None:
        if self.beta < 0:
            raise ValueError(f"cas beta must be >= 0, got {self.beta}")

    def prepare_model(self, model, input_shape, num_classes):
        heads = install_cas(model, num_classes, self.layers, input_shape=input_shape)
        return {"cas": {"layers": list(heads.layers)}}

    def watched_layers(self, model):
        """The studied layers, as PGD-AT's (so sensitivity compares between them); the CAS layers are checked
        here too, so a wrong `layers` fails where the run path checks layers (before a run starts)."""
        cas_layers(model, self.layers)
        return studied_layers(model)

    def on_epoch_start(self, model, epoch, probe, generator=None):
        return self.base.on_epoch_start(model, epoch, probe, generator)

    def craft(self, model, x, y, generator=None):
        """PGD on CE + beta x the heads' mean CE of the test-time forward (one run: restarts are for evaluation)."""
        attack = self.base.epoch_attack
        steps = attack.steps_used
        alpha = attack.alpha or 2.5 * attack.eps / steps
        x = x.detach()
        with eval_mode(model), frozen_parameters(model), cas_forward(model) as head_logits:

            def cas_loss(logits: Tensor, y_: Tensor) -> Tensor:  # per example (N,), heads from the same forward
                return F.cross_entropy(logits, y_, reduction="none") + self.beta * heads_cross_entropy(head_logits, y_)

            start = start_point(x, attack.eps, attack.norm, generator)
            return projected_ascent(model, x, y, start, eps=attack.eps, alpha=alpha, steps=steps, norm=attack.norm,
                                    loss_fn=cas_loss)

    def loss(self, model, x, y, x_adv):
        with cas_forward(model, y) as head_logits:
            logits_adv = model(x_adv)
        base, parts = self.base.loss_from_logits(logits_adv, None, y)
        heads = sum(F.cross_entropy(logits, y) for logits in head_logits.values()) / len(head_logits)
        return base + self.beta * heads, {**parts, "cas_ce": heads.detach()}

    def check(self, history, num_classes):
        self.base.check(history, num_classes)

    def params(self, model):
        return {**self.base.params(model), "method": "cas", "cas.beta": self.beta,
                "cas.layers": cas_layers(model, self.layers)}


@OBJECTIVES.register("standard")
def _standard() -> Standard:
    return Standard()


@OBJECTIVES.register("pgd_at")
def _pgd_at(attack: Attack, eps_ramp_epochs: int = 0) -> PGDAT:
    return PGDAT(attack, eps_ramp_epochs)


@OBJECTIVES.register("fast_at")
def _fast_at(attack: Attack, eps_ramp_epochs: int = 0) -> FastAT:
    """The training attack's eps and norm, FGSM from a random start (alpha: the attack's, else 1.25 eps)."""
    return FastAT(Attack("fgsm_rs", attack.eps, norm=attack.norm, alpha=attack.alpha), eps_ramp_epochs)


@OBJECTIVES.register("trades")
def _trades(attack: Attack, beta: float = 6.0, eps_ramp_epochs: int = 0) -> TRADES:
    return TRADES(attack, beta, eps_ramp_epochs)


@OBJECTIVES.register("mart")
def _mart(attack: Attack, beta: float = 6.0, eps_ramp_epochs: int = 0) -> MART:
    return MART(attack, beta, eps_ramp_epochs)


@OBJECTIVES.register("cas")
def _cas(attack: Attack, beta: float = 2.0, layers: list[str] | None = None, eps_ramp_epochs: int = 0) -> CAS:
    return CAS(PGDAT(attack, eps_ramp_epochs), beta, layers)


def objective_arguments(name: str) -> list[str]:
    """The keyword arguments the method's factory takes (what a config must hand it)."""
    return list(inspect.signature(OBJECTIVES.get(name)).parameters)


def create_objective(name: str, **params: Any) -> Objective:
    """Build an objective by method name; parameters it does not take give a one-line error."""
    valid = objective_arguments(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"method {name!r} takes no parameter(s) {', '.join(unknown)}; it takes: "
                         f"{', '.join(valid) or 'nothing'}")
    return OBJECTIVES.get(name)(**params)


from ns_core import sns  # noqa: E402,F401  registers "sns" (SNS builds on the objectives above)
