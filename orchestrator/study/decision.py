"""Paired comparisons over seeds and test examples, and when they are decided: one rule, called at every look.

    diff = paired_difference({1: 0.71, 2: 0.69, 3: 0.74}, {1: 0.70, 2: 0.70, 3: 0.71})
    diff.mean, diff.std, diff.ci95, diff.wins        # +0.0100, 0.0200, (-0.0397, 0.0597), 2: one look, Student t
    decide(diff, margin=0.01)                         # Decision.UNDECIDED
    diff = diff.with_(design=Design((3, 4, 5, 6)), example_variance=example_variance(per_example))
    diff.ci95, diff.half_widths()                     # repeated-looks adjusted; each source's share of its width
    holm([d1, d2, d3], margin=0.01)                   # [(Decision, share of alpha), ...]: a family at one look
    seeds_needed(diff)                                # seeds the design, continued, would need for this effect
    probability_of_improvement(diff)                  # paired bootstrap over the seeds

Each seed gives one difference (configuration minus baseline, same seed, same test examples). Its mean has two
sources of variation (docs/studies.md, "How sure a verdict is"): the seeds (training randomness, the spread of
the differences, std^2 / n) and the test examples, one sample of the distribution shared by every seed, which
the seeds' spread cannot see (`example_variance`, from the per-example outcomes; None where they were not
recorded, and the interval covers the seeds alone). The standard error is sqrt(std^2 / n + example_variance).

The interval is mean ± critical x se, with the critical value of the study's sequential design at this look
(orchestrator/study/design.py; one look: the Student-t quantile), and the rule reads it: BEATS / LOSES when it
excludes 0, EQUIVALENT when it lies inside ±margin (two one-sided tests at the same boundary), else UNDECIDED.
So a printed interval excludes 0 exactly when the verdict says beats or loses. `rule` is that decision on
arrays: the confirmation calls it through `decide` at every look, and `nslab power` plays whole designs
through it. With one seed the spread is unknown (NaN) and no interval is claimed.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

import numpy as np

from orchestrator.study.design import Design


class Decision(StrEnum):
    BEATS = "beats"
    LOSES = "loses"
    EQUIVALENT = "equivalent"
    UNDECIDED = "undecided"


DECISIONS = tuple(Decision)  # rule()'s codes index this: 0 beats, 1 loses, 2 equivalent, 3 undecided
UNDECIDED = DECISIONS.index(Decision.UNDECIDED)
SEEDS_BOUND = 0.05  # effective_df reads the seeds' variance at its upper (1 - this) confidence bound


@dataclass(frozen=True)
class PairedDifference:
    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    example_variance: float | None = None  # the test examples' share of the mean's variance; None: not recorded
    design: Design | None = None  # the sequential design it is judged in; None: one look at these seeds
    look: int | None = None  # the planned look it was judged at (None: the one its seeds reach)
    share: float = 1.0  # of alpha per direction (Holm's step; 1/3: a third of 2.5%)
    family: int = 1  # comparisons judged together (Holm over `family` when more than one)
    examples: int = 0  # test examples the example variance was estimated from

    def with_(self, **changes) -> PairedDifference:
        return replace(self, **changes)

    @property
    def n(self) -> int:
        return len(self.differences)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.differences) if self.differences else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.differences) if self.n > 1 else math.nan

    @property
    def se_seeds(self) -> float:
        return self.std / math.sqrt(self.n) if self.n > 1 else math.nan

    @property
    def se_examples(self) -> float:
        return math.sqrt(self.example_variance) if self.example_variance is not None else 0.0

    @property
    def se(self) -> float:
        return math.hypot(self.se_seeds, self.se_examples)

    @property
    def df(self) -> float:
        return float(effective_df(self.n, self.se_seeds ** 2, self.se_examples ** 2, self.examples))

    @property
    def critical(self) -> float:
        """The t multiplier of the interval: the design's at this look and share (one look: Student t), at the
        standard error's effective degrees of freedom."""
        design = self.design or Design.fixed(self.n)
        return design.critical(self.n, look=self.look, share=self.share, df=self.df if self.n > 1 else None)

    @property
    def ci95(self) -> tuple[float, float]:
        """The 95% interval (2.5% per side), repeated-looks adjusted in a sequential design; NaN below 2 seeds."""
        return interval(self.mean, self.se, self.critical)

    def half_widths(self) -> dict[str, float]:
        """How wide each source alone makes the interval: {"seeds": ..., "test examples": ...} (the squares add
        up to the squared half-width); "test examples" is left out where the outcomes were not recorded."""
        out = {"seeds": self.critical * self.se_seeds}
        if self.example_variance is not None:
            out["test examples"] = self.critical * self.se_examples
        return out

    @property
    def wins(self) -> int:
        return sum(d > 0 for d in self.differences)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> PairedDifference:
    """a[seed] - b[seed] over the seeds both have (a seed one side lacks, e.g. a failed run, is left out)."""
    seeds = tuple(sorted(set(a) & set(b)))
    return PairedDifference(seeds, tuple(float(a[s]) - float(b[s]) for s in seeds))


