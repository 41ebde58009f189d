"""Gradient-masking checks that run with every final evaluation (Carlini et al. 2019, "On Evaluating
Adversarial Robustness"; Croce & Hein 2020, AutoAttack's own flags).

A defence can look robust because its gradients are useless rather than because it is robust. Each check
measures one symptom on the evaluated model and says what it measured, its threshold, and ok or FLAG:

- eps0_equals_clean: PGD at eps 0 returns x and the clean predictions (a broken attack pipeline otherwise);
- robust_le_clean: no attack raises accuracy above clean;
- large_eps: PGD at a huge budget (Linf 0.5, or L2 half the input box's diameter) must drive accuracy to
  chance; if it cannot, the attack cannot follow the model's gradient;
- pgd_converged: 4x the steps and 2 restarts lower PGD accuracy by at most 3 points (else the suite's PGD
  had not converged);
- gradient_free_not_stronger: the gradient-free Square attack breaks at most 1% of the examples that the
  gradient attacks before it left standing;
- pgd_le_fgsm: iterative PGD is at least as strong as single-step FGSM (where both ran on every example);
- autoattack_*: AutoAttack's own checks (randomized or dynamic model, softmax output, number of classes).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ns_core import autoattack
from ns_core.attacks import Attack
from ns_core.utils import make_generator

GRADIENT_ATTACKS = ("fgsm", "fgsm_rs", "pgd", "mim", "cw_linf", "feature_pgd", "cas_pgd", "apgd_ce", "apgd_t", "fab_t",
                    "autoattack")


@dataclass
class Check:
    name: str
    status: str  # ok | FLAG | skipped
    measured: float | None
    threshold: float | None
    detail: str

    def row(self) -> dict[str, Any]:
        return {"check": self.name, "status": self.status, "measured": self.measured, "threshold": self.threshold,
                "detail": self.detail}

    def line(self) -> str:
        return f"{self.status:<7} {self.name:<27} {self.detail}"


def _check(name: str, flagged: bool, measured: float, threshold: float, detail: str) -> Check:
    return Check(name, "FLAG" if flagged else "ok", float(measured), float(threshold), detail)


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((model(x).argmax(1) == y).double().mean())


def _attacked_accuracy(model: nn.Module, x: Tensor, y: Tensor, attack: Attack, seed: int, batch_size: int) -> float:
    generator = make_generator(seed + zlib.crc32(f"check-{attack.label}".encode()), x.device)
    correct = 0
    for s in range(0, len(y), batch_size):
        x_adv = attack(model, x[s:s + batch_size], y[s:s + batch_size], generator)
        with torch.no_grad():
            correct += int((model(x_adv).argmax(1) == y[s:s + batch_size]).sum())
    return correct / len(y)


def large_eps_for(norm: str, input_shape: Sequence[int]) -> float:
    """A budget that breaks any undefended or robust classifier: Linf 0.5, L2 half the box's diameter."""
    return 0.5 if norm == "linf" else 0.5 * math.sqrt(math.prod(input_shape))


