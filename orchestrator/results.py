"""The results vocabulary, in one place: what a trial's status is called, why it failed, how rows become a
table, how a number prints when it may be missing, the one sentence that states a paired verdict, and the
Pareto front. The study, the confirmation and the analyses all speak it.

    Status.COMPLETE                          # a trial that trained every epoch of its own budget
    failure_kind("TrialFailed: TrainingDiverged: loss became nan ...")   # "TrainingDiverged"
    rows_table(rows)                         # an Arrow table over the union of the rows' keys
    pct(0.9681), points(0.0132), fmt(None)   # "96.8", "+1.3", "-"
    verdict_sentence(...)                    # "SNS, tuned over 16 trials, vs PGD-AT, ...: +1.9 ± 0.4 ..."
    pareto_mask([[0.8, 0.95], [0.7, 0.9], None])   # [True, False, False]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

import pyarrow as pa

from ns_core.objectives import CatastrophicOverfitting, TrainingCollapsed
from ns_core.training import TrainingDiverged
from orchestrator.study.decision import Decision, PairedDifference, decide, probability_of_improvement, seeds_needed


class Status(StrEnum):
    """A trial's outcome, as the tables, plots and console print it."""

    COMPLETE = "COMPLETE"  # trained every epoch of its budget
    STOPPED_EARLY = "STOPPED_EARLY"  # the multi-fidelity scheduler stopped it at a rung
    FAILED = "FAILED"  # diverged, collapsed, overfitted catastrophically, or its worker failed
    INCOMPLETE = "INCOMPLETE"  # interrupted (a resume finishes it)
    WARMED_UP = "WARMED_UP"  # a shared warm-up that trained to its last kept epoch


def run_status(mlflow_status: str, tags: Mapping[str, str]) -> Status:
    """A trial's Status from its MLflow run (for reports that read the record, not Tune's state): the status
    tag the study wrote when the trial ended, else what MLflow's own status can say."""
    from orchestrator.record.tags import STATUS, STOPPED_EARLY

    if tags.get(STATUS) in Status.__members__:
        return Status(tags[STATUS])
    if mlflow_status == "FINISHED" and STOPPED_EARLY in tags:
        return Status.STOPPED_EARLY
    if mlflow_status == "FINISHED":
        return Status.COMPLETE
    if mlflow_status == "FAILED":
        return Status.FAILED
    if mlflow_status == "KILLED" and ("stopped_early" in tags or STOPPED_EARLY in tags):  # recorded before
        return Status.STOPPED_EARLY
    return Status.INCOMPLETE


# Training failures a retry cannot fix (the same seed runs into the same NaN): each named once, here.
FAILURES: tuple[type[Exception], ...] = (TrainingDiverged, CatastrophicOverfitting, TrainingCollapsed)


def failure_kind(text: str | None) -> str | None:
    """The training-failure class named in an error or failure_reason text ('TrainingDiverged'), else None."""
    if not text:
        return None
    return next((cls.__name__ for cls in FAILURES if cls.__name__ in text), None)


def rows_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Rows -> table over the union of their keys (from_pylist alone takes the first row's keys: a failed
    first row would drop every metric column)."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return pa.Table.from_pylist([{k: _plain(row.get(k)) for k in keys} for row in rows])