def example_variance(outcomes: np.ndarray) -> float | None:
    """The test examples' share of the variance of the mean difference, from (seeds, examples) per-example
    differences (configuration minus baseline, 1 / 0 / -1 for correct or not), by the two-way random-effects
    components written out: d[s, i] = mu + a_i + b_s + c_si. The seeds' spread already holds b and c (their
    variance over seeds is var(b) + var(c) / N); what it lacks is var(a) / N, estimated as (the variance over
    examples of the seed-averaged difference - the interaction mean square / seeds) / N, floored at 0. None below
    2 seeds (the interaction cannot be told from the examples' own effect)."""
    d = np.asarray(outcomes, dtype=float)
    seeds, examples = d.shape
    if seeds < 2 or examples < 2:
        return None
    per_example, per_seed = d.mean(axis=0), d.mean(axis=1)
    residual = d - per_example[None, :] - per_seed[:, None] + d.mean()
    interaction = float((residual ** 2).sum()) / ((seeds - 1) * (examples - 1))
    return max(0.0, float(per_example.var(ddof=1)) - interaction / seeds) / examples


def effective_df(n, seeds_variance, examples_variance, examples: int):
    """Degrees of freedom of the standard error sqrt(std^2 / n + example_variance) (scalars or arrays): n - 1
    where the seeds dominate, more where the test split's (nearly known) variation does. Welch-Satterthwaite's,
    with the seeds' part at its one-sided 95% upper bound (x (n - 1) / chi2_0.05(n - 1)): the plain plug-in lends
    the statistic degrees of freedom exactly when its seeds happened to agree, and called "beats" up to 3.7% of
    the time with nothing to find (docs/studies.md, "How sure a verdict is"); the bound keeps it at 2.5%."""
    from scipy.special import chdtri

    n = np.asarray(n, dtype=float)
    seeds_df = np.maximum(n - 1, 1)
    a = np.asarray(seeds_variance, dtype=float) * seeds_df / chdtri(seeds_df, 1 - SEEDS_BOUND)
    b = np.asarray(examples_variance, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = (a + b) ** 2 / (a ** 2 / seeds_df + b ** 2 / max(examples - 1, 1))
    return np.where(np.isfinite(df), np.maximum(df, seeds_df), seeds_df)


def interval(mean, se, critical):
    """(low, high) = mean ± critical x se, on scalars or arrays (NaN where there is no interval)."""
    half = np.asarray(critical) * np.asarray(se)
    low, high = np.asarray(mean) - half, np.asarray(mean) + half
    return (float(low), float(high)) if low.ndim == 0 else (low, high)


def rule(mean, se, critical, margin: float) -> np.ndarray:
    """The one decision, on arrays: codes into DECISIONS (beats where the interval mean ± critical x se lies above
    0, loses below, equivalent inside ±margin, else undecided; undecided without an interval)."""
    low, high = interval(np.asarray(mean, dtype=float), np.asarray(se, dtype=float), np.asarray(critical, dtype=float))
    inside = (low > -margin) & (high < margin)
    return np.select([low > 0, high < 0, inside], [0, 1, 2], default=UNDECIDED)


def decide(diff: PairedDifference, margin: float) -> Decision:
    """The decision at this look: `rule` on the comparison's mean, standard error and critical value."""
    return DECISIONS[int(rule(diff.mean, diff.se, diff.critical, margin))]


def _passes(diff: PairedDifference, direction: Decision, margin: float) -> bool:
    low, high = diff.ci95
    return {Decision.BEATS: low > 0, Decision.LOSES: high < 0, Decision.EQUIVALENT: -margin < low and high < margin}[
        direction]


def _strength(diff: PairedDifference, direction: Decision, margin: float) -> float:
    """How far the comparison is into `direction`, in standard errors (Holm's order)."""
    edge = {Decision.BEATS: diff.mean, Decision.LOSES: -diff.mean, Decision.EQUIVALENT: margin - abs(diff.mean)}
    value = edge[direction]
    if not diff.se > 0:
        return math.inf if value > 0 else -math.inf if value < 0 else 0.0
    return value / diff.se


def holm(diffs: Sequence[PairedDifference], margin: float,
         settled: Sequence[Decision | None] | None = None) -> list[tuple[Decision, float]]:
    """Holm's step-down over a family of comparisons at one look, per direction (beats, loses, equivalent), so
    that each direction's family-wise error stays at alpha (Holm 1979; at every look of a group-sequential design:
    Maurer & Bretz 2013). `settled`: decisions taken at earlier looks (they stay, and free their share of alpha).
    Returns each comparison's decision and the share of alpha it was judged at (an undecided one: the strictest
    share any direction still holds, so its printed interval never excludes what Holm did not decide)."""
    m = len(diffs)
    decided = list(settled) if settled is not None else [None] * m
    shares = [1.0] * m
    for direction in (Decision.BEATS, Decision.LOSES, Decision.EQUIVALENT):
        remaining = m - sum(d == direction for d in decided)
        for i in sorted((i for i in range(m) if decided[i] is None),
                        key=lambda i: -_strength(diffs[i], direction, margin)):
            if not _passes(diffs[i].with_(share=1 / remaining, family=m), direction, margin):
                break
            decided[i], shares[i] = direction, 1 / remaining
            remaining -= 1
    strictest = 1 / max(1, m - min(sum(d == direction for d in decided) for direction in
                                   (Decision.BEATS, Decision.LOSES, Decision.EQUIVALENT)))
    return [(d or Decision.UNDECIDED, shares[i] if d is not None else strictest) for i, d in enumerate(decided)]


def seeds_needed(diff: PairedDifference, limit: int = 100) -> int | None:
    """About how many seeds in all an effect of the observed mean, spread and test-example variation needs before
    its interval excludes 0, in the design continued (one look: a fixed design of that many seeds); None beyond
    `limit`, without a spread, or when the test examples alone keep the interval around 0."""
    if diff.n < 2 or not diff.std > 0 or diff.mean == 0:
        return None
    sequential = diff.design is not None and diff.design.sequential

    def decides(n: int) -> bool:
        design = diff.design.extended(n) if sequential else Design.fixed(n)
        se = math.sqrt(diff.std ** 2 / n + (diff.example_variance or 0.0))
        return design.critical(n, share=diff.share) * se < abs(diff.mean)

    if not decides(limit):
        return None
    low, high = diff.n, limit  # decides(high); the critical value falls with n, so the search is monotone
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if decides(middle) else (middle, high)
    return high


def probability_of_improvement(diff: PairedDifference, draws: int = 10_000, seed: int = 0) -> float:
    """Paired bootstrap: the share of resamples of the seeds (with replacement) whose mean difference is above 0
    (ties count half). NaN without seeds; seeded, so the same differences give the same number."""
    if diff.n == 0:
        return math.nan
    rng = random.Random(seed)
    values, n = diff.differences, diff.n
    above = 0.0
    for _ in range(draws):
        total = sum(values[rng.randrange(n)] for _ in range(n))
        above += 1.0 if total > 0 else 0.5 if total == 0 else 0.0
    return above / draws