def masking_checks(model: nn.Module, x: Tensor, y: Tensor, attacks: Sequence[Attack], rows: Sequence[dict],
                   *, seed: int, batch_size: int, examples: int, num_classes: int, cascade: bool) -> list[Check]:
    """Run every check on the first `examples` examples (the model in eval mode, on x's device)."""
    xs, ys = x[:examples], y[:examples]
    checks: list[Check] = []
    clean_row, attack_rows = rows[0], [r for r in rows[1:] if r["attack"] != "worst_case"]
    threat_models = list(dict.fromkeys(a.threat_model for a in attacks)) or [("linf", 0.0)]

    for norm in dict.fromkeys(norm for norm, _ in threat_models):
        probe = Attack("pgd", 0.0, norm=norm, steps=2)
        x_adv = probe(model, xs, ys, make_generator(seed, xs.device))
        moved = float((x_adv - xs).abs().max())
        same = _accuracy(model, x_adv, ys) == _accuracy(model, xs, ys)
        checks.append(_check(f"eps0_equals_clean_{norm}", moved > 0 or not same, moved, 0.0,
                             f"PGD at {norm} eps 0 moved inputs by at most {moved:.3g} and "
                             f"{'kept' if same else 'CHANGED'} the clean accuracy"))

    excess = max([r["correct"] - clean_row["correct"] for r in attack_rows]
                 + [(r["alone_accuracy"] - clean_row["accuracy"]) * r["n"] for r in attack_rows
                    if r["alone_accuracy"] is not None] + [0])
    checks.append(_check("robust_le_clean", excess > 0, excess, 0.0,
                         f"no attack is above clean ({clean_row['correct']}/{clean_row['n']} correct)" if excess <= 0
                         else f"an attack left {excess} more examples correct than clean: the evaluation is broken"))

    chance = 1.0 / num_classes + 0.05
    for norm in dict.fromkeys(norm for norm, _ in threat_models):
        eps = large_eps_for(norm, xs.shape[1:])
        accuracy = _attacked_accuracy(model, xs, ys, Attack("pgd", eps, norm=norm, steps=20), seed, batch_size)
        checks.append(_check(f"large_eps_{norm}", accuracy > chance, accuracy, chance,
                             f"PGD-20 at {norm} eps {eps:.3g}: accuracy {accuracy:.1%} (must reach chance, <= "
                             f"{chance:.0%}; if not, the attack cannot follow the gradient)"))

    for norm, eps in threat_models:
        if eps == 0:
            continue
        base = next((a for a in attacks if a.name == "pgd" and a.threat_model == (norm, eps)),
                    Attack("pgd", eps, norm=norm, steps=20))
        strong = base.replace(steps=4 * base.steps_used, restarts=2)
        drop = (_attacked_accuracy(model, xs, ys, base, seed, batch_size)
                - _attacked_accuracy(model, xs, ys, strong, seed, batch_size))
        checks.append(_check(f"pgd_converged_{norm}_{eps:g}", drop > 0.03, drop, 0.03,
                             f"PGD-{strong.steps_used} x{strong.restarts} restarts lowers PGD-{base.steps_used} "
                             f"accuracy by {drop:+.1%} (at most 3 points if PGD converged)"))

    for i, (attack, row) in enumerate(zip(attacks, attack_rows, strict=True)):
        if attack.name != "square":
            continue
        before = [a for a in attacks[:i] if a.threat_model == attack.threat_model and a.name in GRADIENT_ATTACKS]
        where = f"{attack.norm} eps {attack.eps:g}"
        if cascade and before:
            share = row["new_errors"] / row["n"]
            checks.append(_check(f"gradient_free_not_stronger_{attack.norm}_{attack.eps:g}", share > 0.01, share,
                                 0.01, f"Square broke {row['new_errors']} of {row['n']} examples ({share:.1%}) that "
                                       f"{', '.join(a.name for a in before)} left standing at {where}"))
        elif not cascade:
            gradient = [r["alone_accuracy"] for a, r in zip(attacks, attack_rows, strict=True)
                        if a.threat_model == attack.threat_model and a.name in GRADIENT_ATTACKS]
            if gradient:
                gap = min(gradient) - row["alone_accuracy"]
                checks.append(_check(f"gradient_free_not_stronger_{attack.norm}_{attack.eps:g}", gap > 0.01, gap,
                                     0.01, f"Square alone is {gap:+.1%} below the best gradient attack at {where}"))
    if not any(a.name == "square" for a in attacks):
        checks.append(Check("gradient_free_not_stronger", "skipped", None, None,
                            "no Square attack in the suite (autoattack or square adds it)"))

    alone = {(a.name, a.threat_model): r["alone_accuracy"] for a, r in zip(attacks, attack_rows, strict=True)
             if r["alone_accuracy"] is not None}
    for (name, threat), pgd_alone in alone.items():
        fgsm_alone = alone.get(("fgsm", threat))
        if name == "pgd" and fgsm_alone is not None:
            checks.append(_check(f"pgd_le_fgsm_{threat[0]}_{threat[1]:g}", pgd_alone > fgsm_alone,
                                 pgd_alone - fgsm_alone, 0.0,
                                 f"PGD alone {pgd_alone:.1%} vs FGSM alone {fgsm_alone:.1%}"))

    for name, flagged, detail in autoattack.reference_checks(model, xs, ys, num_classes, batch_size):
        checks.append(Check(f"autoattack_{name}", "FLAG" if flagged else "ok", float(flagged), 0.0, detail))
    return checks