def _plain(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


# ---- numbers that may be missing -------------------------------------------------------------------------


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: '-' for missing or NaN, floats to `digits` significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def pct(value: Any, digits: int = 1) -> str:
    """An accuracy (a fraction) in percent: '96.8'; '-' when missing."""
    return f"{100 * value:.{digits}f}" if finite(value) else "-"


def points(value: Any, digits: int = 1, sign: bool = True) -> str:
    """An accuracy difference (a fraction) in percentage points: '+2.9'; 'n/a' when missing."""
    return f"{100 * value:{'+' if sign else ''}.{digits}f}" if finite(value) else "n/a"


def mean_std(mean: Any, std: Any, scale: float = 100.0, digits: int = 1) -> str:
    """'96.3 ± 0.1' (the spread left out when unknown); 'n/a' without a mean."""
    if not finite(mean):
        return "n/a"
    spread = f" ± {std * scale:.{digits}f}" if finite(std) else ""
    return f"{mean * scale:.{digits}f}{spread}"


# ---- the paired verdict --------------------------------------------------------------------------------


def verdict_sentence(what: str, name: str, baseline: str, robust: PairedDifference, clean: PairedDifference | None,
                     *, robust_name: str, margin: float, left_out: Mapping[int, str] | None = None,
                     decision: Decision | None = None, sources: bool = False, unit: str = "seed",
                     basis: str = "") -> str:
    """One line a reviewer reads: what was compared, the paired robust difference with its spread, interval and
    bootstrap probability, the clean cost, and the decision in words, whichever way it goes. e.g.

    'SNS, tuned over 8 trials, vs PGD-AT, tuned over 8 trials: +1.9 ± 0.4 worst-case robust points (5/5 seeds,
    95% CI +0.8 to +3.0, P(SNS better) 0.99; ± = sd over seeds), -1.5 clean: SNS beats PGD-AT after 5 seeds'.

    `decision`: the one a sequential confirmation took (default: decide() at these seeds); `sources`: say how wide
    the seeds and the test examples each make the interval ('seeds ±0.9, test examples ±0.6'), or that the
    test examples were not recorded (docs/studies.md, "How sure a verdict is"). `unit`: what the differences are
    paired by ("seed"; "search" for a replicated study's verdict over its searches); `basis`: what the verdict
    rests on, said after the decision ("rests on one search (...)")."""
    missing = "".join(f"; {unit} {seed} left out: {why}" for seed, why in sorted((left_out or {}).items()))
    if robust.n == 0:
        return f"{what}: no {unit} finished for both; no verdict{missing}"
    low, high = robust.ci95
    interval = f", 95% CI {points(low)} to {points(high)}{interval_notes(robust, sources)}" if finite(low) else ""
    spread = f" ± {points(robust.std, sign=False)}" if finite(robust.std) else ""
    improve = probability_of_improvement(robust)
    clean_part = f", {points(clean.mean)} clean" if clean is not None and clean.n else ""
    sd = f"; ± = sd over {plural(unit)}" if spread else ""
    return (f"{what}: {points(robust.mean)}{spread} {robust_name} points ({robust.wins}/{robust.n} {plural(unit)}"
            f"{interval}, P({name} better) {improve:.2f}{sd}){clean_part}: "
            f"{decision_words(robust, margin, name, baseline, decision, unit)}{f'; {basis}' if basis else ''}{missing}")


def interval_notes(robust: PairedDifference, sources: bool) -> str:
    """' at look 2 of 4, Holm over 3 comparisons: seeds ±0.9, test examples ±0.6': what the interval is adjusted
    for and, with `sources`, how wide each source of variation makes it."""
    design, notes = robust.design, []
    if design is not None and design.sequential:
        look = robust.look if robust.look is not None else design.look_of(robust.n)
        notes.append(f" at look {look + 1} of {len(design.looks)}")
    if robust.family > 1:
        notes.append(f" Holm over {robust.family} comparisons")
    text = ",".join(notes)
    if sources:
        widths = robust.half_widths()
        examples = (f"test examples ±{points(widths['test examples'], sign=False)}" if "test examples" in widths
                    else "test examples not recorded (the interval covers the seeds only)")
        text += f": seeds ±{points(widths['seeds'], sign=False)}, {examples}"
    return text


def count(n: int, noun: str) -> str:
    """'1 seed', '3 seeds', '2 searches'."""
    return f"{n} {noun if n == 1 else plural(noun)}"


def plural(noun: str) -> str:
    """'seeds', 'searches'."""
    return f"{noun}es" if noun.endswith(("s", "sh", "ch", "x")) else f"{noun}s"


def decision_words(robust: PairedDifference, margin: float, name: str, baseline: str,
                   decision: Decision | None = None, unit: str = "seed") -> str:
    decision = decision or decide(robust, margin)
    n, m = count(robust.n, unit), points(margin, sign=False)
    if decision == Decision.BEATS:
        small = f", by less than the ±{m}-point margin" if robust.ci95[1] < margin else ""
        return f"{name} beats {baseline} after {n}{small}"
    if decision == Decision.LOSES:
        return f"{name} loses to {baseline} after {n}"
    if decision == Decision.EQUIVALENT:
        return f"{name} is equivalent to {baseline} within ±{m} points after {n}"
    if robust.n < 2:
        return f"undecided after {n} (one {unit} has no interval)"
    needed = seeds_needed(robust)
    if needed is not None:
        return f"undecided after {n}; about {needed - robust.n} more would decide an effect of this size"
    floor = robust.half_widths().get("test examples", 0.0)  # the interval's width from the test examples alone
    if finite(floor) and floor >= abs(robust.mean):
        return (f"undecided after {n}; the test split's own variation (±{points(floor, sign=False)}) is as large as "
                "the effect: no number of seeds would decide it, a larger test split could")
    return f"undecided after {n}; an effect this small cannot be told from 0 with any practical number of seeds"


# ---- the Pareto front ------------------------------------------------------------------------------------


def pareto_mask(points_: Sequence[Sequence[float] | None]) -> list[bool]:
    """True for points no other point dominates (every coordinate >=, one >; larger is better); None marks a
    row that is not eligible (not complete, or a missing objective) and is never on the front."""
    def dominated(p: Sequence[float]) -> bool:
        return any(q is not None and list(q) != list(p) and all(a >= b for a, b in zip(q, p, strict=True))
                   for q in points_)

    return [p is not None and not dominated(p) for p in points_]


def arm_fronts(rows: Sequence[Mapping[str, Any]], objectives: Sequence[tuple[str, str]]) -> list[bool]:
    """The one Pareto rule of a study: each arm's own front over its completed trials (arms are compared by
    the confirmation, not by dominating each other's trials); rows without an `arm` form one arm."""
    front = [False] * len(rows)
    for arm in dict.fromkeys(r.get("arm", "") for r in rows):
        index = [i for i, r in enumerate(rows) if r.get("arm", "") == arm]
        eligible = [rows[i]["status"] == Status.COMPLETE for i in index]
        for i, on in zip(index, pareto_mask(objective_points([rows[i] for i in index], objectives, eligible)),
                         strict=True):
            front[i] = on
    return front


def objective_points(rows: Sequence[Mapping[str, Any]], objectives: Sequence[tuple[str, str]],
                     eligible: Sequence[bool]) -> list[list[float] | None]:
    """Each eligible row's objectives, signed so larger is better; None for the rest or a missing value."""
    out: list[list[float] | None] = []
    for row, ok in zip(rows, eligible, strict=True):
        values = [row.get(m) for m, _ in objectives]
        out.append([v if mode == "max" else -v for v, (_, mode) in zip(values, objectives, strict=True)]
                   if ok and all(finite(v) for v in values) else None)
    return out
