"""Clean and robust accuracy under an attack suite: a cascaded per-example worst case per threat model.

    report = evaluate_robustness(model, data.test, [Attack("fgsm", 0.3), Attack("pgd", 0.3, steps=20),
                                                    Attack("autoattack", 0.3)], seed=0)
    print(report.summary())                 # per attack and worst case, with seconds, then the masking checks
    pq.write_table(report.to_arrow(), "eval/robust_accuracy.parquet")

Cascade (as AutoAttack runs its own stages): attacks run in suite order, and each one attacks only the
examples that are still classified correctly after the previous attacks of the same threat model
(norm, eps), so the suite costs what its strongest attack needs. Each row gives the robust accuracy after
that attack and every earlier one of its threat model (`accuracy`), how many examples it attacked, how
many of them it broke that the earlier ones left standing (`new_errors`), its seconds, and its accuracy on
its own (`alone_accuracy`) where it attacked every correct example (the first of a threat model, or every
attack with `cascade=False`). One `worst_case` row per threat model closes the table: a worst case never
mixes L2 and Linf. Gradient-masking checks (ns_core/masking.py) run with every evaluation; they are
recorded, never raised. `report.examples` keeps what the cascade found per example (correct, survived the first
threat model's attacks, the first attack that broke it): a confirmation logs it, so its interval can count the
test examples' own variation (docs/studies.md).
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ns_core.attacks import Attack, check_threat_model
from ns_core.autoattack import STANDARD
from ns_core.data import Split
from ns_core.masking import Check, masking_checks
from ns_core.utils import eval_mode, make_generator

log = logging.getLogger(__name__)

SCHEMA = pa.schema([
    ("attack", pa.string()), ("norm", pa.string()), ("eps", pa.float64()), ("steps", pa.int32()),
    ("restarts", pa.int32()), ("n", pa.int64()), ("attacked", pa.int64()), ("correct", pa.int64()),
    ("accuracy", pa.float64()), ("alone_accuracy", pa.float64()), ("new_errors", pa.int64()),
    ("seconds", pa.float64()),
])  # eval/robust_accuracy.parquet
CHECK_SCHEMA = pa.schema([("check", pa.string()), ("status", pa.string()), ("measured", pa.float64()),
                          ("threshold", pa.float64()), ("detail", pa.string())])  # eval/checks.parquet
EXAMPLE_SCHEMA = pa.schema([("example", pa.int32()), ("clean_correct", pa.bool_()), ("robust_correct", pa.bool_()),
                            ("broken_by", pa.string())])  # per test example, the first threat model's cascade


@dataclass
class RobustnessReport:
    """Rows shaped like SCHEMA (clean first, then the attacks, then one worst_case per threat model) and
    the gradient-masking checks."""

    rows: list[dict[str, Any]]
    checks: list[Check] = field(default_factory=list)
    examples: pa.Table | None = None  # EXAMPLE_SCHEMA: what the cascade found per example (no extra attack pass)

    @property
    def clean_accuracy(self) -> float:
        return self.rows[0]["accuracy"]

    @property
    def worst_cases(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["attack"] == "worst_case"]

    @property
    def robust_accuracy(self) -> float:
        """The worst case of the suite's first threat model (its headline number)."""
        worst = self.worst_cases
        return worst[0]["accuracy"] if worst else self.clean_accuracy

    @property
    def flags(self) -> list[str]:
        return [c.name for c in self.checks if c.status == "FLAG"]

    def to_arrow(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=SCHEMA)

    def checks_arrow(self) -> pa.Table:
        return pa.Table.from_pylist([c.row() for c in self.checks], schema=CHECK_SCHEMA)

    def metrics(self, prefix: str = "test/") -> dict[str, float]:
        """Flat metrics: <prefix>clean_acc, <prefix><attack>_acc (cumulative), <prefix>robust_acc (first
        threat model's worst case), and a worst case per threat model when there are several."""
        metrics = {f"{prefix}clean_acc": self.clean_accuracy, f"{prefix}robust_acc": self.robust_accuracy}
        several = len(self.worst_cases) > 1
        for r in self.rows[1:]:
            name = r["attack"] if r["attack"] != "worst_case" or several else None
            if name is None:
                continue
            key = f"{prefix}{name}_acc"
            if key in metrics or several:
                key = f"{prefix}{name}_{r['norm']}_eps{r['eps']:g}_acc"
            metrics[key] = r["accuracy"]
        metrics[f"{prefix}flags"] = float(len(self.flags))
        return metrics

    def summary(self) -> str:
        lines = [f"{'attack':<12}{'norm':<6}{'eps':>8}{'steps':>6}{'rest':>5}{'n':>7}{'attacked':>9}"
                 f"{'new err':>8}{'acc':>8}{'alone':>8}{'sec':>8}"]
        for r in self.rows:
            alone = "-" if r["alone_accuracy"] is None else f"{r['alone_accuracy']:.2%}"
            lines.append(f"{r['attack']:<12}{r['norm']:<6}{r['eps']:>8.4g}{r['steps']:>6}{r['restarts']:>5}"
                         f"{r['n']:>7}{r['attacked']:>9}{r['new_errors']:>8}{r['accuracy']:>8.2%}{alone:>8}"
                         f"{r['seconds']:>8.1f}")
        if self.checks:
            lines.append("gradient-masking checks:")
            lines += [f"  {c.line()}" for c in self.checks]
        if self.flags:
            lines.append(f"WARNING: {len(self.flags)} masking check(s) tripped ({', '.join(self.flags)}): these robust "
                         "numbers may overstate robustness (Carlini et al. 2019); see the lines above")
        return "\n".join(lines)


