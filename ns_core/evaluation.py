"""Clean and robust accuracy under a suite of attacks, a per-example worst case, and sanity checks.

    report = evaluate_robustness(model, test_loader, default_suite(0.3), device, seed=0)
    print(report.summary())
    pyarrow.parquet.write_table(report.to_arrow(), "eval/robust_accuracy.parquet")

The loader is read once and its batches kept on the host, so every attack sees the same examples in
the same order (needed for the worst case: an example counts only if it is correct clean and under
every attack) and each attack's time is measured with a single device sync at its end. The model
must already sit on `device`. Sanity checks are recorded, never raised: a report whose checks fail
(robust above clean, PGD above FGSM, eps=0 not equal to clean) points at a broken evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ns_core.attacks import NORMS, attack_parameters, pgd, run_attack
from ns_core.utils import eval_mode, make_generator

log = logging.getLogger(__name__)

SCHEMA = pa.schema([
    ("attack", pa.string()), ("norm", pa.string()), ("eps", pa.float64()), ("steps", pa.int32()),
    ("restarts", pa.int32()), ("n", pa.int64()), ("correct", pa.int64()), ("accuracy", pa.float64()),
    ("seconds", pa.float64()),
])  # eval/robust_accuracy.parquet (DESIGN.md)


@dataclass(frozen=True)
class AttackSpec:
    """One attack of a suite. steps=0 means the attack's own default (1 for the single-step fgsm)."""

    name: str
    eps: float
    norm: str = "linf"
    steps: int = 0
    alpha: float | None = None
    restarts: int = 1

    def __post_init__(self) -> None:
        takes = attack_parameters(self.name)  # ValueError naming the attacks for an unknown name
        where = f"attack spec {self.name!r}"
        if not self.eps >= 0:
            raise ValueError(f"{where}: eps must be >= 0, got {self.eps}")
        if self.norm not in NORMS or (self.norm != "linf" and "norm" not in takes):
            allowed = NORMS if "norm" in takes else ("linf",)
            raise ValueError(f"{where}: norm {self.norm!r} not supported; choose one of: {', '.join(allowed)}")
        if self.steps < 0 or ("steps" not in takes and self.steps > 1):
            raise ValueError(f"{where}: steps must be >= 0 (0 = default) and {self.name} is single-step "
                             f"unless it takes steps; got {self.steps}")
        if self.alpha is not None and "alpha" not in takes:
            raise ValueError(f"{where}: takes no alpha; leave it None")
        if self.restarts < 1 or (self.restarts > 1 and "restarts" not in takes):
            raise ValueError(f"{where}: restarts must be 1 (or > 1 for attacks with restarts), got {self.restarts}")
        object.__setattr__(self, "eps", float(self.eps))
        if self.steps == 0:
            object.__setattr__(self, "steps", takes.get("steps", 1))

    @property
    def label(self) -> str:
        """e.g. 'pgd-linf-eps0.3-s20-r1'."""
        return f"{self.name}-{self.norm}-eps{self.eps:g}-s{self.steps}-r{self.restarts}"

    def params(self) -> dict[str, Any]:
        """Keyword arguments for `run_attack` (without the generator)."""
        takes = attack_parameters(self.name)
        params: dict[str, Any] = {"eps": self.eps}
        for key in ("norm", "steps", "alpha", "restarts"):
            value = getattr(self, key)
            if key in takes and value is not None:
                params[key] = value
        return params


def parse_attack_suite(items: Iterable[dict[str, Any]]) -> list[AttackSpec]:
    """Config dicts -> AttackSpecs; an unknown key is a ValueError naming the valid fields."""
    fields = [f.name for f in dataclasses.fields(AttackSpec)]
    specs = []
    for item in items:
        unknown = sorted(set(item) - set(fields))
        if unknown:
            raise ValueError(f"attack spec {item}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(fields)}")
        specs.append(AttackSpec(**item))
    return specs


def default_suite(eps: float) -> list[AttackSpec]:
    """FGSM, PGD-20, MIM-10 and CW-Linf-30 at one Linf eps."""
    return [AttackSpec("fgsm", eps), AttackSpec("pgd", eps, steps=20), AttackSpec("mim", eps),
            AttackSpec("cw_linf", eps)]


