"""SNS, sensitive neuron stabilizing (Zhang et al., IEEE TIP 2021): a base loss (PGD-AT, fast AT or TRADES) plus

    lambda * sum_l mean_{m in S_l} d(F_l^m(x), F_l^m(x'))

over the sensitive set S_l of each chosen layer. The activations come from hooks on the forward passes the loss
makes anyway, and the base loss gets the logits SNS already computed. PGD-AT needs one extra benign forward; it
runs in train mode (batch statistics of the benign batch) but leaves BatchNorm's running statistics untouched, so
SNS and its base differ only by the regularizer (their running statistics, and so their eval-mode models, see the
same batches). S_l is re-selected every `reselect_every` epochs on a fixed probe subset (`on_epoch_start`). SNS
starts after `warmup_epochs` of the plain base loss: from epoch 1 the regularizer's trivial minimum (features that
ignore the input) swallows the network (docs/design.md, "Collapse"). Registered as the method "sns" in
ns_core.objectives.OBJECTIVES.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ns_core.attacks import Attack
from ns_core.models import studied_layers
from ns_core.objectives import OBJECTIVES, PGDAT, BaseLoss, Objective, TrainingCollapsed, create_objective
from ns_core.sensitivity import ActivationCapture, SensitivityMap, measure_sensitivity
from ns_core.utils import bn_stats_frozen

log = logging.getLogger(__name__)
DISTANCES = ("l1", "l2", "cosine", "relative")
SNS_BASES = ("pgd_at", "fast_at", "trades")


def neuron_distance(benign: Tensor, adv: Tensor, distance: str) -> Tensor:
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


@dataclass
class SNS(Objective):
    """Sensitive neuron stabilizing on top of a PGD-AT, fast AT or TRADES base loss."""

    base: BaseLoss = field(default_factory=PGDAT)
    lam: float = 0.1
    distance: str = "l1"
    layers: list[str] | None = None  # None: the model's default_layers, else proposed ones (studied_layers)
    fraction: float = 0.1
    reselect_every: int = 1
    warmup_epochs: int = 1
    collapse_patience: int = 2  # epochs at chance with the regularizer on before the run is stopped
    selected: dict[str, Tensor] = field(default_factory=dict)
    active: bool = False
    last_map: SensitivityMap | None = None
    name = "sns"

    def __post_init__(self) -> None:
        if self.distance not in DISTANCES:
            raise ValueError(f"unknown distance {self.distance!r}; choose one of: {', '.join(DISTANCES)}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"sns fraction must be in (0, 1], got {self.fraction}")
        if self.reselect_every < 1 or self.warmup_epochs < 0 or self.lam < 0 or self.collapse_patience < 1:
            raise ValueError("sns needs reselect_every >= 1, warmup_epochs >= 0, lambda >= 0 and "
                             "collapse_patience >= 1")

    def craft(self, model, x, y, generator=None):
        return self.base.craft(model, x, y, generator)

    def watched_layers(self, model):
        return studied_layers(model, self.layers)

    def selected_neurons(self):
        return self.selected or None

    @property
    def regularizer_active(self) -> bool:
        return self.active

    def on_epoch_start(self, model, epoch, probe, generator=None):
        """The base's epoch first (its eps ramp); then switch the regularizer on after warm-up and re-select
        S_l on the probe when due."""
        info = self.base.on_epoch_start(model, epoch, probe, generator)
        self.active = epoch >= self.warmup_epochs and self.lam > 0
        due = (epoch - self.warmup_epochs) % self.reselect_every == 0 or not self.selected
        if not (self.active and due):
            return info
        x, y = probe
        x_adv = self.base.epoch_attack(model, x, y, generator)
        smap = measure_sensitivity(model, [(x, x_adv)], self.watched_layers(model))
        dead = [layer for layer, act in smap.benign_activation.items() if float(act.max()) == 0.0]
        if dead:
            raise TrainingCollapsed(f"layer(s) {', '.join(dead)} output all zeros on the probe set at epoch "
                                    f"{epoch + 1}; lower sns.lambda or raise sns.warmup_epochs")
        self.selected = {layer: idx.to(x.device) for layer, idx in smap.top(self.fraction).items()}
        self.last_map = smap
        log.debug("epoch %d: re-selected %s", epoch + 1, {k: v.numel() for k, v in self.selected.items()})
        return {**info, "probe/sensitivity_selected": smap.mean(selected=self.selected),
                "probe/sensitivity_all": smap.mean()}

    def loss(self, model, x, y, x_adv):
        if not self.active:
            return self.base.loss(model, x, y, x_adv)
        with ActivationCapture(model, self.selected, channels=self.selected) as capture:
            logits_adv = model(x_adv)
            acts_adv = capture.pop()
            if self.base.uses_clean_logits:  # TRADES makes this forward anyway
                logits_clean = model(x)
            else:  # the one extra forward; BatchNorm's running statistics stay as the base would leave them
                with bn_stats_frozen(model):
                    logits_clean = model(x)
            acts_clean = capture.pop()
        base, parts = self.base.loss_from_logits(logits_adv, logits_clean if self.base.uses_clean_logits else None, y)
        reg = sum(neuron_distance(acts_clean[layer], acts_adv[layer], self.distance) for layer in self.selected)
        return base + self.lam * reg, {**parts, "sns_reg": reg.detach()}

    def check(self, history, num_classes):
        at_chance = 0
        for h in reversed(history):  # trailing epochs with the regularizer on and clean accuracy at chance
            if h["epoch"] <= self.warmup_epochs or self.lam == 0 or h["val/clean_acc"] > 1 / num_classes + 0.05:
                break
            at_chance += 1
        if at_chance >= self.collapse_patience:
            raise TrainingCollapsed(
                f"clean accuracy {history[-1]['val/clean_acc']:.3f} sat at chance for {at_chance} epochs "
                f"with the SNS regularizer on (sensitivity {history[-1]['val/sensitivity_all']:.3g}); "
                "lower sns.lambda or raise sns.warmup_epochs")
        self.base.check(history, num_classes)

    def params(self, model):
        return {**self.base.params(model), "method": "sns", "sns.base": self.base.name, "sns.lam": self.lam,
                "sns.distance": self.distance, "sns.layers": self.watched_layers(model), "sns.fraction": self.fraction,
                "sns.reselect_every": self.reselect_every, "sns.warmup_epochs": self.warmup_epochs}

    def state_dict(self) -> dict:
        return {"selected": {k: v.cpu() for k, v in self.selected.items()}}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.selected = {k: v.to(device) for k, v in state.get("selected", {}).items()}


@OBJECTIVES.register("sns")
def _sns(attack: Attack, base: str = "pgd_at", beta: float = 6.0, lam: float = 0.1, distance: str = "l1",
         layers: list[str] | None = None, fraction: float = 0.1, reselect_every: int = 1,
         warmup_epochs: int = 1, collapse_patience: int = 2, eps_ramp_epochs: int = 0) -> SNS:
    if base not in SNS_BASES:
        raise ValueError(f"unknown sns base {base!r}; choose one of: {', '.join(SNS_BASES)}")
    extra = {"beta": beta} if base == "trades" else {}
    base_objective = create_objective(base, attack=attack, eps_ramp_epochs=eps_ramp_epochs, **extra)
    return SNS(base_objective, lam, distance, layers, fraction, reselect_every, warmup_epochs, collapse_patience)