def _row(attack: str, norm: str, eps: float, steps: int, restarts: int, n: int, attacked: int, correct: int,
         alone: float | None, new_errors: int, seconds: float) -> dict[str, Any]:
    return {"attack": attack, "norm": norm, "eps": eps, "steps": steps, "restarts": restarts, "n": n,
            "attacked": attacked, "correct": correct, "accuracy": correct / n, "alone_accuracy": alone,
            "new_errors": new_errors, "seconds": seconds}


def expand_suite(attacks: Sequence[Attack]) -> list[Attack]:
    """`autoattack` becomes its four standard stages (each its own row and seconds); repeats are dropped."""
    expanded: dict[str, Attack] = {}
    for attack in attacks:
        stages = [attack] if attack.name != "autoattack" else [attack.replace(name=s) for s in STANDARD]
        for stage in stages:
            expanded.setdefault(stage.label, stage)
    return list(expanded.values())


@torch.no_grad()
def _predict_correct(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> Tensor:
    return torch.cat([model(x[s:s + batch_size]).argmax(1) == y[s:s + batch_size]
                      for s in range(0, len(y), batch_size)])


def attack_correct(model: nn.Module, x: Tensor, y: Tensor, attack: Attack, generator: torch.Generator | None,
                   batch_size: int, progress: bool = False) -> Tensor:
    """Per example (N,) bool: still classified correctly under `attack`."""
    masks = []
    for s in tqdm(range(0, len(y), batch_size), desc=attack.label, disable=not progress, leave=False):
        x_adv = attack(model, x[s:s + batch_size], y[s:s + batch_size], generator)
        with torch.no_grad():
            masks.append(model(x_adv).argmax(1) == y[s:s + batch_size])
    return torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool, device=y.device)


def example_table(clean: Tensor, robust: Tensor, broken: Tensor, labels: Sequence[str]) -> pa.Table:
    """EXAMPLE_SCHEMA from the cascade's own masks: each example's index in the evaluated split, whether it was
    classified correctly, whether it survived every attack of the first threat model (the headline robust
    accuracy's examples), and the label of the first attack that broke it (null: never correct, or unbroken)."""
    broken = broken.cpu().tolist()
    return pa.table([pa.array(range(len(broken)), pa.int32()), pa.array(clean.cpu().tolist(), pa.bool_()),
                     pa.array(robust.cpu().tolist(), pa.bool_()),
                     pa.array([labels[i] if i >= 0 else None for i in broken], pa.string())], schema=EXAMPLE_SCHEMA)