DEFAULT_SUITE_MNIST = default_suite(0.3)


@dataclass
class RobustnessReport:
    """Rows shaped like SCHEMA (clean first, worst_case last) and named sanity checks."""

    rows: list[dict[str, Any]]
    sanity: dict[str, bool] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)

    def add_check(self, name: str, passed: bool, message: str) -> None:
        self.sanity[name], self.messages[name] = bool(passed), message
        if not passed:
            log.warning("sanity check %s failed: %s", name, message)

    @property
    def clean_accuracy(self) -> float:
        return self.rows[0]["accuracy"]

    @property
    def worst_case_accuracy(self) -> float:
        return self.rows[-1]["accuracy"]

    @property
    def sanity_passed(self) -> bool:
        return all(self.sanity.values())

    def to_arrow(self) -> pa.Table:
        """The eval/robust_accuracy.parquet table; schema metadata 'sanity' holds the checks as JSON."""
        meta = {"sanity": json.dumps({"checks": self.sanity, "messages": self.messages})}
        return pa.Table.from_pylist(self.rows, schema=SCHEMA.with_metadata(meta))

    def summary(self) -> str:
        lines = [f"{'attack':<11}{'norm':<6}{'eps':>7}{'steps':>6}{'rest':>5}{'n':>7}{'correct':>8}"
                 f"{'acc':>8}{'sec':>8}"]
        for r in self.rows:
            lines.append(f"{r['attack']:<11}{r['norm']:<6}{r['eps']:>7.4g}{r['steps']:>6}{r['restarts']:>5}"
                         f"{r['n']:>7}{r['correct']:>8}{r['accuracy']:>8.2%}{r['seconds']:>8.2f}")
        lines += [f"sanity {name}: {'ok' if ok else 'FAILED'} ({self.messages[name]})"
                  for name, ok in self.sanity.items()]
        return "\n".join(lines)


def _row(attack: str, norm: str, eps: float, steps: int, restarts: int, n: int, correct: int,
         seconds: float) -> dict[str, Any]:
    return {"attack": attack, "norm": norm, "eps": eps, "steps": steps, "restarts": restarts, "n": n,
            "correct": correct, "accuracy": correct / n, "seconds": seconds}


@torch.no_grad()
def clean_accuracy(model: nn.Module, loader: Iterable, device: torch.device | str) -> float:
    """Top-1 accuracy on the loader's (x, y) batches, model in eval mode; one device sync at the end."""
    correct, n = torch.zeros((), dtype=torch.int64, device=device), 0
    with eval_mode(model):
        for x, y, *_ in loader:
            x, y = x.to(device), y.to(device)
            correct += (model(x).argmax(dim=1) == y).sum()
            n += len(y)
    if n == 0:
        raise ValueError("clean_accuracy: the loader yielded no examples")
    return int(correct) / n


def _collect(loader: Iterable, max_examples: int | None) -> list[tuple[Tensor, Tensor]]:
    batches, n = [], 0
    for x, y, *_ in loader:
        if max_examples is not None:
            x, y = x[: max_examples - n], y[: max_examples - n]
        batches.append((x, y))
        n += len(y)
        if max_examples is not None and n >= max_examples:
            break
    if n == 0:
        raise ValueError("evaluate_robustness: the loader yielded no examples")
    return batches


def _correct(model, batches, device, spec: AttackSpec | None, generator, progress: bool) -> Tensor:
    """Per-example correctness (N,) bool on device, clean (spec None) or under the attack."""
    masks = []
    for x, y in tqdm(batches, desc=spec.label if spec else "clean", disable=not progress, leave=False):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if spec is not None:
            x = run_attack(spec.name, model, x, y, generator=generator, **spec.params())
        with torch.no_grad():
            masks.append(model(x).argmax(dim=1) == y)
    return torch.cat(masks)


def evaluate_robustness(
    model: nn.Module,
    loader: Iterable,
    attacks: list[AttackSpec],
    device: torch.device | str,
    seed: int = 0,
    max_examples: int | None = None,
    progress: bool = False,
) -> RobustnessReport:
    """Clean row (attack "clean", norm "none"), one row per attack, and a worst_case row (norm: the
    suite's common norm or "mixed"; eps: the largest; steps and restarts 0; seconds: the attacks'
    total). Each attack gets its own generator seeded from `seed` and its label, so reordering the
    suite does not change its numbers."""
    device = torch.device(device)
    batches = _collect(loader, max_examples)
    rows = []
    with eval_mode(model):
        start = time.perf_counter()
        worst = _correct(model, batches, device, None, None, progress)
        n = len(worst)
        rows.append(_row("clean", "none", 0.0, 0, 0, n, int(worst.sum()), time.perf_counter() - start))
        for spec in attacks:
            generator = make_generator(seed + zlib.crc32(spec.label.encode()), device)
            start = time.perf_counter()
            correct = _correct(model, batches, device, spec, generator, progress)
            count = int(correct.sum())  # the one sync of this attack: its time is honest on a GPU
            rows.append(_row(spec.name, spec.norm, spec.eps, spec.steps, spec.restarts, n, count,
                             time.perf_counter() - start))
            log.info("%s: %d/%d correct (%.2f%%)", spec.label, count, n, 100 * count / n)
            worst &= correct
        norms = {spec.norm for spec in attacks}
        rows.append(_row("worst_case", norms.pop() if len(norms) == 1 else "mixed",
                         max((s.eps for s in attacks), default=0.0), 0, 0, n, int(worst.sum()),
                         sum(r["seconds"] for r in rows[1:])))
        report = RobustnessReport(rows)
        _sanity_checks(report, attacks, model, batches[0], device, seed)
    return report


def _sanity_checks(report: RobustnessReport, attacks: list[AttackSpec], model: nn.Module,
                   first: tuple[Tensor, Tensor], device: torch.device, seed: int) -> None:
    clean, attacked = report.rows[0], list(zip(attacks, report.rows[1:-1], strict=True))
    zero = [row for spec, row in attacked if spec.eps == 0]
    if zero:
        bad = [r["attack"] for r in zero if r["correct"] != clean["correct"]]
        report.add_check("eps0_equals_clean", not bad, f"eps=0 rows differ from clean: {bad}" if bad
                         else f"{len(zero)} eps=0 row(s) equal clean")
    else:  # cheap stand-in: PGD at eps 0 on the first batch must return x itself
        x, y = first[0].to(device), first[1].to(device)
        same = torch.equal(pgd(model, x, y, eps=0.0, steps=2, generator=make_generator(seed, device)), x)
        report.add_check("eps0_equals_clean", same, "PGD at eps=0 returned x exactly on the first batch"
                         if same else "PGD at eps=0 moved the inputs")
    above = [f"{s.label} {r['correct']} > {clean['correct']}" for s, r in attacked if r["correct"] > clean["correct"]]
    report.add_check("robust_le_clean", not above, "; ".join(above) or "every attack <= clean")
    fgsm = {s.eps: r for s, r in attacked if s.name == "fgsm"}
    pairs = [(s, r, fgsm[s.eps]) for s, r in attacked if s.name == "pgd" and s.norm == "linf" and s.eps in fgsm]
    if pairs:
        bad = [f"{s.label} {r['correct']} > fgsm {f['correct']}" for s, r, f in pairs if r["correct"] > f["correct"]]
        report.add_check("pgd_le_fgsm", not bad, "; ".join(bad) or f"{len(pairs)} pgd/fgsm pair(s) ok")


def sanity_large_eps(model: nn.Module, loader: Iterable, device: torch.device | str, *, eps: float = 0.5,
                     steps: int = 20, max_examples: int = 512, threshold: float = 0.1,
                     seed: int = 0) -> tuple[bool, str]:
    """PGD at a large Linf eps must drive accuracy below `threshold`; if not, suspect gradient masking
    or a broken attack. Returns (passed, message); add it with `report.add_check("large_eps", ...)`."""
    report = evaluate_robustness(model, loader, [AttackSpec("pgd", eps, steps=steps)], device, seed=seed,
                                 max_examples=max_examples)
    accuracy = report.rows[1]["accuracy"]
    passed = accuracy < threshold
    return passed, f"PGD-{steps} at Linf eps {eps:g}: accuracy {accuracy:.2%} (must be < {threshold:.0%})"