def evaluate_robustness(
    model: nn.Module,
    data: Split | tuple[Tensor, Tensor],
    attacks: Sequence[Attack],
    *,
    seed: int = 0,
    batch_size: int = 256,
    max_examples: int | None = None,
    cascade: bool = True,
    checks: bool = True,
    check_examples: int = 256,
    num_classes: int = 10,
    progress: bool = False,
) -> RobustnessReport:
    """Clean row (attack "clean", norm "none"), one row per attack and one worst_case row per threat model;
    then the gradient-masking checks. Each attack gets its own generator seeded from `seed` and its label,
    so reordering the suite does not change what it draws. The model must already sit on its device."""
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"the number of examples must be >= 1, got {max_examples}")
    attacks = expand_suite(attacks)
    device = next(model.parameters()).device
    x, y = data.take(max_examples) if isinstance(data, Split) else (data[0][:max_examples], data[1][:max_examples])
    x, y = x.to(device), y.to(device)
    n = len(y)
    if n == 0:
        raise ValueError("evaluate_robustness got no examples")
    for attack in attacks:
        check_threat_model(attack.norm, attack.eps, f"attack {attack.label}", tuple(x.shape[1:]))
    with eval_mode(model):
        start = time.perf_counter()
        clean = _predict_correct(model, x, y, batch_size)
        rows = [_row("clean", "none", 0.0, 0, 0, n, n, int(clean.sum()), None, 0, time.perf_counter() - start)]
        alive: dict[tuple[str, float], Tensor] = {}  # threat model -> still correct after its attacks so far
        broken = torch.full((n,), -1, dtype=torch.long, device=device)  # the headline threat model's first breaker
        for index, attack in enumerate(attacks):
            survivors = alive.setdefault(attack.threat_model, clean.clone())
            first = bool(torch.equal(survivors, clean))
            targets = survivors.nonzero().flatten() if cascade else clean.nonzero().flatten()
            generator = make_generator(seed + zlib.crc32(attack.label.encode()), device)
            start = time.perf_counter()
            correct = torch.zeros(n, dtype=torch.bool, device=device)
            correct[targets] = attack_correct(model, x[targets], y[targets], attack, generator, batch_size, progress)
            if attack.threat_model == attacks[0].threat_model:
                broken[survivors & ~correct] = index
            new_errors = int((survivors & ~correct).sum())  # the one sync of this attack: its time is honest
            alive[attack.threat_model] = survivors & correct
            alone = None if cascade and not first else int(correct.sum()) / n
            rows.append(_row(attack.name, attack.norm, attack.eps, attack.steps_used, attack.restarts, n,
                             len(targets), int(alive[attack.threat_model].sum()), alone, new_errors,
                             time.perf_counter() - start))
            log.info("%s: attacked %d, broke %d more; %d/%d left", attack.label, len(targets), new_errors,
                     int(alive[attack.threat_model].sum()), n)
        attack_rows = rows[1:]
        for (norm, eps), survivors in alive.items():
            mine = [r for a, r in zip(attacks, attack_rows, strict=True) if a.threat_model == (norm, eps)]
            rows.append(_row("worst_case", norm, eps, 0, 0, n, n, int(survivors.sum()), None,
                             int((clean & ~survivors).sum()), sum(r["seconds"] for r in mine)))
    headline = alive[attacks[0].threat_model] if attacks else clean
    report = RobustnessReport(rows, examples=example_table(clean, headline, broken, [a.label for a in attacks]))
    if checks:
        with eval_mode(model):  # the checks score the evaluated (eval-mode) model; a train-mode one would use
            # batch statistics and move BatchNorm's running ones, and a CAS model would have no label to suppress with
            report.checks = masking_checks(model, x, y, attacks, rows, seed=seed, batch_size=batch_size,
                                           examples=check_examples, num_classes=num_classes, cascade=cascade)
        for check in report.checks:
            if check.status == "FLAG":
                log.warning("masking check %s tripped: %s", check.name, check.detail)
    return report
